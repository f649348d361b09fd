"""Model families, one module per HF model_type family. Each exports ModelArgs (with from_config) and build()."""
from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import deepseek_v3, mixtral, qwen3_moe

FAMILIES: dict[str, ModuleType] = {t: m for m in (deepseek_v3, qwen3_moe, mixtral) for t in m.MODEL_TYPES}


def family_for(cfg: dict, where: str = "config.json") -> ModuleType:
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in FAMILIES:
        raise ConfigError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def table_name(family: ModuleType) -> str:
    return family.__name__.rsplit(".", 1)[-1]
