"""The persistent pool that runs decode layers' CPU experts when a stream rings: each of its threads computes a share
of a layer, so the results must be the bits `ffn_raw_int8` gives (itself checked against the float64 reference in
test_cpu_raw_int8), for any number of threads, layer after layer, in both modes."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from hybridmoe.kernels import cpu
from hybridmoe.kernels.cpu import host_pool, host_task, raw_int8

from test_cpu_int8 import expert_weights

TYPES = [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0, T.Q8_0)]


def pool_block(rng, raws, types, ids, dim, inter, mode=host_task.SUM, slots=None):
    k = len(ids)
    x = rng.standard_normal((1, dim)).astype(np.float32)
    w = rng.random((1, k)).astype(np.float32)
    out = np.full((1 if mode == host_task.SUM else k, dim), np.nan, dtype=np.float32)
    ids = np.array([ids], dtype=np.int64)
    scratch = np.zeros((k, inter), dtype=np.float32), np.zeros((k, dim), dtype=np.float32)
    block = host_task.fill_block(host_task.new_block(), x=x, ids=ids, weights=w, out=out, gate=raws[0], up=raws[1],
                                 down=raws[2], kinds=tuple(raw_int8.KIND[t] for t in types), mode=mode, slots=slots,
                                 h=scratch[0], y=scratch[1])
    return block, (x, ids, w, out, scratch)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("types", TYPES, ids=lambda t: t[0].name)
def test_pool_gives_the_bits_of_ffn_raw_int8(types, workers):
    rng = np.random.default_rng(workers)
    pool = host_pool.HostPool(workers)
    try:
        layers = []
        for _ in range(2):  # two layers rung in turn, as a decode step rings them
            raws, _ = expert_weights(rng, 6, 256, 512, types)
            block, bufs = pool_block(rng, raws, types, [4, 0, 5], 256, 512)
            layers.append((raws, block, bufs, pool.add(block)))
        for step in range(3):
            for raws, block, (x, ids, w, out, _), value in layers:
                x[:] = rng.standard_normal(x.shape)  # the block reads its buffers at every run
                ids[0] = rng.choice(6, 3, replace=False)
                out[:] = np.nan
                pool.run(value)
                assert np.array_equal(out, cpu.ffn_raw_int8(x, *raws, types, list(ids[0]), w))
                assert block[host_task.RUNS] == step + 1
                assert block[host_task.ENDED] >= block[host_task.STARTED] > 0
    finally:
        pool.stop()
    assert not any(t.is_alive() for t in pool.threads)


@pytest.mark.parametrize("workers", [1, 3])
def test_pool_parts_mode_computes_only_the_uncached_experts(workers):
    types = TYPES[0]
    rng = np.random.default_rng(7)
    raws, _ = expert_weights(rng, 8, 256, 256, types)
    slots = np.full(8, -1, dtype=np.int32)
    slots[[2, 0]] = [3, 1]  # experts 2 and 0 sit in GPU slots
    block, (x, ids, w, parts, _) = pool_block(rng, raws, types, [7, 2, 5, 0], 256, 256, host_task.PARTS, slots)
    pool = host_pool.HostPool(workers)
    try:
        pool.run(pool.add(block))
        each = cpu.ffn_raw_int8(x, *raws, types, [7, 2, 5, 0])
        assert np.array_equal(parts[[0, 2]], each[[0, 2], 0])
        assert np.isnan(parts[[1, 3]]).all()  # left for the GPU
        slots[:] = 0  # every expert in a slot: the pool computes nothing and still finishes
        parts[:] = np.nan
        pool.run(1)
        assert np.isnan(parts).all()
    finally:
        pool.stop()


def test_pool_refuses_blocks_without_scratch():
    types = TYPES[0]
    rng = np.random.default_rng(3)
    raws, _ = expert_weights(rng, 2, 256, 256, types)
    x = np.zeros((1, 256), dtype=np.float32)
    block = host_task.fill_block(host_task.new_block(), x=x, ids=np.zeros((1, 1), dtype=np.int64),
                                 weights=np.ones((1, 1), dtype=np.float32), out=np.zeros((1, 256), np.float32),
                                 gate=raws[0], up=raws[1], down=raws[2], kinds=(2, 2, 4))
    pool = host_pool.HostPool(1)
    try:
        with pytest.raises(ValueError, match="scratch"):
            pool.add(block)
    finally:
        pool.stop()
    with pytest.raises(ValueError, match="at least one"):
        host_pool.HostPool(0)
