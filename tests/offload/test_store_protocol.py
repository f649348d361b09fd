"""Both host tiers of experts offer the declared store interface, with the same parameters."""
import inspect

import pytest

from hybridmoe.offload.expert_store import ExpertStore
from hybridmoe.offload.quant_store import QuantStore
from hybridmoe.offload.store import DenseStore

METHODS = [n for n, v in vars(ExpertStore).items() if inspect.isfunction(v) and not n.startswith("_")]


def params(fn) -> list[inspect.Parameter]:
    return [p for name, p in inspect.signature(fn).parameters.items() if name != "self"]


@pytest.mark.parametrize("store", [DenseStore, QuantStore])
def test_store_declares_every_method_with_the_protocols_parameters(store):
    assert len(METHODS) >= 14
    for name in METHODS:
        assert hasattr(store, name), f"{store.__name__} lacks {name}"
        have, want = params(getattr(store, name)), params(getattr(ExpertStore, name))
        # the declared parameters first, in order; a store may add its own after them, with defaults
        assert [p.name for p in have[:len(want)]] == [p.name for p in want], f"{store.__name__}.{name}"
        assert all(p.default is not p.empty for p in have[len(want):]), f"{store.__name__}.{name}"


def test_the_engine_calls_only_declared_store_methods():
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "hybridmoe" / "offload"
    called = set()
    for path in ("experts.py", "runtime.py", "host_node.py", "stream.py"):
        called |= set(re.findall(r"\bstore\.([a-z_]+)", (root / path).read_text()))
    declared = set(METHODS) | set(inspect.get_annotations(ExpertStore))
    assert called <= declared, called - declared
