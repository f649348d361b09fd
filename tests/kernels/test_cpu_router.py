"""CPU routing in one call (kernels.cpu.route_topk, through layers.moe.route_hidden): the experts that the torch
ops choose, and their weights to float32 rounding, for every router setting (softmax or sigmoid, grouped or not, with
DeepSeek-V3's correction bias)."""
import pytest
import torch

from hybridmoe.kernels import cpu
from hybridmoe.layers.moe import RouterSpec, route, route_hidden


@pytest.mark.parametrize("n_experts,dim,top_k", [(128, 2048, 8), (16, 64, 2), (8, 96, 1)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("scaling,after", [(1.0, True), (2.5, True), (2.5, False)])
def test_one_call_routes_as_the_torch_ops(n_experts, dim, top_k, norm, scaling, after) -> None:
    spec = RouterSpec(n_experts=n_experts, top_k=top_k, norm_topk_prob=norm, scaling=scaling,
                      scale_after_norm=after)
    gen = torch.Generator().manual_seed(n_experts + top_k)
    router = torch.randn(n_experts, dim, generator=gen) * 0.05
    for n_tokens in (1, 3):
        x = torch.randn(n_tokens, dim, generator=gen)
        want_ids, want_w = route(x @ router.t(), spec)
        ids, w = route_hidden(x, router, spec)
        assert ids.dtype == torch.long and w.dtype == torch.float32
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec", [
    RouterSpec(32, 8, scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
               scaling=2.5),  # DeepSeek-V3
    RouterSpec(16, 2, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
               scaling=2.5),  # the demo model
    RouterSpec(64, 6, method="group_limited_greedy", n_group=8, topk_group=3, scaling=16.0,
               scale_after_norm=False),  # DeepSeek-V2
    RouterSpec(16, 4, scoring="sigmoid"), RouterSpec(16, 4, scoring="sigmoid", method="noaux_tc")],
    ids=["v3", "demo", "v2", "sigmoid", "noaux-one-group"])
def test_grouped_and_sigmoid_routers_route_as_the_torch_ops(spec) -> None:
    gen = torch.Generator().manual_seed(spec.n_experts + spec.top_k)
    router = torch.randn(spec.n_experts, 256, generator=gen) * 0.05
    bias = torch.randn(spec.n_experts, generator=gen) * 0.1
    for n_tokens in (1, 3):
        x = torch.randn(n_tokens, 256, generator=gen)
        want_ids, want_w = route(x @ router.t(), spec, bias)
        ids, w = route_hidden(x, router, spec, bias)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-7)


def test_many_tokens_take_the_torch_ops() -> None:
    router, x = torch.randn(16, 64), torch.randn(12, 64)
    spec = RouterSpec(16, 4, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2)
    got, want = route_hidden(x, router, spec), route(x @ router.t(), spec)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        cpu.route_softmax(torch.randn(1, 64), torch.randn(16, 64), 17, False, 1.0)
    with pytest.raises(ValueError, match="router must be contiguous"):
        cpu.route_softmax(torch.randn(1, 64), torch.randn(16, 32), 2, False, 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu.route_softmax(torch.randn(1, 64).double(), torch.randn(16, 64), 2, False, 1.0)
    with pytest.raises(ValueError, match="groups"):
        cpu.route_topk(torch.randn(1, 64), torch.randn(16, 64), 2, False, 1.0, n_group=3)
    with pytest.raises(ValueError, match="exceeds"):
        cpu.route_topk(torch.randn(1, 64), torch.randn(16, 64), 9, False, 1.0, n_group=4, topk_group=2,
                       masked=float("-inf"))
