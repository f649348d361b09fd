"""`hybridmoe bench` on a tiny model with the offload engine simulated on the CPU."""
import json

import hybridmoe
from hybridmoe.cli import main
from hybridmoe.engine.bench import BenchOptions, format_table, run_bench


def test_bench_table_with_cache_and_prefetch_columns(capsys, tiny_models):
    path = tiny_models("deepseek_v3")
    capsys.readouterr()
    code = main(["bench", str(path), "--accelerator", "cpu", "--devices", "2", "--expert-cache-slots", "4",
                 "-p", "16", "-n", "6", "-r", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0] and "cache hit" in lines[0]
    assert "prefetch recall" in lines[0] and set(lines[1]) <= set("|-: ")
    assert len(lines) == 4 and "pp16" in lines[2] and "tg6" in lines[3]
    assert "±" in lines[3] and "simulated GPUs" in lines[3] and "%" in lines[3]
    assert "repetition 2/2" in err


def test_bench_json_is_valid_and_counts_repetitions(capsys, tiny_models):
    path = tiny_models("deepseek_v3")
    capsys.readouterr()
    assert main(["bench", str(path), "--accelerator", "cpu", "--expert-cache-slots", "4", "-p", "8,16", "-n", "4",
                 "-r", "3", "--json", "--no-warmup"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in res] == ["pp8", "pp16", "tg4"]
    for r in res:
        assert len(r["samples"]) == 3 and r["t_s"] > 0 and r["t_s_std"] >= 0
        assert r["params"] > 0 and r["size_bytes"] > 0 and r["devices"] == 1
        assert 0 <= r["cache_hit_rate"] <= 1
    assert res[-1]["prefetch_recall"] is not None


def test_bench_plain_cpu_engine_and_errors(capsys, tiny_models):
    engine = hybridmoe.load(tiny_models("qwen3_moe"))
    res = run_bench(engine, BenchOptions((0,), (5,), 1, warmup=False))
    assert res[0].test == "tg5" and res[0].cache_hit_rate is None and res[0].backend == "CPU"
    cells = [c.strip() for c in format_table(res).splitlines()[2].strip("| ").split("|")]
    assert cells[-2:] == ["-", "-"]  # no offload engine: no cache hit rate or prefetch recall
    capsys.readouterr()
    assert main(["bench", str(tiny_models("qwen3_moe")), "-p", "100000", "-n", "0"]) == 1
    assert "context" in capsys.readouterr().err
    assert main(["bench", str(tiny_models("qwen3_moe")), "-p", "0", "-n", "0"]) == 2
    assert main(["bench", str(tiny_models("qwen3_moe")), "-p", "x"]) == 1
