"""mla_decode (and mla_decode_raw, its wkv_b read as GGUF blocks), one decode step of multi-head latent attention in
the absorbed form, against the expanded form in torch (per-head keys and values made from the cached latents, then
plain attention): within float32 rounding, the caches written as prefill writes them."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridmoe.kernels import cpu
from hybridmoe.layers.rope import Rope, RopeTables, apply_rope


def reference(q, kv, H, N, P, V, R, kv_w, eps, cos, sin, w_kv_b, latent_cache, pe_cache, pos, scale):
    latent = F.rms_norm(kv[:R], (R,), kv_w, eps)
    k_pe = apply_rope(kv[R:].view(1, 1, 1, P), cos, sin, True).view(P)
    latent_cache[pos], pe_cache[pos] = latent, k_pe
    q = q.view(1, 1, H, N + P)
    q_pe = apply_rope(q[..., N:], cos, sin, True)
    w = w_kv_b.view(H, N + V, R)
    lat, pe = latent_cache[:pos + 1], pe_cache[:pos + 1]  # [L, R], [L, P]
    out = []
    for h in range(H):
        keys = torch.cat((lat @ w[h, :N].T, pe), dim=-1)  # [L, N + P]
        values = lat @ w[h, N:].T  # [L, V]
        query = torch.cat((q[0, 0, h, :N], q_pe[0, 0, h]))
        probs = ((keys @ query) * scale).softmax(-1)
        out.append(probs @ values)
    return torch.cat(out)


@pytest.mark.parametrize("pos", [0, 29])
@pytest.mark.parametrize("dims", [(4, 32, 16, 32, 64), (3, 16, 8, 24, 32)], ids=["square", "odd"])
def test_mla_decode_matches_the_expanded_form(dims, pos):
    H, N, P, V, R = dims
    max_len, eps, scale = 40, 1e-6, (N + P) ** -0.5
    g = torch.Generator().manual_seed(pos + H)
    q, kv = torch.randn(H * (N + P), generator=g), torch.randn(R + P, generator=g)
    kv_w = torch.rand(R, generator=g) + 0.5
    w_kv_b = torch.randn(H * (N + V), R, generator=g) * R ** -0.5
    cos, sin = RopeTables(Rope(P, 1e4, interleaved=True)).cos_sin(torch.tensor([[pos]]))
    latent, pe = torch.randn(max_len, R, generator=g), torch.randn(max_len, P, generator=g)  # stale past pos
    want_latent, want_pe = latent.clone(), pe.clone()
    want = reference(q, kv, H, N, P, V, R, kv_w, eps, cos, sin, w_kv_b, want_latent, want_pe, pos, scale)
    got = cpu.mla_decode(q, kv, H, kv_w, eps, cos.reshape(-1), sin.reshape(-1), w_kv_b, latent, pe, pos, scale)
    assert got.shape == (H * V,)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(latent, want_latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pe, want_pe, rtol=1e-5, atol=1e-6)


def test_mla_decode_checks_its_inputs():
    H, N, P, V, R = 2, 16, 8, 16, 32
    q, kv, w = torch.zeros(H * (N + P)), torch.zeros(R + P), torch.zeros(H * (N + V), R)
    latent, pe, kv_w = torch.zeros(8, R), torch.zeros(8, P), torch.ones(R)
    cos = sin = torch.zeros(P // 2)
    with pytest.raises(ValueError, match="position"):
        cpu.mla_decode(q, kv, H, kv_w, 1e-6, cos, sin, w, latent, pe, 8, 1.0)
    with pytest.raises(ValueError, match="heads"):
        cpu.mla_decode(q[:-1], kv, H, kv_w, 1e-6, cos, sin, w, latent, pe, 0, 1.0)
    with pytest.raises(ValueError, match="w_kv_b"):
        cpu.mla_decode(q, kv, H, kv_w, 1e-6, cos, sin, w[:, :-1], latent, pe, 0, 1.0)
    with pytest.raises(ValueError, match="kv"):
        cpu.mla_decode(q, kv[:-1], H, kv_w, 1e-6, cos, sin, w, latent, pe, 0, 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu.mla_decode(q, kv, H, kv_w, 1e-6, cos, sin, w, latent.double(), pe, 0, 1.0)


@pytest.mark.parametrize("pos", [0, 29])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_mla_decode_raw_reads_k_b_and_v_b_as_stored(pos, qtype):
    """wkv_b's halves as GGUF rows (attn_k_b [H, R, N], attn_v_b [H, V, R]): the expanded form on their dequantized
    values within float32 rounding, and the caches written the same."""
    from gguf import GGMLQuantizationType as T

    from hybridmoe.quant import dequantize, random_blocks
    qtype = T[qtype]
    H, N, P, V, R = 4, 64, 16, 32, 128
    max_len, eps, scale = 40, 1e-6, (N + P) ** -0.5
    rng = np.random.default_rng(pos)
    k_b = random_blocks(qtype, H * R * N // 32, rng, scale=0.05).reshape(H, R, -1)
    v_b = random_blocks(qtype, H * V * R // 32, rng, scale=0.05).reshape(H, V, -1)
    k_f = torch.from_numpy(dequantize(k_b, qtype, (H, R, N)).astype(np.float32))
    v_f = torch.from_numpy(dequantize(v_b, qtype, (H, V, R)).astype(np.float32))
    w_kv_b = torch.cat((k_f.transpose(1, 2), v_f), dim=1).reshape(-1, R)  # our joined [H * (N + V), R]
    g = torch.Generator().manual_seed(pos)
    q, kv = torch.randn(H * (N + P), generator=g), torch.randn(R + P, generator=g)
    kv_w = torch.rand(R, generator=g) + 0.5
    cos, sin = RopeTables(Rope(P, 1e4, interleaved=True)).cos_sin(torch.tensor([[pos]]))
    caches = torch.randn(max_len, R, generator=g), torch.randn(max_len, P, generator=g)
    expanded = [c.clone() for c in caches]
    want = reference(q, kv, H, N, P, V, R, kv_w, eps, cos, sin, w_kv_b, *expanded, pos, scale)
    got = cpu.mla_decode_raw(q, kv, H, kv_w, eps, cos, sin, k_b, v_b, qtype, *caches, pos, scale)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(caches[0], expanded[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[1], expanded[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="v_b"):
        cpu.mla_decode_raw(q, kv, H, kv_w, eps, cos, sin, k_b, v_b[:, :, :-1].copy(), qtype, *caches, pos, scale)
    with pytest.raises(ValueError, match="k_b"):
        cpu.mla_decode_raw(q, kv, H, kv_w, eps, cos, sin, k_b[:, :-1].copy(), v_b, qtype, *caches, pos, scale)
