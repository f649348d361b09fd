"""The fixed-window decode segments that CUDA graphs capture, run eagerly on the CPU, against transformers."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the GPU kernels' case runs them on CPU tensors

import pytest  # noqa: E402

import hybridmoe  # noqa: E402
from hybridmoe import kernels  # noqa: E402
from hybridmoe.layers.cache import Batch  # noqa: E402
from hybridmoe.models.common import MoE  # noqa: E402
from hybridmoe.models.graphs import MIN_WINDOW, DecodeGraphs  # noqa: E402

from test_parity import TOL, reference, rel_err, tokens  # noqa: E402

FAMILIES = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral"]


def static_engine(path, **kw):
    eng = hybridmoe.load(path, **kw)
    graphs = eng.model.decode_graphs = DecodeGraphs(eng.model, capture=False)
    calls = []
    segment = graphs._segment
    graphs._segment = lambda *a: calls.append((a[1], a[0])) or segment(*a)  # record windows and spans
    return eng, calls


@pytest.mark.parametrize("name,gpu_kernels", [(n, False) for n in FAMILIES]
                         + [("deepseek_v3", True), ("qwen3_moe", True)])
def test_one_token_steps_across_windows_match_transformers(tiny_models, monkeypatch, name, gpu_kernels):
    """gpu_kernels: with the one-launch GPU kernels too (on CPU tensors through Triton's interpreter), as a CUDA
    decode runs these segments."""
    if gpu_kernels:
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("on a GPU, decode takes the kernels on CUDA tensors (tests/offload, tests/models)")
        monkeypatch.setattr(kernels, "ALSO_ON_CPU", True)
    path = tiny_models(name)
    eng, windows = static_engine(path)
    ids = tokens(MIN_WINDOW + 12, seed=3)  # crosses from the first window into the second
    with torch.no_grad():
        want = reference(path)(torch.tensor([ids])).logits[0]
    model = eng.model
    cache = model.new_cache(1, 256)
    outs = []
    with torch.inference_mode():
        for pos, t in enumerate(ids):
            outs.append(model(torch.tensor([[t]]), Batch.make([pos], [1], [0], "cpu"), cache, last_only=True))
    assert rel_err(torch.cat(outs), want) <= TOL, name
    assert {w for w, _ in windows} == {MIN_WINDOW, 2 * MIN_WINDOW}


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("slots", [0, 4, None])  # None: every expert in a slot, run without host syncs
def test_offloaded_greedy_decode_matches_transformers_generate(tiny_models, name, slots):
    path = tiny_models(name)
    eng, windows = static_engine(path, accelerator="cpu", expert_cache_slots=slots)
    prompt = tokens(6, seed=2)
    with torch.no_grad():
        out = reference(path).generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
    events = list(eng.generate(prompt, temperature=0, max_tokens=24, ignore_eos=True))
    assert list(events[-1].token_ids) == out[0, len(prompt):].tolist()
    stats = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"][1:]
    model = eng.model
    per_step = sum(model.layers[i].ffn.spec.top_k for i in model.moe_layers())
    assert all(s["cache_hits"] + s["cache_misses"] == per_step for s in stats)  # resident layers counted too
    if slots is None:
        assert set(model.experts.experts.resident_slots) == set(model.moe_layers())
        assert all(s["cache_hits"] == per_step for s in stats)
        # nothing is placed on the host and nothing observes between layers: a step is one span of all layers
        assert {tuple(span) for _, span in windows} == {tuple(range(len(model.layers)))}
        assert model.decode_graphs.embeds and model.decode_graphs.runs_head  # token id in, logits out
    elif model.observers:  # the prefetcher observes every layer's output, so each layer is its own span
        assert {len(span) for _, span in windows} == {1}
    else:  # a span ends at each layer whose experts are placed on the host
        assert all(not isinstance(model.layers[i].ffn, MoE) for _, span in windows for i in span[:-1])
    covered = sum(len(span) for _, span in windows)
    assert covered >= 23 * len(model.layers)  # every decode step went through the segments


def test_cache_is_reused_when_large_enough(tiny_models):
    model = hybridmoe.load(tiny_models("qwen3_moe")).model
    a = model.new_cache(1, 64)
    assert model.new_cache(1, 32) is a
    assert model.new_cache(1, 128) is not a
    assert model.new_cache(2, 16) is not model.new_cache(1, 16)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral"])  # qwen2_moe: q, k and v have biases
def test_stacked_qkv_projection_matches_transformers(tiny_models, name):
    """What a CUDA load does to every GQA layer (q, k and v as one linear layer), here on the CPU."""
    path = tiny_models(name)
    eng = hybridmoe.load(path)
    stacked = [m.stack_qkv() for m in eng.model.modules() if hasattr(m, "stack_qkv")]
    assert stacked and all(stacked)
    ids = tokens(20, seed=5)
    with torch.no_grad():
        want = reference(path)(torch.tensor([ids])).logits[0]
    assert rel_err(eng.logits(ids), want) <= TOL, name
