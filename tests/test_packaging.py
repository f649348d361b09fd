"""setup.cfg lists packages explicitly (tui/ installs as hybridmoe_tui); keep the list in step with the tree."""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hybridmoe").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    if (ROOT / "tui" / "__init__.py").exists():
        found.add("hybridmoe_tui")
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"
