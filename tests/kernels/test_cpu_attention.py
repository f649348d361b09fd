"""gqa_decode, one decode step of grouped-query attention, against the layers' torch ops (RMSNorm, apply_rope,
scaled_dot_product_attention) on random inputs: within float32 rounding, the cache written the same."""
import pytest
import torch
import torch.nn.functional as F

from hybridmoe.kernels import cpu
from hybridmoe.layers.rope import Rope, RopeTables, apply_rope


def reference(qkv, H, Hk, D, q_w, k_w, eps, cos, sin, k_cache, v_cache, pos, scale):
    q, k, v = qkv.view(1, 1, H + 2 * Hk, D).split([H, Hk, Hk], dim=2)
    if q_w is not None:
        q, k = F.rms_norm(q, (D,), q_w, eps), F.rms_norm(k, (D,), k_w, eps)
    q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
    k_cache[pos], v_cache[pos] = k[0, 0], v[0, 0]
    keys, values = k_cache[None, :pos + 1].transpose(1, 2), v_cache[None, :pos + 1].transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, scale=scale, enable_gqa=H != Hk)
    return out.reshape(-1)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("pos", [0, 37])
def test_gqa_decode_matches_torch(heads, norm, pos):
    H, Hk = heads
    D, max_len, eps = 64, 48, 1e-6
    g = torch.Generator().manual_seed(pos + H)
    qkv = torch.randn((H + 2 * Hk) * D, generator=g)
    q_w, k_w = (torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5) if norm else (None, None)
    cos, sin = RopeTables(Rope(D, 1e6)).cos_sin(torch.tensor([[pos]]))
    caches = torch.randn(2, max_len, Hk, D, generator=g)  # stale entries past pos must not count
    want_k, want_v = caches[0].clone(), caches[1].clone()
    want = reference(qkv, H, Hk, D, q_w, k_w, eps, cos, sin, want_k, want_v, pos, D ** -0.5)
    got = cpu.gqa_decode(qkv, H, q_w, k_w, eps, cos.reshape(-1), sin.reshape(-1), caches[0], caches[1], pos,
                         D ** -0.5)
    assert got.shape == (H * D,)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(caches[0], want_k, rtol=1e-5, atol=1e-6)
    assert torch.equal(caches[1], want_v)


def test_gqa_decode_checks_its_inputs():
    H, Hk, D = 4, 2, 16
    qkv, cache = torch.zeros((H + 2 * Hk) * D), torch.zeros(8, Hk, D)
    cos = sin = torch.zeros(D // 2)
    with pytest.raises(ValueError, match="position"):
        cpu.gqa_decode(qkv, H, None, None, 1e-6, cos, sin, cache, cache.clone(), 8, 1.0)
    with pytest.raises(ValueError, match="qkv"):
        cpu.gqa_decode(qkv[:-1], H, None, None, 1e-6, cos, sin, cache, cache.clone(), 0, 1.0)
    with pytest.raises(ValueError, match="query heads"):
        cpu.gqa_decode(qkv, 3, None, None, 1e-6, cos, sin, cache, cache.clone(), 0, 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu.gqa_decode(qkv, H, None, None, 1e-6, cos, sin, cache.double(), cache.clone(), 0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.gqa_decode(qkv, H, None, None, 1e-6, cos, sin, cache.transpose(0, 1).contiguous().transpose(0, 1),
                       cache.clone(), 0, 1.0)
