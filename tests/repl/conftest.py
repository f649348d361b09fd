from pathlib import Path

import pytest

import hybridmoe

DEMO = Path(__file__).resolve().parents[2] / "hybridmoe" / "demo_model"


@pytest.fixture(scope="session")
def repl_model(tiny_models):
    """The built-in demo model when it has been built, otherwise a tiny random DeepSeek-V3."""
    return DEMO if (DEMO / "config.json").exists() else tiny_models("deepseek_v3")


@pytest.fixture(scope="session")
def repl_engine(repl_model):
    return hybridmoe.load(repl_model)
