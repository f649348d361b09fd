"""The streamed prefill's machinery (offload.stream) on the CPU: runs of consecutive experts, the mmap tier's bounce
pieces, the two staging buffers; and the sizes and rates of offload.chunking."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.formats.gguf import GGUFTensor
from hybridmoe.offload import chunking
from hybridmoe.offload.quant_store import QuantStore
from hybridmoe.offload.stream import Bounce, LayerStream, runs
from hybridmoe.quant import get_format, random_blocks

D, I, E = 256, 256, 6
TYPES = {0: (T.Q4_K, T.Q4_K, T.Q8_0), 1: (T.Q8_0, T.Q8_0, T.Q8_0)}  # layer 0's rows are narrower than layer 1's


def layers() -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for layer, types in TYPES.items():
        parts = []
        for q, (rows, cols) in zip(types, ((I, D), (I, D), (D, I))):
            raw = random_blocks(q, E * rows * cols // get_format(q).block_size, rng).reshape(E, rows, -1)
            parts.append(GGUFTensor(f"{layer}.{q.name}", None, q, (E, rows, cols), raw))
        out[layer] = tuple(parts)
    return out


LAYERS = layers()


def parts_of(store: QuantStore, rows: torch.Tensor, layer: int) -> list[bytes]:
    """The gate, up and down bytes of each staged row (the padding between them is never read)."""
    lay = store.layouts[layer]
    return [bytes(r[off:off + size].numpy()) for r in rows for off, size in zip(lay.offsets, lay.sizes)]


@pytest.mark.parametrize("experts,want", [([], []), ([3], [(0, 3, 1)]), ([0, 1, 2, 5], [(0, 0, 3), (3, 5, 1)]),
                                          ([1, 3, 4, 6, 7, 8], [(0, 1, 1), (1, 3, 2), (3, 6, 3)])])
def test_consecutive_experts_go_as_one_copy(experts, want):
    assert runs(experts) == want


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("piece_rows", [1, 2, 10])
def test_the_mmap_tier_through_bounce_pieces_stages_the_pinned_tiers_bytes(layer, piece_rows):
    pinned, mmap = QuantStore(LAYERS, "pinned"), QuantStore(LAYERS, "mmap")
    row = mmap.layouts[layer].nbytes
    bounce = Bounce(piece_rows * row + 7, n=2, pin=False)  # a piece holds piece_rows rows, not one more
    want, got = pinned.new_staging(E, torch.device("cpu")), mmap.new_staging(E, torch.device("cpu"))
    assert pinned.copy_experts(want, 1, layer, 2, 4) == mmap.copy_experts(got, 1, layer, 2, 4, bounce) > 0
    assert parts_of(mmap, mmap.staged(got, layer)[1:5], layer) == parts_of(pinned, pinned.staged(want, layer)[1:5],
                                                                           layer)
    one = torch.zeros(pinned.slot_nbytes(), dtype=torch.uint8)[None]
    pinned.copy_to_slot(one, 0, layer, 4)
    assert parts_of(pinned, one[:, :row], layer) == parts_of(mmap, mmap.staged(got, layer)[3:4], layer)
    assert bounce.next == -(-4 // piece_rows) % 2  # one piece per piece_rows rows, round robin


def test_staging_buffers_alternate_and_remember_what_they_hold():
    store = QuantStore(LAYERS, "pinned")
    stream = LayerStream(store, torch.device("cpu"), rows=4)
    assert stream.load(0, [0, 1, 3])[0] == 0 and stream.held(0) == {0: 0, 1: 0, 3: 0}
    assert stream.load(1, [2, 3, 4, 5])[0] == 1 and stream.held(1) == dict.fromkeys([2, 3, 4, 5], 1)
    assert stream.held(0) == {0: 0, 1: 0, 3: 0}  # still there: the next load goes to the other buffer
    stream.load(1, [0])
    assert stream.held(0) == {} and stream.held(1) == {2: 1, 3: 1, 4: 1, 5: 1, 0: 0}
    assert stream.ahead(1, [2, 4]) == ([], 0)  # already on the device
    with pytest.raises(ValueError, match="5 experts for a staging buffer of 4 rows"):
        stream.load(0, [0, 1, 2, 3, 4])


GiB = 1 << 30
QWEN = dict(per_token=chunking.activation_bytes_per_token(2048, 768, 8), slot_bytes=2_654_208, layer_experts=128,
            stage_experts=48 * 128)


def test_a_gpu_that_holds_every_expert_keeps_no_staging():
    sizes = chunking.size_prefill(40 * GiB, context=32768, **QWEN)
    assert (sizes.slots, sizes.staging_rows, sizes.staging_bytes) == (48 * 128, 0, 0)
    assert sizes.chunk == chunking.MAX_CHUNK  # 8192 tokens' activations are a fraction of 40 GiB


def test_staging_takes_a_layer_per_buffer_and_the_cache_the_rest():
    room = 8 * GiB
    sizes = chunking.size_prefill(room, context=4096, **QWEN)
    assert sizes.chunk == 4096  # the context bounds it
    assert sizes.staging_rows == 128 and sizes.staging_bytes == 2 * 128 * QWEN["slot_bytes"]
    assert sizes.activation_bytes == (4096 - 512) * QWEN["per_token"]  # the fixed reserve holds 512 tokens'
    assert sizes.slots == (room - sizes.activation_bytes - sizes.staging_bytes) // QWEN["slot_bytes"]
    capped = chunking.size_prefill(room, context=4096, max_slots=0, **QWEN)
    assert capped.slots == 0 and capped.staging_rows == 128


def test_little_vram_gives_fewer_rows_and_the_smallest_chunk():
    sizes = chunking.size_prefill(GiB // 4, context=65536, **QWEN)
    assert sizes.chunk == chunking.MIN_CHUNK and sizes.activation_bytes == 0
    assert sizes.staging_rows == int(GiB / 16) // (2 * QWEN["slot_bytes"]) < 128
    assert chunking.size_prefill(-5, context=4096, **QWEN).slots == 0


def test_predicted_prefill_is_bound_by_the_copies_or_the_compute():
    lay = chunking.ExpertLayer(experts=128, nbytes=340_000_000, cached=0.0)
    # 4096 tokens use every expert (1 - (1 - 8/128)^4096 is 1 to float precision): 48 layers of 340 MB at 54 GB/s
    rate = chunking.predicted_prefill_tok_s(4096, 4096, [lay] * 48, 8, 6 * 2048 * 768, 54e9, 400e12)
    assert rate == pytest.approx(4096 / (48 * 340e6 / 54e9))
    half = chunking.predicted_prefill_tok_s(4096, 4096, [chunking.ExpertLayer(128, 340_000_000, 0.5)] * 48, 8,
                                            6 * 2048 * 768, 54e9, 400e12)
    assert half == pytest.approx(2 * rate)
    # two chunks of 2048 copy every expert twice
    assert chunking.predicted_prefill_tok_s(4096, 2048, [lay] * 48, 8, 6 * 2048 * 768, 54e9, 400e12) == \
        pytest.approx(rate / 2)
    # a slow GPU: the compute bounds it
    slow = chunking.predicted_prefill_tok_s(4096, 4096, [lay] * 48, 8, 6 * 2048 * 768, 54e9, 1e12)
    assert slow == pytest.approx(4096 / (48 * 4096 * 8 * 6 * 2048 * 768 / 1e12))


def test_plan_sizes_prefill_and_predicts_its_rate_from_the_copies():
    """`plan`: with experts that do not fit, each GPU keeps two staging buffers and a chunk sized from its VRAM,
    and the predicted rate for a long prompt follows the PCIe rate where the copies bound it."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from hybridmoe.offload.plan import GPU, Hardware, PlanOptions, footprint_from_config, make_plan
    cfg = json.loads((Path(__file__).parent.parent / "cli" / "data" / "deepseek_v3_config.json").read_text())
    fp = footprint_from_config(cfg, weight_bytes=8.5 / 8, expert_bytes=4.5 / 8)
    hw = Hardware(tuple(GPU("RTX 6000 Ada", 48 * GiB, 47 * GiB) for _ in range(2)), 512 * GiB, 500 * GiB, 32,
                  h2d_bytes_per_s=25e9, gpu_flops=300e12)
    plan = make_plan(fp, hw, PlanOptions(context=16384))
    assert plan.fits and plan.prefill_chunk in (1024, 2048, 4096, 8192)
    for d in plan.devices:
        assert 0 < d.staging_rows <= 256 and d.prefill_chunk >= plan.prefill_chunk and d.bytes_prefill > 0
    assert set(plan.prefill_tok_s) == {512, 4096, 8192}
    assert any("prefill: chunks of" in n and "tok/s for a 8192-token prompt" in n for n in plan.notes)
    faster = make_plan(fp, replace(hw, h2d_bytes_per_s=50e9), PlanOptions(context=16384))
    assert faster.prefill_tok_s[8192] == pytest.approx(2 * plan.prefill_tok_s[8192], rel=0.05)  # copy-bound
    assert plan.to_json()["prefill_tok_s"]
