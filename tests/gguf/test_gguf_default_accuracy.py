"""The default CPU activations (every quantized matrix's input rounded to 8 bits per group of 32, as llama.cpp does)
against exact float32 activations on the same GGUF file: perplexity within 1 %, over one pass of the whole text
(prefill) and token by token with the cache (decode), on the tests' random models and on the trained demo model."""
import inspect
import json
import math
import textwrap

import pytest
import torch
from conftest import needs_llama
from gguf_helpers import nll

import hybridmoe
from hybridmoe.layers.cache import Batch
from hybridmoe.options import CpuActivations, RunOptions


def perplexities(path, ids: list[int], **load) -> tuple[float, float]:
    """(prefill, decode) perplexity of ids under the model at `path`."""
    eng = hybridmoe.load(path, **load)
    with torch.no_grad():
        prefill = eng.logits(ids)
        cache = eng.model.new_cache(1, len(ids))
        decode = torch.cat([eng.model(torch.tensor([[t]]), Batch.make([i], [1], [0], "cpu"), cache)[0]
                            for i, t in enumerate(ids)])
    return math.exp(nll(prefill, ids)), math.exp(nll(decode, ids))


def assert_default_within_1_percent(path, ids: list[int]) -> None:
    exact = perplexities(path, ids, cpu_activations="f32")
    default = perplexities(path, ids)
    for what, a, b in zip(("prefill", "decode"), default, exact):
        assert abs(a / b - 1) <= 0.01, (what, a, b)


def test_the_default_is_8_bit_everywhere():
    assert RunOptions().cpu_activations is CpuActivations.INT8_ALL


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_default_perplexity_of_the_test_models(gguf_models, family):
    _, path = gguf_models(family, "q4_k_m")
    eng = hybridmoe.load(path)
    assert eng.model.output.packed.activations == "int8"  # the head, as attention, rounds its inputs
    import tiny
    ids = eng.tokenizer.encode(tiny.CORPUS)[:96]
    assert_default_within_1_percent(path, ids)


def _docstrings() -> str:
    """Text of the kind the demo model was trained on: the standard library's docstrings, those of a few modules'
    public functions and classes."""
    import collections
    import itertools
    import os
    import pathlib
    import subprocess
    modules = (json, collections, textwrap, os.path, pathlib, subprocess, itertools)
    docs = [getattr(m, name).__doc__ for m in modules for name in sorted(dir(m))
            if not name.startswith("_") and callable(getattr(m, name))]
    return "\n".join(inspect.cleandoc(d) for d in docs if d)


@pytest.fixture(scope="module")
def demo_ids():
    from hybridmoe.options import DEMO_MODEL
    from hybridmoe.engine.tokenizer import Tokenizer
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    # 600 tokens: on fewer, a handful of tokens move the ratio by a percent either way
    return DEMO_MODEL, Tokenizer(DEMO_MODEL, config).encode(_docstrings())[:600]


@pytest.mark.parametrize("kind", ["q8_0", pytest.param("q4_k_m", marks=needs_llama)])
def test_default_perplexity_of_the_demo_model(demo_ids, tmp_path, kind):
    from hybridmoe.models.convert import convert
    demo, ids = demo_ids
    path = convert(demo, tmp_path / f"demo-{kind}.gguf", kind, progress=False)
    assert len(ids) == 600
    assert_default_within_1_percent(path, ids)
