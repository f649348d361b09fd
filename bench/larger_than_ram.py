"""A model larger than RAM: hybridmoe and llama.cpp (llama-cpp-python, its default mmap) decode and prefill the same
synthetic GGUF under one memory cgroup limit 3-4x smaller than the file, one child process at a time, alternated,
with the disk's sequential read rate measured in the same run.

The cgroup charges the page cache to the group, so the file cannot stay cached: what does not fit is read from disk,
by page faults (llama.cpp) or by hybridmoe's disk tier (its most used experts locked in RAM, the rest read ahead of
need by a few reader threads). The file has Qwen3-30B-A3B's per-layer dims (hidden 2048, 128 experts of 768, 8 per
token, routed experts Q4_K, the rest Q8_0) with fewer layers and a 384-token vocabulary; its routers' rows are scaled
by (1 + rank)^-skew (rank: a random order per layer), so that expert popularity is skewed as in real models (skew 0.2:
the top 12% of a layer's experts take ~27% of the picks, instead of 12%).

Each child joins the cgroup first, loads the model, warms up (a short prefill and two decode steps), then times a
prefill of --prefill tokens and --decode decode steps with fixed token ids (the same for both engines). Reported:
tokens/s, bytes read from disk per token (/proc/<pid>/io), the read rate during decode as a fraction of the
sequential rate (a 16 MiB pread loop over the file after posix_fadvise(DONTNEED), before each round), the cgroup's
peak usage. hybridmoe runs with its default settings (--device cpu); before the rounds, one untimed hybridmoe run on
other tokens saves the expert popularity file that the timed runs load (a previous session's, as a user has it).

    python bench/larger_than_ram.py [--limit 2.5GiB] [--layers 26] [--file /tmp/ltr.gguf] [--keep]
                                    [--prefill 32] [--decode 24] [--rounds 2] [--threads 2] [--skew 0.2]
    python bench/larger_than_ram.py --limit 0 --baseline /work/other-checkout     (no limit: from RAM, this tree
                                    against another checkout's hybridmoe, and llama.cpp)

Needs root (it creates a memory cgroup, v1 or v2) unless --limit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20
# llama.cpp repacks Q4_K weights into its own buffers by default (use_extra_bufts), a copy of the whole model in
# anonymous memory, so under a limit smaller than the model it is killed; "llama.cpp" runs with that off (its
# --no-repack), the weights then staying in the mmap. The default is tried in the first round only.
CONTENDERS = ("llama.cpp", "hybridmoe", "hybridmoe no prefetch", "llama.cpp repack")


# --- the memory cgroup ----------------------------------------------------------------------------------------------
class MemCgroup:
    """A child memory cgroup of this process's own, with a limit (v1 or v2)."""

    def __init__(self, limit: int):
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1 = [ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":", 2)[1].split(",")]
        if v1 and Path("/sys/fs/cgroup/memory").is_dir():
            self.v2, base = False, Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/")
        else:
            v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
            if not v2 or "memory" not in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split():
                raise SystemExit("no memory cgroup controller found (v1 /sys/fs/cgroup/memory or v2 with memory)")
            self.v2, base = True, Path("/sys/fs/cgroup") / v2[0].lstrip("/")
            (base / "cgroup.subtree_control").write_text("+memory")
        self.path = base / f"hybridmoe-bench-{os.getpid()}"
        self.path.mkdir()
        self.limit = limit
        if self.v2:
            self._write("memory.max", limit)
            self._write("memory.swap.max", 0, optional=True)
        else:
            self._write("memory.limit_in_bytes", limit)
            self._write("memory.memsw.limit_in_bytes", limit, optional=True)  # no swapping around the limit

    def _write(self, name: str, value, optional: bool = False) -> None:
        try:
            (self.path / name).write_text(str(value))
        except OSError:
            if not optional:
                raise

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def reset(self) -> None:
        if not self.v2:
            self._write("memory.max_usage_in_bytes", 0, optional=True)
            self._write("memory.failcnt", 0, optional=True)

    def peak(self) -> int | None:
        text = self._read("memory.peak" if self.v2 else "memory.max_usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as e:
            print(f"note: could not remove {self.path} ({e})", file=sys.stderr)


# --- the disk ---------------------------------------------------------------------------------------------------------
def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_rate(path: Path, nbytes: int = 3 * GiB, chunk: int = 16 * MiB, max_s: float = 15.0) -> float:
    """Bytes/s of a pread loop from the file's start after dropping its pages: what the disk does sequentially."""
    drop_cache(path)
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    done, t0 = 0, time.perf_counter()
    try:
        while done < nbytes and time.perf_counter() - t0 < max_s:
            n = os.preadv(fd, [buf], done)
            if not n:
                break
            done += n
    finally:
        os.close(fd)
    rate = done / (time.perf_counter() - t0)
    drop_cache(path)
    return rate


def read_into_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MiB)
        while f.readinto(buf):
            pass


