"""CPU decode blocks: an attention block's step in one kernel call (kernels.cpu.MLABlock for DeepSeek, GQABlock for
Qwen3 and Mixtral), the same with its block's residual adds and norms (AttentionHalf), and a MoE layer's step for
one token in one call (kernels.cpu.MoEBlock: router, routed experts, shared expert) give the bits of their layers
called one by one, count the same experts, and the engine takes them at decode with the default settings."""
import pytest
import torch

import hybridmoe
from hybridmoe.layers.attention import GQAttention
from hybridmoe.layers.cache import Batch
from hybridmoe.layers.mla import MLA
from hybridmoe.kernels import cpu as ck
from hybridmoe.models.common import Block, MoE
from hybridmoe.models.cpu_step import CPUDecodePlan


def decode_logits(eng, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        cache = eng.model.new_cache(1, len(ids))
        return torch.cat([eng.model(torch.tensor([[t]]), Batch.make([i], [1], [0], "cpu"), cache)[0]
                          for i, t in enumerate(ids)])


def spy(monkeypatch, obj, name: str, calls: list) -> None:
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a: calls.append(1) or real(*a))


def no_plan(monkeypatch, eng) -> None:
    """Decode steps through the blocks' modules, not the resolved plan (models.cpu_step)."""
    monkeypatch.setattr(CPUDecodePlan, "of", classmethod(lambda cls, model: None))
    eng.model._cpu_plan = None


@pytest.mark.parametrize("family,kind", [("deepseek_v3", MLA), ("qwen3_moe", GQAttention), ("mixtral", GQAttention)])
def test_the_attention_half_in_one_call_gives_the_layers_bits(gguf_models, monkeypatch, family, kind):
    """MLA; grouped-query attention with (Qwen3) and without (Mixtral) q/k norms: each block's attention half (the
    residual adds, both norms and the attention block: kernels.cpu.AttentionHalf) in one call, and the attention
    block alone in one call (MLABlock / GQABlock), give the bits of the layers called one by one."""
    _, path = gguf_models(family, "q8_0")
    eng = hybridmoe.load(path)
    no_plan(monkeypatch, eng)
    blocks = [b for b in eng.model.layers if isinstance(b.attn, kind)]
    assert blocks and all(b.attn.cpu_block() is not None and b.cpu_half() is not None for b in blocks)
    calls = []
    spy(monkeypatch, ck.AttentionHalf, "__call__", calls)
    ids = list(range(20, 44))
    halves = decode_logits(eng, ids)
    assert len(calls) == len(blocks) * len(ids)
    monkeypatch.setattr(Block, "cpu_half", lambda self: None)  # the attention block alone, between the norms
    calls.clear()
    spy(monkeypatch, kind, "cpu_step", calls)
    alone = decode_logits(eng, ids)
    assert len(calls) == len(blocks) * len(ids)
    monkeypatch.setattr(kind, "cpu_block", lambda self: None)  # every layer by itself
    layers = decode_logits(eng, ids)
    assert torch.equal(alone, layers)
    assert torch.equal(halves, layers)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_the_moe_layer_in_one_call_gives_the_layers_bits(gguf_models, monkeypatch, family):
    """With and without a shared expert, softmax and grouped sigmoid routers: the same logits bit for bit, the same
    experts counted per layer."""
    _, path = gguf_models(family, "q8_0")
    eng = hybridmoe.load(path)
    no_plan(monkeypatch, eng)
    experts = eng.model.experts
    moes = {i: b.ffn for i, b in enumerate(eng.model.layers) if isinstance(b.ffn, MoE)}
    assert moes and all(m.cpu_block(i, experts) is not None for i, m in moes.items())
    calls = []
    spy(monkeypatch, experts, "ran", calls)
    ids = list(range(20, 44))
    experts.take_stats()
    fused = decode_logits(eng, ids)
    counted = experts.take_stats()["expert_tokens"]
    assert len(calls) == len(moes) * len(ids)
    monkeypatch.setattr(MoE, "cpu_block", lambda self, layer, experts: None)
    assert torch.equal(fused, decode_logits(eng, ids))
    assert experts.take_stats()["expert_tokens"] == counted


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_the_decode_plan_gives_the_blocks_bits(gguf_models, monkeypatch, family):
    """A CPU decode step from the resolved plan (models.cpu_step: every block's kernels with their arguments
    gathered once; DeepSeek's dense first layer as its module): the logits and the experts counted equal those of the
    blocks called through their modules, and a remade block makes a new plan."""
    _, path = gguf_models(family, "q8_0")
    eng = hybridmoe.load(path)
    experts = eng.model.experts
    calls = []
    spy(monkeypatch, CPUDecodePlan, "__call__", calls)
    ids = list(range(20, 44))
    experts.take_stats()
    planned = decode_logits(eng, ids)
    counted = experts.take_stats()["expert_tokens"]
    assert len(calls) == len(ids)
    plan = eng.model._cpu_plan
    eng.model.layers[-1].attn._cpu_block = False  # as stack_qkv or keep_absorbed_raw leave it: made again
    assert torch.equal(planned, decode_logits(eng, ids)) and eng.model._cpu_plan is not plan
    experts.take_stats()
    no_plan(monkeypatch, eng)
    assert torch.equal(planned, decode_logits(eng, ids))
    assert experts.take_stats()["expert_tokens"] == counted


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_exact_activations_keep_the_layers(gguf_models, family):
    _, path = gguf_models(family, "q8_0")
    eng = hybridmoe.load(path, cpu_activations="f32")
    assert all(b.attn.cpu_block() is None for b in eng.model.layers) and CPUDecodePlan.of(eng.model) is None
    assert all(b.ffn.cpu_block(i, eng.model.experts) is None for i, b in enumerate(eng.model.layers)
               if isinstance(b.ffn, MoE))
