"""A small run of bench/fuzz_formats.py: mutated GGUF headers, GGUF files (through llama.cpp's tokenizer too) and
HF directories, each case in a child process so that an abort or a hang is caught. Every case must succeed or end
in one of our one-line errors. The long runs are the bench script's (bench/RESULTS.md)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_formats", ROOT / "bench" / "fuzz_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(fuzz, tmp_path_factory):
    return {k: str(v) for k, v in fuzz.build_seeds(tmp_path_factory.mktemp("fuzz")).items()}


@pytest.mark.parametrize("mode, n", [("headers", 150), ("hf", 20), ("files", 3)])
def test_mutated_inputs_end_in_success_or_our_errors(fuzz, seeds, mode, n):
    counts, failures = fuzz.run_mode(mode, n, seeds, seed=19, batch=n, log=lambda s: None)
    assert sum(counts.values()) == n
    assert not failures, failures[:5]
    assert counts["ours"] > 0  # the mutations do reach the checks
