"""The disk tier (offload.disk): a GGUF whose experts exceed the memory budget decodes exactly as from RAM, its most
used experts locked in RAM and the rest read from disk ahead of need; under a real memory cgroup limit when the tests
run as root."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hybridmoe
import tiny
from hybridmoe.errors import ConfigError
from hybridmoe.models import synthetic
from hybridmoe.models import gguf_loader
from hybridmoe.offload import disk
from hybridmoe.offload.plan import GPU, Hardware, PlanOptions, footprint_from_gguf, make_plan
from hybridmoe.offload.popularity import read_popularity, write_popularity

IDS = list(range(10, 34))
TIGHT = 16 << 20  # a budget far below the model's 58 MiB (and what the process holds), above its 5 MiB of other weights
ROOT = Path(__file__).resolve().parents[2]
# Qwen3-MoE with 64 experts of 256 per layer (Q4_K): 14 MiB of experts per layer.
CONFIG = dict(model_type="qwen3_moe", vocab_size=384, hidden_size=512, intermediate_size=1024,
              moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=128, num_experts=64, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
              rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    tiny.write_tokenizer(root)
    return synthetic.write(CONFIG, root / "m.gguf", root)


@pytest.fixture(scope="module")
def reference(gguf):
    eng = hybridmoe.load(gguf)
    assert eng.model.experts.disk is None  # 56 MiB of experts fit in RAM: no disk tier
    events = list(eng.generate(IDS[:5], temperature=0, max_tokens=10, ignore_eos=True))
    return eng.logits(IDS), events[-1].token_ids


def test_loading_dequantizes_no_weight_that_stays_quantized(gguf, monkeypatch):
    """The CPU keeps attention's GGUF blocks (QuantLinear): loading must not first make f32 copies of them, which
    would need several times the memory that running does."""
    seen = []
    real = gguf_loader.dequantize_tensor
    monkeypatch.setattr(gguf_loader, "dequantize_tensor", lambda t, *a: seen.append(t.name) or real(t, *a))
    eng = hybridmoe.load(gguf)
    quantized = [n for n, m in eng.model.named_modules() if type(m).__name__ == "QuantLinear"]
    assert quantized and seen
    assert not [n for n in seen if n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                               "attn_output.weight"))]


def test_expert_ranges_are_the_file_bytes_of_each_expert(gguf):
    eng = hybridmoe.load(gguf)
    store = eng.model.experts.store
    ranges = disk.ExpertRanges(store.layers)
    with open(gguf, "rb") as f:
        for layer, e in ((0, 0), (2, 63), (3, 17)):
            fds, offsets, sizes, addrs = ranges.spans(layer, [e])
            for proj, (off, size, addr) in enumerate(zip(offsets, sizes, addrs)):
                f.seek(int(off))
                raw = store.layers[layer][proj].raw[e]
                assert f.read(int(size)) == raw.tobytes() and addr == raw.ctypes.data
    assert ranges.expert_nbytes(0) == sum(t.raw[0].nbytes for t in store.layers[0])


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_disk_tier_changes_no_result(gguf, reference, prefetch):
    """A budget far below the model: every expert goes through the tier's reads (decode awaits a layer's, prefill
    streams them within the window); logits and greedy tokens are bit-identical to the run from RAM."""
    logits, tokens = reference
    eng = hybridmoe.load(gguf, memory_budget=TIGHT, prefetch=prefetch)
    tier = eng.model.experts.disk
    assert tier is not None and tier.plan.pin == 0 and not tier.plan.fits
    assert torch.equal(eng.logits(IDS), logits)
    events = list(eng.generate(IDS[:5], temperature=0, max_tokens=10, ignore_eos=True))
    assert events[-1].token_ids == tokens
    notices = [e.message for e in events if isinstance(e, hybridmoe.Notice)]
    stats = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
    served = sum(s["experts_in_memory"] + s["experts_read_ahead"] + s["experts_waited"] for s in stats)
    assert served == sum(len(c) for s in stats for c in s["expert_tokens"].values())
    assert all("disk_bytes" in s for s in stats) and ("prefetch_recall" in stats[-1]) == prefetch
    assert len([n for n in notices if "exceed the memory budget" in n]) == 1


def test_reads_are_asked_for_and_stay_within_the_window(gguf):
    eng = hybridmoe.load(gguf, memory_budget=TIGHT)
    tier = eng.model.experts.disk
    eng.logits(IDS[:3])
    tier.predict(1, list(range(64)))  # a wide prediction: only a window's worth is read ahead
    assert 0 < tier.ahead <= tier.plan.window
    for job in list(tier.jobs.values()):
        assert job.done.wait(30) and job.error is None
    with tier.reader.lock:
        tier._use_others(2, set())  # layer 2 starts: the prediction for layer 1 is done with
    assert not tier.jobs and tier.ahead == 0


def test_used_experts_leave_memory(gguf, tmp_path):
    """Under the tier the page cache holds the pinned experts and the reads in flight, not what has been used: each
    layer's experts are dropped once it has run (else the page cache fills the budget, and every read waits for
    the kernel to reclaim memory)."""
    copy = _uncached_copy(gguf, tmp_path)
    eng = hybridmoe.load(copy, memory_budget=TIGHT)
    events = list(eng.generate(IDS[:12], temperature=0, max_tokens=6, ignore_eos=True))
    tier = eng.model.experts.disk
    routed = {(layer, e) for ev in events if isinstance(ev, hybridmoe.Stats)
              for layer, c in ev.extra["expert_tokens"].items() for e in c}
    for _ in range(100):  # the reader threads drop them
        if not tier.reader.queue:
            break
        time.sleep(0.05)
    time.sleep(0.2)

    def in_memory(layer: int, e: int) -> bool:
        _, _, sizes, addrs = tier.ranges.spans(layer, [e])
        return tier._resident(addrs, sizes, tier._vec)
    resident = [k for k in routed if in_memory(*k)]
    assert len(routed) > 100 and len(resident) <= 2 * (4 + 2), resident  # two layers' (k + margin) at most


def _uncached_copy(gguf: Path, tmp_path: Path) -> Path:
    """A copy of the file that no engine of this process maps, its pages dropped from the page cache."""
    copy = tmp_path / "m.gguf"
    copy.write_bytes(gguf.read_bytes())
    fd = os.open(copy, os.O_RDONLY)
    os.fsync(fd)  # dirty pages are not dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return copy


def test_a_budget_below_the_other_weights_is_a_one_line_error(gguf, capsys):
    with pytest.raises(ConfigError, match=r"--memory-budget 1 B: below the model's weights besides the routed "
                                          r"experts \(4.1 MiB\) plus the reads in flight \(2.5 MiB\); give at least"):
        hybridmoe.load(gguf, memory_budget=1)
    from hybridmoe.cli import main
    capsys.readouterr()
    code = main(["generate", str(gguf), "--device", "cpu", "--memory-budget", "1MiB", "-p", "Hello", "-n", "2"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: --memory-budget 1.0 MiB: below"), err


def test_a_read_error_stops_generation_with_one_line(gguf, tmp_path):
    """A failed pread (here EBADF from a write-only descriptor, as EIO from a failing disk) ends the generation
    with an Error event that names the file and the cause, before any kernel touches the pages."""
    copy = _uncached_copy(gguf, tmp_path)
    eng = hybridmoe.load(copy, memory_budget=TIGHT)
    reader = eng.model.experts.disk.reader
    good = reader.fds
    reader.fds = [os.open(copy, os.O_WRONLY)]
    os.close(good[0])
    events = list(eng.generate(IDS[:5], temperature=0, max_tokens=4, ignore_eos=True))
    errors = [e.message for e in events if isinstance(e, hybridmoe.Error)]
    assert len(errors) == 1 and events[-1].reason == "error", events
    assert errors[0].startswith(f"{copy}: reading expert ") and "Bad file descriptor" in errors[0]
    assert "\n" not in errors[0]


TRUNCATE = """
import os, sys
import hybridmoe
path = sys.argv[1]
eng = hybridmoe.load(path, memory_budget=16 << 20)
os.truncate(path, os.path.getsize(path) - (20 << 20))  # the last layer's experts and some of the one before
events = list(eng.generate(list(range(10, 15)), temperature=0, max_tokens=4, ignore_eos=True))
print([e.message for e in events if isinstance(e, hybridmoe.Error)])
"""


def test_a_file_truncated_while_in_use_is_a_one_line_error(gguf, tmp_path):
    """The file shrinks under a running engine: the tier's read meets its end and the generation ends with an
    Error event, where touching the missing pages would kill the process (SIGBUS). In a child process, so that a
    regression kills the child rather than the test run."""
    copy = _uncached_copy(gguf, tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", TRUNCATE, str(copy)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    errors = eval(p.stdout.strip().splitlines()[-1])
    assert len(errors) == 1 and "it was truncated or replaced while in use" in errors[0], errors
    assert errors[0].startswith(f"{copy}: reading expert ")


def test_the_resident_set_is_the_most_used_experts(gguf, reference, tmp_path):
    """load_popularity locks the most used experts in RAM (as many as the budget's pin share holds), they count as
    served from memory, and results do not change."""
    eng = hybridmoe.load(gguf, memory_budget=TIGHT)
    tier = eng.model.experts.disk
    size = tier.ranges.expert_nbytes(0)
    tier.plan.pin = 5 * size  # room for five experts
    counts = {(layer, e): 1 + (e * 7 + layer) % 13 for layer in range(4) for e in range(64)}
    pop = tmp_path / "pop.json"
    write_popularity(pop, counts)
    pinned = tier.load_popularity(pop)
    if tier.pin_refused:
        pytest.skip("mlock is refused here (RLIMIT_MEMLOCK)")
    top = sorted(counts, key=lambda k: (-counts[k], -k[0], -k[1]))[:5]
    assert pinned == 5 and tier.pinned == set(top)
    for layer, e in top:
        _, _, sizes, addrs = tier.ranges.spans(layer, [e])
        assert tier._resident(addrs, sizes, tier._vec)
    assert torch.equal(eng.logits(IDS), reference[0])
    tier.save_popularity(tmp_path / "again.json")
    again = read_popularity(tmp_path / "again.json")
    assert all(again[k] >= counts[k] for k in counts)
    tier.plan.pin = 0
    tier._repin()
    assert tier.pinned == set()
    with pytest.raises(ConfigError, match="not an expert popularity file"):
        tier.load_popularity(gguf)


def test_budget_comes_from_the_cgroup_limit(tmp_path):
    proc = tmp_path / "cgroup"
    v1 = tmp_path / "fs" / "memory" / "a" / "b"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit here ...
    (v1.parent / "memory.limit_in_bytes").write_text(str(3 << 30))  # ... but its parent's
    proc.write_text("9:name=systemd:/\n4:memory:/a/b\n0::/\n")
    assert disk.cgroup_memory_limit(str(proc), str(tmp_path / "fs")) == 3 << 30
    v2 = tmp_path / "v2"
    (v2 / "x").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory io\n")
    (v2 / "x" / "memory.max").write_text("max\n")
    (v2 / "memory.max").write_text(str(5 << 30))
    proc.write_text("0::/x\n")
    assert disk.cgroup_memory_limit(str(proc), str(v2)) == 5 << 30
    (v2 / "memory.max").write_text("max\n")
    assert disk.cgroup_memory_limit(str(proc), str(v2)) is None
    assert disk.memory_budget(123) == 123
    with pytest.raises(ConfigError, match="--memory-budget"):
        hybridmoe.load(tmp_path / "none.gguf", memory_budget=0)


def test_plan_shows_the_disk_tier(gguf):
    fp = footprint_from_gguf(gguf, weight_bytes=4)
    mmap = PlanOptions(experts_tier="mmap")
    plan = make_plan(fp, Hardware((), 1 << 30, 300 << 20, 2, disk_read_bytes_per_s=1e9), mmap)
    d = plan.experts["disk"]  # 300 MiB of RAM, 256 MiB kept free, the other weights: 56 MiB of experts do not fit
    assert plan.experts["tier"] == "mmap" and 0 < d["resident_bytes"] < fp.expert_host_total
    assert 0 < d["read_per_token"] < 4 * 4 * fp.expert_host_bytes and d["decode_tok_s"] > 0
    assert any("disk tier" in n for n in plan.notes)
    faster = make_plan(fp, Hardware((), 1 << 30, 300 << 20, 2, disk_read_bytes_per_s=4e9), mmap).experts["disk"]
    assert faster["decode_tok_s"] > d["decode_tok_s"]
    assert "disk" not in make_plan(fp, Hardware((), 1 << 30, 1 << 30, 2), mmap).experts
    assert "disk" not in make_plan(fp, Hardware((GPU("g", 8 << 30, 8 << 30),), 16 << 30, 15 << 30, 2)).experts


def test_monitor_and_repl_show_disk_reads():
    from hybridmoe_tui.stats import MonitorState
    s = MonitorState()
    assert s.disk_gb_s is None and s.memory_share is None
    s.push(hybridmoe.Stats("decode", 1, 4, 10.0, 1.0, 1.0, {}))
    s.push(hybridmoe.Stats("decode", 2, 4, 10.0, 1.0, 1.5, {"disk_bytes": 1e9, "experts_in_memory": 3,
                                                            "experts_read_ahead": 4, "experts_waited": 1}))
    assert s.disk_gb_s == pytest.approx(2.0) and s.memory_share == pytest.approx(3 / 8)


CHILD = """
import json, os, sys
from pathlib import Path
if sys.argv[2] != "-":
    Path(sys.argv[2]).write_text(str(os.getpid()))  # before anything is loaded: all of it counts
import numpy as np, torch, hybridmoe
from hybridmoe.offload import disk
disk._kernels()  # compiled in both runs, so that the unlimited run's memory includes the compiler's
eng = hybridmoe.load(sys.argv[1])
tier = eng.model.experts.disk
logits = eng.logits(list(range(10, 34)))
events = list(eng.generate(list(range(10, 15)), temperature=0, max_tokens=8, ignore_eos=True))
read = sum(e.extra.get("disk_bytes", 0) for e in events if isinstance(e, hybridmoe.Stats))
np.save(sys.argv[3], logits.numpy())
print(json.dumps({"tier": tier is not None, "tokens": list(events[-1].token_ids), "anon": disk.anon_bytes(),
                  "limit": disk.cgroup_memory_limit(), "read": read}))
"""


def _memory_cgroup() -> Path | None:
    """Where a child memory cgroup of this process's can be made (cgroup v1), or None."""
    if os.geteuid() != 0:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return base if os.access(base, os.W_OK) else None
    return None


@pytest.mark.skipif(_memory_cgroup() is None, reason="needs root and a writable cgroup v1 memory controller")
def test_decoding_under_a_tight_memory_cgroup_matches_the_unlimited_run(gguf, tmp_path):
    """Run as root: a child process in a memory cgroup whose limit leaves the page cache less than half of the
    experts finds its budget in the cgroup, uses the disk tier, reads from disk, and gets the unlimited run's
    logits and tokens bit for bit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    copy = tmp_path / "m.gguf"  # a file no engine of this process maps, so that its pages can be dropped
    copy.write_bytes(gguf.read_bytes())
    gguf = copy

    def child(procs: str, out: Path) -> dict:
        p = subprocess.run([sys.executable, "-c", CHILD, str(gguf), procs, str(out)], env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    free = child("-", tmp_path / "free.npy")
    assert not free["tier"]
    group = _memory_cgroup() / f"hybridmoe-test-{os.getpid()}"
    group.mkdir()
    try:
        experts = 4 * 14 << 20
        (group / "memory.limit_in_bytes").write_text(str(free["anon"] + experts // 3))
        fd = os.open(gguf, os.O_RDONLY)
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        tight = child(str(group / "cgroup.procs"), tmp_path / "tight.npy")
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    assert free["anon"] < tight["limit"] <= free["anon"] + experts // 3 and tight["tier"]
    assert failcnt > 0 and tight["read"] > 0, (free, tight, failcnt)  # the limit was reached, experts read
    assert tight["tokens"] == free["tokens"]
    assert np.array_equal(np.load(tmp_path / "tight.npy"), np.load(tmp_path / "free.npy"))
