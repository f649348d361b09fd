"""Routing in one launch chooses the experts the eager `layers.moe.route` chooses, with the same weights to float32
rounding, for every routing the model families use."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from hybridmoe.kernels.gpu.route import route as fused  # noqa: E402
from hybridmoe.layers.moe import RouterSpec, route  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SPECS = {
    "deepseek_v3": (RouterSpec(256, 8, "sigmoid", "noaux_tc", 8, 4, True, 2.5), True),
    "deepseek_v2": (RouterSpec(160, 6, "softmax", "group_limited_greedy", 8, 3, False, 16.0), False),
    "deepseek_v2_lite": (RouterSpec(64, 6, "softmax", "greedy", 1, 1, False, 1.0), False),
    "qwen3_moe": (RouterSpec(128, 8, "softmax", "greedy", norm_topk_prob=True), False),
    "mixtral": (RouterSpec(8, 2, "softmax", "greedy", norm_topk_prob=True), False),
    "sigmoid_one_group_with_bias": (RouterSpec(96, 4, "sigmoid", "noaux_tc", 1, 1, True, 1.5), True),
    "normalised_not_scaled_after": (RouterSpec(64, 4, "softmax", "greedy", norm_topk_prob=True, scaling=2.0,
                                                scale_after_norm=False), False),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_same_choices_as_the_eager_routing(name: str, n_tokens: int) -> None:
    spec, with_bias = SPECS[name]
    g = torch.Generator().manual_seed(len(name) + n_tokens)
    logits = (torch.randn(n_tokens, spec.n_experts, generator=g) * 2).to(DEVICE)
    bias = (torch.randn(spec.n_experts, generator=g) * 0.1).to(DEVICE) if with_bias else None
    # the eager reference: on CPU tensors (on CUDA tensors, route itself takes the fused kernel)
    want_ids, want_w = route(logits.cpu(), spec, None if bias is None else bias.cpu())
    got_ids, got_w = fused(logits, spec, bias)
    assert got_ids.dtype == torch.long and got_w.dtype == torch.float32
    assert torch.equal(got_ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(got_w.cpu(), want_w.cpu(), rtol=2e-6, atol=1e-7)


def test_logits_of_the_wrong_width_are_refused() -> None:
    spec, _ = SPECS["qwen3_moe"]
    with pytest.raises(ValueError, match=r"logits must be \[n_tokens, 128\]"):
        fused(torch.zeros(1, 64, device=DEVICE), spec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,experts,dim", [(1, 128, 2048), (3, 256, 7168), (2, 8, 4096), (1, 9, 100)])
def test_router_logits_match_the_float32_product(dtype, tokens, experts, dim) -> None:
    """Decode's router logits in one launch, against x.float() @ router.T (float32 rounding apart)."""
    from hybridmoe.kernels.gpu.route import router_logits
    g = torch.Generator().manual_seed(experts + dim)
    x = torch.randn(tokens, dim, generator=g).to(dtype)
    w = torch.randn(experts, dim, generator=g) * 0.02
    want = x.float() @ w.t()
    got = router_logits(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert got.dtype == torch.float32 and got.shape == (tokens, experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_router_logits_name_bad_shapes() -> None:
    from hybridmoe.kernels.gpu.route import router_logits
    with pytest.raises(ValueError, match="weight \\[experts, D\\]"):
        router_logits(torch.zeros(1, 64, device=DEVICE), torch.zeros(8, 32, device=DEVICE))
