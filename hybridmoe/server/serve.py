"""`hybridmoe serve`: uvicorn runs the app while the model loads in the background (GET /health reports the
progress). Ctrl-C (or SIGTERM) ends every request and starts nothing further, then the process exits."""
from __future__ import annotations

import socket
import sys
import threading

import uvicorn

from ..errors import HybridMoEError
from ..options import RunOptions
from .app import build_app
from .backend import Backend, ServeOptions


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, backend: Backend, announce: bool):
        super().__init__(config)
        self.backend, self.announce = backend, announce

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.announce and self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            say(f"listening on http://{host}:{port}/v1 (OpenAI-compatible); loading {self.backend.id}…")

    def handle_exit(self, sig, frame) -> None:
        self.backend.close(wait=False)  # running answers end now; the streams close with them
        super().handle_exit(sig, frame)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_server(backend: Backend, sock: socket.socket | None = None, announce: bool = False) -> _Server:
    opts = backend.serve
    config = uvicorn.Config(build_app(backend), host=opts.host, port=opts.port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    return _Server(config, backend, announce)


def serve(model, run: RunOptions, opts: ServeOptions) -> int:
    """Run until Ctrl-C or a failed load (then a one-line HybridMoEError)."""
    sock = listen(opts.host, opts.port)  # before loading: a port in use is said at once
    backend = Backend(model, run, opts, on_notice=lambda m: say(f"note: {m}"))
    server = make_server(backend, announce=True)

    def ready(b: Backend) -> None:
        say(f"serving {b.id} ({b.engine.max_context} tokens of context, {opts.scheduler.max_seqs} sequences at "
            f"once); Ctrl-C stops")

    def failed(message: str) -> None:
        server.should_exit = True

    backend.on_ready, backend.on_error = ready, failed
    backend.start()
    try:
        server.run(sockets=[sock])
    finally:
        backend.close()
        sock.close()
    if backend.error is not None:
        raise HybridMoEError(backend.error)
    return 0


def listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise HybridMoEError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") \
            from None
    return sock


class Running:
    """A server on a free loopback port in a background thread (tests, benchmarks, programs)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(backend, self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="hybridmoe-serve")

    def __enter__(self) -> "Running":
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.backend.close(wait=False)
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.backend.close()
        self.sock.close()
