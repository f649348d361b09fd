import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> directory, built once per session on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny.BUILDERS[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


# With -q (the README's command) pytest prints only dots; name each part of the suite as it starts, so that a slow
# or stuck run shows where it is.
_part = {"config": None, "name": None}


def pytest_configure(config):
    _part["config"] = config


def pytest_runtest_logstart(nodeid, location):
    config = _part["config"]
    tr = config.pluginmanager.get_plugin("terminalreporter") if config.get_verbosity() < 0 else None
    part = str(Path(location[0]).parent)
    if tr is not None and part != _part["name"]:
        _part["name"] = part
        if tr._tw.width_of_current_line:  # close the line as pytest does between files: the percentage, then a break
            tr._write_progress_information_filling_space()
            tr.write("\n")
        tr.write(f"{part} ")
