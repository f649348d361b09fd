"""Model families, one module per HF model_type family. Each exports ModelArgs (with from_config), build() and
NAMES, its registration in formats/families.py; a registered family's module is found here by its name."""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ..errors import ConfigError
from ..formats.families import FAMILIES as REGISTERED

MODULES: dict[str, ModuleType] = {name: import_module(f".{name}", __name__) for name in REGISTERED}
FAMILIES: dict[str, ModuleType] = {t: MODULES[f.name] for f in REGISTERED.values() for t in f.model_types}


def family_for(cfg: dict, where: str = "config.json") -> ModuleType:
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in FAMILIES:
        raise ConfigError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]
