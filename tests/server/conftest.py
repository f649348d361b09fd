import pytest

import hybridmoe
from hybridmoe.engine.scheduler import SchedulerConfig
from hybridmoe.server.backend import Backend, ServeOptions
from hybridmoe.server.serve import Running


@pytest.fixture(scope="session")
def demo_engine():
    return hybridmoe.load("demo")


@pytest.fixture(scope="module")
def server(demo_engine):
    """A real server on a free loopback port over the demo model, 8 sequences decoded together."""
    backend = Backend.ready_with(demo_engine, ServeOptions(scheduler=SchedulerConfig(max_seqs=8)))
    with Running(backend) as running:
        yield running

