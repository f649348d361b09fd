"""Streamed prefill's GPU calls (offload.stream with grouped calls: the Triton dequantization into bf16 and grouped
matrix products over the cache slots and over staging rows of each layer's own width), run by Triton's interpreter
on CPU tensors where there is no GPU. Against the plain CPU engine's float32 logits: within bf16 rounding."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

import hybridmoe  # noqa: E402

pytest.importorskip("triton")

IDS = list(range(30, 60))
# x, the weights, gate/up outputs, h and the outputs rounded to bf16 in two MoE layers; seen: 5.5e-3 of the largest
# logit. A wrong expert, row or token order gives errors of order 1.
TOL = 2.0**-5


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("tier,slots", [("mmap", 0), ("pinned", 5)])
def test_grouped_streamed_prefill_matches_the_cpu_engine(gguf_models, family, tier, slots):
    _, path = gguf_models(family, "q4_k_m")  # Q4_K gate/up; Q4_K or Q6_K down: layers of two row widths
    want = hybridmoe.load(path).logits(IDS)
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=slots, experts_tier=tier)
    experts = eng.model.experts.experts
    for dev in experts.stages:
        dev.grouped_prefill = True
    for stream in experts.streams.values():
        stream.grouped = True
    widths = {experts.store.layouts[layer].nbytes for layer in eng.model.moe_layers()}
    for _ in range(2):  # again: with cache hits (slots) and experts still held in staging
        got = eng.logits(IDS)
        assert ((got - want).abs().max() / want.abs().max()).item() < TOL
    assert eng.model.experts.take_stats()["cache_hits"] > 0 or not slots
    if family == "qwen3_moe":
        assert len(widths) == 2
