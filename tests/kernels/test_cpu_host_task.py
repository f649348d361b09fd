"""A layer's decode experts as a C-callable task (what a CUDA graph's host node runs, on a thread of its own, without
the GIL): the same bits as `ffn_raw_int8`, which test_cpu_raw_int8 checks against the float64 reference."""
import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels import cpu
from hybridmoe.kernels.cpu import host_task, raw_int8

from test_cpu_int8 import expert_weights, ffn_reference, rounded

TYPES = [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0, T.Q8_0), (T.Q2_K, T.Q2_K, T.Q3_K)]


def buffers(rng, dim: int, ids: list[int], rows: int):
    x = rng.standard_normal((1, dim)).astype(np.float32)
    w = rng.random((1, len(ids))).astype(np.float32)
    return x, np.array([ids], dtype=np.int64), w, np.full((rows, dim), np.nan, dtype=np.float32)


@pytest.mark.parametrize("types", TYPES, ids=lambda t: t[0].name)
def test_sum_task_gives_the_bits_of_ffn_raw_int8_from_another_thread(types):
    rng = np.random.default_rng(0)
    raws, floats = expert_weights(rng, 6, 256, 256, types)
    x, ids, w, out = buffers(rng, 256, [4, 0, 5], 1)
    block = host_task.fill_block(host_task.new_block(), x=x, ids=ids, weights=w, out=out, gate=raws[0], up=raws[1],
                                 down=raws[2], kinds=tuple(raw_int8.KIND[t] for t in types), threads=1)
    runner = threading.Thread(target=host_task.run, args=(block,))
    runner.start()
    runner.join()
    assert block[host_task.RUNS] == 1
    assert 0 < block[host_task.ENDED] - block[host_task.STARTED] == block[host_task.CYCLES]
    assert np.array_equal(out, cpu.ffn_raw_int8(x, *raws, types, [4, 0, 5], w))
    # and near the float64 reference of the same experts on the rounded activations
    want = sum(w[0, g] * ffn_reference(x, *(f[e] for f in floats), rounding=rounded)
               for g, e in enumerate([4, 0, 5]))
    assert np.abs(out - want).max() / np.abs(want).max() < 2e-2
    x[:] = rng.standard_normal(x.shape)  # the block reads its buffers at every run
    ids[0] = [1, 2, 3]
    host_task.run(block)
    assert block[host_task.RUNS] == 2
    assert np.array_equal(out, cpu.ffn_raw_int8(x, *raws, types, [1, 2, 3], w))
    host_task.fill_block(block, x=x, ids=ids, weights=w, out=out, gate=raws[0], up=raws[1], down=raws[2],
                         kinds=tuple(raw_int8.KIND[t] for t in types), threads=1, chunk=2)  # dynamic split
    out[:] = np.nan
    host_task.run(block)
    assert np.array_equal(out, cpu.ffn_raw_int8(x, *raws, types, [1, 2, 3], w))


def test_cycle_counter_runs_at_a_plausible_rate():
    rate = host_task.cycles_per_second()
    assert 1e8 < rate < 1e10


def test_parts_task_computes_only_the_uncached_experts():
    types = TYPES[0]
    rng = np.random.default_rng(1)
    raws, _ = expert_weights(rng, 8, 256, 256, types)
    x, ids, w, parts = buffers(rng, 256, [7, 2, 5, 0], 4)
    slots = np.full(8, -1, dtype=np.int32)
    slots[[2, 0]] = [3, 1]  # experts 2 and 0 sit in GPU slots
    block = host_task.fill_block(host_task.new_block(), x=x, ids=ids, weights=w, out=parts, gate=raws[0],
                                 up=raws[1], down=raws[2], kinds=tuple(raw_int8.KIND[t] for t in types),
                                 mode=host_task.PARTS, slots=slots)
    host_task.run(block)
    each = cpu.ffn_raw_int8(x, *raws, types, [7, 2, 5, 0])
    assert np.array_equal(parts[[0, 2]], each[[0, 2], 0])
    assert np.isnan(parts[[1, 3]]).all()  # left for the GPU


def test_blocks_refuse_buffers_that_do_not_fit():
    types = TYPES[0]
    rng = np.random.default_rng(2)
    raws, _ = expert_weights(rng, 2, 256, 256, types)
    x, ids, w, out = buffers(rng, 256, [1, 0], 1)
    kinds = tuple(raw_int8.KIND[t] for t in types)
    with pytest.raises(ValueError, match="out must be"):
        host_task.fill_block(host_task.new_block(), x=x, ids=ids, weights=w, out=out[:, :128].copy(), gate=raws[0],
                             up=raws[1], down=raws[2], kinds=kinds)
    with pytest.raises(ValueError, match="ids must be"):
        host_task.fill_block(host_task.new_block(), x=x, ids=ids.astype(np.int32), weights=w, out=out,
                             gate=raws[0], up=raws[1], down=raws[2], kinds=kinds)
    with pytest.raises(ValueError, match="down must be"):
        host_task.fill_block(host_task.new_block(), x=x, ids=ids, weights=w, out=out, gate=raws[0], up=raws[1],
                             down=raws[2][:, :128], kinds=kinds)
    with pytest.raises(ValueError, match="task block"):
        host_task.run(np.zeros(3, dtype=np.int64))
