"""What the routes serve from: the model while it loads (with its progress), then the batch runner over it."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.scheduler import SchedulerConfig
from ..errors import ConfigError
from ..options import DEMO_MODEL, DEMO_NAME, RunOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How `hybridmoe serve` listens and batches. Defaults in one place; validated once."""
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    insecure_no_key: bool = False  # allows another address than loopback without a key
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_body_bytes: int = 8 << 20  # a request body larger than this is answered 413

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: use 0-65535")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty")
        if self.host not in LOOPBACK and self.api_key is None and not self.insecure_no_key:
            raise ConfigError(f"--host {self.host}: anyone who can reach it could use the model; give --api-key KEY "
                              f"(or --insecure-no-key to serve without one)")


def model_id(path: str | Path | None) -> str:
    """The name clients see in /v1/models: the model file's or directory's name (`demo` for the built-in one)."""
    if path is None or str(path) == DEMO_NAME or Path(path) == DEMO_MODEL:
        return DEMO_NAME
    return Path(path).name or str(path)


class Backend:
    """Loads a model in a background thread, then serves it through a BatchEngine. Thread-safe reads."""

    def __init__(self, model: str | Path | None, run: RunOptions, serve: ServeOptions,
                 on_notice=None, on_ready=None, on_error=None):
        self.model, self.run, self.serve = model, run, serve
        self.id = model_id(model)
        self.created = int(time.time())
        self.progress = 0.0
        self.error: str | None = None
        self.engine = None
        self.batch = None
        self.on_notice, self.on_ready, self.on_error = on_notice, on_ready, on_error
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def ready_with(cls, engine, serve: ServeOptions | None = None, name: str | None = None) -> "Backend":
        """A backend over an engine already loaded (programs and tests)."""
        b = cls(name or model_id(engine.path), RunOptions(), serve or ServeOptions())
        b._attach(engine)
        return b

    def start(self) -> "Backend":
        self._thread = threading.Thread(target=self._load, name="hybridmoe-load", daemon=True)
        self._thread.start()
        return self

    def _load(self) -> None:
        from .. import HybridMoEError, load
        try:
            engine = load(self.model, options=self.run, progress=self._progress)
        except (HybridMoEError, ValueError, OSError) as e:
            self.error = str(e)
        except Exception as e:  # reported on /health and by the command, never as a traceback
            self.error = f"{type(e).__name__}: {e}"
        else:
            if not self._closed.is_set():
                self._attach(engine)
        if self.error is not None and self.on_error:
            self.on_error(self.error)

    def _progress(self, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 0.99)  # 1.0 only once the batch runner is up

    def _attach(self, engine) -> None:
        from ..engine.batch import BatchEngine
        self.engine = engine
        self.batch = BatchEngine(engine, self.serve.scheduler, on_notice=self.on_notice).start()
        self.progress = 1.0
        if self.on_ready:
            self.on_ready(self)

    @property
    def ready(self) -> bool:
        return self.batch is not None

    def meta(self) -> dict:
        """What clients may want to know about the model (the chat UI's monitor sizes its heatmap from it)."""
        e = self.engine
        args = e.args
        return {"context": e.max_context, "model_type": e.model_type, "n_layers": args.n_layers,
                "moe_layers": list(e.model.moe_layers()), "n_routed_experts": args.n_routed_experts,
                "top_k": args.router.top_k, "device": str(e.device), "max_seqs": self.serve.scheduler.max_seqs}

    def close(self, wait: bool = True) -> None:
        """Stop serving: every request ends, nothing new starts."""
        self._closed.set()
        if self.batch is not None:
            self.batch.close(wait)
