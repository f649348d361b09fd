"""CPU routing in one call (kernels.cpu.route_softmax, through layers.moe.route_hidden): the experts that the torch
ops choose, and their weights to float32 rounding, for every softmax router setting it takes."""
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


def test_other_routers_and_many_tokens_take_the_torch_ops() -> None:
    """Sigmoid scores, grouped top-k and prefill-sized inputs are not the kernel's: route_hidden gives route's."""
    router, x = torch.randn(16, 64), torch.randn(12, 64)
    grouped = RouterSpec(16, 4, method="group_limited_greedy", n_group=4, topk_group=2)
    for xs, spec in ((x[:1], RouterSpec(16, 4, scoring="sigmoid")), (x[:1], grouped), (x, RouterSpec(16, 4))):
        got, want = route_hidden(xs, router, spec), route(xs @ router.t(), spec)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        cpu.route_softmax(torch.randn(1, 64), torch.randn(16, 64), 17, False, 1.0)
    with pytest.raises(ValueError, match="router must be contiguous"):
        cpu.route_softmax(torch.randn(1, 64), torch.randn(16, 32), 2, False, 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu.route_softmax(torch.randn(1, 64).double(), torch.randn(16, 64), 2, False, 1.0)