# --- the model file -------------------------------------------------------------------------------------------------
def write_model(path: Path, layers: int, skew: float) -> None:
    """Qwen3-30B-A3B per-layer dims (bench/synthetic.py), `layers` layers; router rows scaled for skewed popularity."""
    import numpy as np
    from gguf import GGUFReader
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
    import synthetic
    t0 = time.perf_counter()
    synthetic.write("qwen3_moe", path, layers)
    if skew:
        rng = np.random.default_rng(7)
        reader = GGUFReader(path, "r+")
        for t in reader.tensors:
            if t.name.endswith("ffn_gate_inp.weight"):
                data = t.data  # [E, D] float32, a writable view of the file
                rank = rng.permutation(data.shape[0])
                data *= ((1.0 + rank) ** -skew)[:, None].astype(np.float32)
        reader.data.flush()
        del reader
    print(f"wrote {path}: {path.stat().st_size / GiB:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)


# --- a child: one engine, one measurement -----------------------------------------------------------------------------
def child(spec: dict) -> dict:
    if spec.get("procs"):
        Path(spec["procs"]).write_text(str(os.getpid()))  # first: every byte from here on counts against the limit
    import numpy as np
    import psutil
    proc = psutil.Process()
    rng = np.random.default_rng(spec["seed"])
    prompt = rng.integers(8, 384, spec["prefill"]).tolist()
    feed = rng.integers(8, 384, spec["decode"]).tolist()
    warm = rng.integers(8, 384, 8).tolist()
    io = lambda: proc.io_counters().read_bytes  # noqa: E731
    t0 = time.perf_counter()
    out = {}
    if spec["engine"] == "llama.cpp":
        import llama_cpp.llama_cpp as bindings
        from llama_cpp import Llama
        if not spec.get("repack"):
            defaults = bindings.llama_model_default_params

            def no_repack():
                params = defaults()
                params.use_extra_bufts = False
                return params
            bindings.llama_model_default_params = no_repack  # Llama() takes its model parameters from here
        m = Llama(spec["path"], n_ctx=512, n_batch=max(8, spec["prefill"]), n_threads=spec["threads"],
                  n_threads_batch=spec["threads"], verbose=False)
        out["load_s"] = time.perf_counter() - t0
        m.eval(warm)
        m.eval(warm[:1])
        m.eval(warm[1:2])
        m.reset()

        def prefill():
            m.eval(prompt)

        def decode_step(tok):
            m.eval([tok])
        stats = lambda: {}  # noqa: E731
    else:
        import torch
        import hybridmoe
        from hybridmoe.kernels.cpu import set_threads
        from hybridmoe.layers.cache import Batch
        torch.set_num_threads(spec["threads"])
        set_threads(spec["threads"])
        kw = {"prefetch": False} if spec.get("no_prefetch") else {}
        eng = hybridmoe.load(spec["path"], device="cpu", **kw)
        model = eng.model
        tier = getattr(model.experts, "disk", None)
        out["disk_tier"] = tier is not None
        out["activations"] = getattr(model.experts.store, "activations", "?")
        if tier is not None and spec.get("popularity") and Path(spec["popularity"]).exists():
            out["pinned"] = tier.load_popularity(spec["popularity"])
        out["load_s"] = time.perf_counter() - t0
        cache = model.new_cache(1, 512)

        def run(tokens, start):
            return model(torch.tensor([tokens]), Batch.make([start], [len(tokens)], [0], "cpu"), cache, last_only=True)
        pos = [0]
        with torch.inference_mode():
            run(warm, 0)
            run(warm[:1], len(warm))
            run(warm[1:2], len(warm) + 1)
        model.experts.take_stats()

        def prefill():
            with torch.inference_mode():
                run(prompt, 0)
            pos[0] = len(prompt)

        def decode_step(tok):
            with torch.inference_mode():
                run([tok], pos[0])
            pos[0] += 1

        def stats():
            s = model.experts.take_stats()
            s.pop("expert_tokens", None)
            s.pop("notices", None)
            return s
    r0, t0 = io(), time.perf_counter()
    prefill()
    out["prefill_s"], out["prefill_read"] = time.perf_counter() - t0, io() - r0
    out["prefill_stats"] = stats()
    r0, t0 = io(), time.perf_counter()
    for tok in feed:
        decode_step(tok)
    out["decode_s"], out["decode_read"] = time.perf_counter() - t0, io() - r0
    out["decode_stats"] = stats()
    if spec.get("save_popularity") and out.get("disk_tier"):
        model.experts.disk.save_popularity(spec["save_popularity"])
    out["rss_anon"] = proc.memory_full_info().uss
    return out


def run_child(spec: dict, cg: MemCgroup | None, pythonpath: str) -> dict:
    if cg is not None:
        cg.reset()
        spec = spec | {"procs": cg.procs}
    env = dict(os.environ, PYTHONPATH=pythonpath)
    kills = cg.oom_kills() if cg else 0
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                       text=True, timeout=3600)
    res = {}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        res = json.loads(lines[-1])
    else:
        res["error"] = f"exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:] or ''}"
    if cg is not None:
        res["peak"] = cg.peak()
        if cg.oom_kills() > kills:
            res["error"] = f"killed by the cgroup's OOM killer (limit {cg.limit / GiB:.2f} GiB)"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", default="2.5GiB", help="memory cgroup limit (0: none, the file read from RAM)")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--skew", type=float, default=0.2, help="router row scale (1 + rank)^-skew (0: uniform)")
    ap.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "hybridmoe-larger-than-ram.gguf")
    ap.add_argument("--keep", action="store_true", help="keep the file at the end (it is written when missing)")
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each contender keeps its best")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help=f"comma-separated contenders (default: {', '.join(CONTENDERS)})")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout whose hybridmoe also runs (default contender set gains 'baseline')")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return 0
    sys.path[:0] = [str(ROOT)]
    from hybridmoe.cli import _parse_size
    limit = 0 if a.limit.strip() in ("0", "none") else _parse_size(a.limit, "--limit")
    names = [n.strip() for n in a.only.split(",")] if a.only else list(CONTENDERS)
    if a.baseline is not None:
        names.append("baseline")
    unknown = set(names) - set(CONTENDERS) - {"baseline"}
    if unknown:
        ap.error(f"--only: no contender {', '.join(sorted(unknown))} (have: {', '.join(CONTENDERS)})")
    if limit and os.geteuid() != 0:
        ap.error("a memory limit needs root (a cgroup is created); run as root or pass --limit 0")
    written = not a.file.exists()
    if written:
        write_model(a.file, a.layers, a.skew)
    size = a.file.stat().st_size
    ours_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    paths = {n: ours_path for n in names}
    if a.baseline is not None:
        paths["baseline"] = os.pathsep.join([str(a.baseline), os.environ.get("PYTHONPATH", "")])
    cg = MemCgroup(limit) if limit else None
    base = dict(path=str(a.file), prefill=a.prefill, decode=a.decode, threads=a.threads, seed=1)
    popularity = Path(tempfile.gettempdir()) / f"hybridmoe-ltr-popularity-{os.getpid()}.json"
    rates, best = [], {n: None for n in names}
    try:
        print(f"file {a.file}: {size / GiB:.2f} GiB; limit "
              f"{f'{limit / GiB:.2f} GiB ({size / limit:.1f}x smaller than the file)' if limit else 'none'}; "
              f"{a.threads} threads; prefill {a.prefill}, decode {a.decode}", flush=True)
        if limit and any(n.startswith("hybridmoe") for n in names):  # a previous session's popularity file
            drop_cache(a.file)
            got = run_child(base | {"engine": "hybridmoe", "seed": 2, "save_popularity": str(popularity)}, cg,
                            ours_path)
            print(f"popularity run: {got.get('error') or 'saved'}", flush=True)
        for r in range(a.rounds):
            rates.append(sequential_rate(a.file))
            print(f"round {r + 1}: sequential read {rates[-1] / 1e9:.2f} GB/s", flush=True)
            for name in names:
                if name == "llama.cpp repack" and r:
                    continue
                if limit:
                    drop_cache(a.file)
                else:
                    read_into_cache(a.file)
                spec = base | {"engine": "llama.cpp" if name.startswith("llama.cpp") else "hybridmoe",
                               "repack": name == "llama.cpp repack", "no_prefetch": name == "hybridmoe no prefetch",
                               "popularity": str(popularity)}
                print(f"  (load average {os.getloadavg()[0]:.1f})", end="", flush=True)
                got = run_child(spec, cg, paths[name])
                got["seq_rate"] = rates[-1]
                show(name, got, a)
                if "error" not in got and (best[name] is None or got["decode_s"] < best[name]["decode_s"]):
                    best[name] = got
        rates.append(sequential_rate(a.file))
        print(f"after the rounds: sequential read {rates[-1] / 1e9:.2f} GB/s", flush=True)
    finally:
        if cg is not None:
            cg.remove()
        popularity.unlink(missing_ok=True)
        if written and not a.keep:
            a.file.unlink(missing_ok=True)
    summary(best, rates, a)
    return 0


