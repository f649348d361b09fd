"""Servers for the tests that need their own options."""
from hybridmoe.engine.scheduler import SchedulerConfig
from hybridmoe.server.backend import Backend, ServeOptions
from hybridmoe.server.serve import Running


def serve(engine, **opts) -> Running:
    """A server on a free loopback port over `engine`; opts: ServeOptions fields, max_seqs, max_queue."""
    scheduler = SchedulerConfig(**{k: opts.pop(k) for k in ("max_seqs", "max_queue") if k in opts})
    return Running(Backend.ready_with(engine, ServeOptions(scheduler=scheduler, **opts)))
