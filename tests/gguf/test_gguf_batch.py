"""The batch runner over a GGUF file's experts: rows decoded together give the greedy tokens of the plain CPU engine
(tested against llama.cpp elsewhere), with the experts in the CPU kernels, or offloaded to the CPU standing in for
a GPU (part of them cached, prefill streamed as CUDA runs it, the CPU taking a share)."""
import pytest

import hybridmoe
from hybridmoe.engine.batch import BatchEngine
from hybridmoe.engine.scheduler import SchedulerConfig
from hybridmoe.offload.scheduler import CostModel

PROMPTS = [list(range(30, 52)), [7, 8, 9], list(range(100, 117)), [40, 41, 42, 43, 44, 45]]
SPLIT = CostModel(cpu_bytes_per_s=1e9, cpu_flops=2e10, h2d_bytes_per_s=1e9)  # the CPU takes a share of the copies


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("offload", ["cpu-kernels", "slots", "streamed"])
def test_batched_greedy_tokens_equal_the_plain_engine_alone(gguf_models, monkeypatch, family, offload):
    _, path = gguf_models(family, "q4_k_m")
    ref = hybridmoe.load(path)
    alone = [list(ref.generate(p, temperature=0, max_tokens=10, ignore_eos=True))[-1].token_ids for p in PROMPTS]
    engine = ref if offload == "cpu-kernels" else hybridmoe.load(path, accelerator="cpu", expert_cache_slots=3,
                                                                   cost_model=SPLIT)
    streamed = []
    if offload == "streamed":  # the flag that makes CUDA's prefill grouped and streamed (offload.stream)
        experts = engine.model.experts.experts
        for dev in experts.stages:
            dev.grouped_prefill = True
        start = experts._start_streamed
        monkeypatch.setattr(experts, "_start_streamed", lambda *a: streamed.append(a[3].shape[0]) or start(*a))
    with BatchEngine(engine, SchedulerConfig(max_seqs=4, prefill_tokens=24)) as be:
        reqs = [be.submit(p, hybridmoe.GenerationConfig(temperature=0, max_tokens=10, ignore_eos=True))
                for p in PROMPTS]
        together = [list(r.events())[-1] for r in reqs]
    assert [d.token_ids for d in together] == alone
    assert be.metrics.decode_rows > be.metrics.decode_steps  # rows were decoded together
    if offload != "cpu-kernels":
        assert be.metrics.bytes_copied > 0 and be.metrics.cache_hits > 0
    if offload == "streamed":  # prompt chunks and multi-row decode steps both streamed
        assert max(streamed) > 4 and 2 in streamed