def show(name: str, r: dict, a) -> None:
    if "error" in r:
        print(f"  {name:<22} {r['error']}", flush=True)
        return
    d = r["decode_stats"]
    extra = ""
    if d.get("experts_in_memory") is not None:
        n = d["experts_in_memory"] + d["experts_read_ahead"] + d["experts_waited"]
        extra = (f"; experts in memory {d['experts_in_memory'] / max(n, 1):.0%}, read ahead "
                 f"{d['experts_read_ahead'] / max(n, 1):.0%}, waited {d['experts_waited'] / max(n, 1):.0%}, recall "
                 f"{d.get('prefetch_recall', float('nan')):.2f}, pinned {d.get('pinned_experts')}")
    rate = r["decode_read"] / r["decode_s"]
    print(f"  {name:<22} load {r['load_s']:5.1f} s  prefill {a.prefill / r['prefill_s']:6.2f} tok/s  decode "
          f"{a.decode / r['decode_s']:6.2f} tok/s  read/token {r['decode_read'] / a.decode / MiB:6.1f} MiB  "
          f"disk {rate / 1e9:.2f} GB/s ({rate / r['seq_rate']:.2f} of seq)  peak {(r.get('peak') or 0) / GiB:.2f} "
          f"GiB{extra}", flush=True)


