import importlib.util
import sys
from pathlib import Path

TUI = Path(__file__).resolve().parents[2] / "tui"

# The package in tui/ installs as hybridmoe_tui; this lets the tests run from a plain checkout too.
if importlib.util.find_spec("hybridmoe_tui") is None:
    spec = importlib.util.spec_from_file_location("hybridmoe_tui", TUI / "__init__.py",
                                                  submodule_search_locations=[str(TUI)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybridmoe_tui"] = module
    spec.loader.exec_module(module)
