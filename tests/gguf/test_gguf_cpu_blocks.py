"""A DeepSeek attention block's CPU decode step in one kernel call (kernels.cpu.MLABlock) gives the bits of its
layers called one by one, and the engine takes it at decode with the default settings."""
import torch

import hybridmoe
from hybridmoe.layers.cache import Batch
from hybridmoe.layers.mla import MLA


def decode_logits(eng, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        cache = eng.model.new_cache(1, len(ids))
        return torch.cat([eng.model(torch.tensor([[t]]), Batch.make([i], [1], [0], "cpu"), cache)[0]
                          for i, t in enumerate(ids)])


def test_the_attention_block_in_one_call_gives_the_layers_bits(gguf_models, monkeypatch):
    _, path = gguf_models("deepseek_v3", "q8_0")
    eng = hybridmoe.load(path)
    blocks = [b.attn for b in eng.model.layers if isinstance(b.attn, MLA)]
    assert blocks and all(b.cpu_block() is not None for b in blocks)
    calls = []
    for b in blocks:
        real = b._cpu_block
        monkeypatch.setattr(b, "_cpu_block", lambda *a, real=real: calls.append(1) or real(*a))
    ids = list(range(20, 44))
    fused = decode_logits(eng, ids)
    assert len(calls) == len(blocks) * len(ids)
    monkeypatch.setattr(MLA, "cpu_block", lambda self: None)
    assert torch.equal(fused, decode_logits(eng, ids))


def test_exact_activations_keep_the_layers(gguf_models):
    _, path = gguf_models("deepseek_v3", "q8_0")
    eng = hybridmoe.load(path, cpu_activations="f32")
    assert all(b.attn.cpu_block() is None for b in eng.model.layers if isinstance(b.attn, MLA))