def summary(best: dict, rates: list[float], a) -> None:
    print(f"\nbest of {a.rounds} rounds; sequential read {statistics.median(rates) / 1e9:.2f} GB/s median "
          f"({', '.join(f'{r / 1e9:.2f}' for r in rates)})")
    print(f"{'':24}{'prefill tok/s':>14}{'decode tok/s':>14}{'MiB read/tok':>14}{'  (prefill)':>12}"
          f"{'decode GB/s':>13}{'of seq':>8}{'peak GiB':>10}")
    for name, r in best.items():
        if r is None:
            print(f"{name:<24}{'failed':>14}")
            continue
        rate = r["decode_read"] / r["decode_s"]
        print(f"{name:<24}{a.prefill / r['prefill_s']:>14.2f}{a.decode / r['decode_s']:>14.2f}"
              f"{r['decode_read'] / a.decode / MiB:>14.1f}{r['prefill_read'] / a.prefill / MiB:>12.1f}"
              f"{rate / 1e9:>13.2f}{rate / r['seq_rate']:>8.2f}{(r.get('peak') or 0) / GiB:>10.2f}")
    ref = best.get("llama.cpp")
    for name, r in best.items():
        if name == "llama.cpp" or r is None or ref is None:
            continue
        print(f"{name}: decode {ref['decode_s'] / r['decode_s']:.2f}x llama.cpp, prefill "
              f"{ref['prefill_s'] / r['prefill_s']:.2f}x")
    on, off = best.get("hybridmoe"), best.get("hybridmoe no prefetch")
    if on and off:
        print(f"prefetch on vs off: decode {off['decode_s'] / on['decode_s']:.2f}x")
    if on and best.get("baseline"):
        print(f"this tree vs baseline: decode {best['baseline']['decode_s'] / on['decode_s']:.2f}x, prefill "
              f"{best['baseline']['prefill_s'] / on['prefill_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
