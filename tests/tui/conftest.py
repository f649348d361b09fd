import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUI = ROOT / "tui"
DEMO = ROOT / "hybridmoe" / "demo_model"

# The package in tui/ installs as hybridmoe_tui; this lets the tests run from a plain checkout too.
if importlib.util.find_spec("hybridmoe_tui") is None:
    spec = importlib.util.spec_from_file_location("hybridmoe_tui", TUI / "__init__.py",
                                                  submodule_search_locations=[str(TUI)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybridmoe_tui"] = module
    spec.loader.exec_module(module)

import hybridmoe  # noqa: E402


@pytest.fixture(scope="session")
def chat_model():
    """The built-in demo model: what `hybridmoe chat` runs with no model given."""
    if not (DEMO / "config.json").exists():
        pytest.skip("the demo model (hybridmoe/demo_model) has not been built")
    return DEMO


@pytest.fixture(scope="session")
def engine(chat_model):
    return hybridmoe.load(chat_model)


@pytest.fixture(scope="session")
def r1_engine(tmp_path_factory):
    """Its chat template opens <think>, so answers start in the reasoning channel."""
    import tiny
    return hybridmoe.load(tiny.deepseek_v3(tmp_path_factory.mktemp("r1"), template=tiny.R1_TEMPLATE))
