"""Fuzz the model readers: mutated GGUF headers through the header and metadata reader, mutated GGUF files through
load + logits + a short generate (llama.cpp's tokenizer included), and mutated HF directories (config.json,
safetensors headers, the shard index) through load. Every case must end in success or one of our errors: a crash,
a foreign exception, a hang, a memory blow-up or non-finite logits without an Error event are failures.

Cases run in child processes, in batches; a child that dies, hangs or grows too large is replaced and the case
recorded. The same --seed gives the same cases.

    python bench/fuzz_formats.py --headers 100000 --files 5000 --hf 5000      # the acceptance run (hours)
    python bench/fuzz_formats.py --headers 300 --files 20 --hf 60             # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAILURES = ("crash", "foreign", "hang", "memory", "silent-nonfinite")
HANG_SECONDS = 10.0
MEMORY_BYTES = 2 << 30  # growth of the child's resident memory over its size before the case
BOUNDARY = [0, 1, -1, 2, 3, 7, 255, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 40, -2 ** 31, 10_000_000]
FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf, 0.5, 1.0, -1e-6]


# --- building the seed models (once per run, in the parent) ---
def build_seeds(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    from hybridmoe.models.convert import convert
    hf = tiny.deepseek_v3(work / "hf", num_hidden_layers=2)
    qwen = tiny.qwen3_moe(work / "qwen", num_hidden_layers=2)
    return {"hf": hf, "qwen": qwen, "gguf": convert(hf, work / "seed.gguf", "q8_0", progress=False),
            "qgguf": convert(qwen, work / "qseed.gguf", "q8_0", progress=False)}


# --- mutations (deterministic in (seed, case)) ---
def _gguf_rewrite(src: Path, dst: Path, rng: random.Random) -> None:
    """A semantic edit through the gguf package: a metadata value set to a boundary, a key or tensor dropped, or
    the vocabulary damaged (duplicate or empty token, another tokenizer model, arrays cut short)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    r = GGUFReader(src)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    kv = {k: f.contents() for k, f in fields.items()}
    types = {k: f.types for k, f in fields.items()}
    drop_tensor = None
    kind = rng.choice(["value", "value", "drop_key", "tokens", "tokens", "tokenizer_model", "arrays", "tensor"])
    if kind == "value":
        key = rng.choice([k for k, v in kv.items() if isinstance(v, (int, float)) and not isinstance(v, bool)])
        value = rng.choice(FLOATS if isinstance(kv[key], float) or rng.random() < 0.3 else BOUNDARY)
        kv[key] = value
        types[key] = [GGUFValueType.FLOAT32 if isinstance(value, float) else
                      GGUFValueType.INT32 if -2 ** 31 <= value < 2 ** 31 else GGUFValueType.UINT64]
    elif kind == "drop_key":
        kv.pop(rng.choice([k for k in kv if k != "general.architecture"]))
    elif kind == "tokens":
        tokens = list(kv["tokenizer.ggml.tokens"])
        i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
        tokens[i] = rng.choice([tokens[j], "", tokens[i] + "\u0301", "<0x0A>", "[EMPTY_3]"])
        kv["tokenizer.ggml.tokens"] = tokens
    elif kind == "tokenizer_model":
        kv["tokenizer.ggml.model"] = rng.choice(["llama", "t5", "bert", "rwkv", "", "no_vocab", "gpt3"])
    elif kind == "arrays":
        key = rng.choice(["tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.tokens"])
        if key in kv:
            kv[key] = list(kv[key])[:rng.randrange(len(kv[key]) + 1)]
    else:
        drop_tensor = rng.choice([t.name for t in r.tensors])
    w = GGUFWriter(dst, kv.pop("general.architecture"))
    for key, value in kv.items():
        t = types[key]
        w.add_key_value(key, value, t[0], sub_type=t[-1] if t[0] == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != drop_tensor:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mutate_gguf(src: Path, dst: Path, rng: random.Random, header_only: bool) -> None:
    """Byte edits in the header (metadata, tokenizer, tensor table), truncation, or a semantic rewrite."""
    if rng.random() < (0.3 if header_only else 0.6):
        try:
            return _gguf_rewrite(src, dst, rng)
        except (ValueError, OverflowError, struct.error, TypeError):
            pass  # a value the writer cannot encode: fall back to byte edits
    raw = bytearray(src.read_bytes())
    header_end = min(len(raw), 64 * 1024)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(header_end)
        if rng.random() < 0.5:
            raw[i] = rng.randrange(256)
        else:  # a whole little-endian word: counts, lengths, types and offsets change together
            raw[i:i + 8] = struct.pack("<Q", rng.choice([0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, rng.getrandbits(64)]))
    if rng.random() < 0.2:
        raw = raw[:rng.randrange(len(raw))]
    dst.write_bytes(bytes(raw[:len(src.read_bytes()) + 64]))


CONFIG_VALUES = [None, 0, -1, -64, 1.5, 10_000_000, 100_000_000, "nan", "64", [], {}, True, False, math.nan,
                 1e308, ["deepseek_v3"], 2 ** 40]


def mutate_hf(src: Path, dst: Path, rng: random.Random) -> None:
    """A copy of the directory with one damaged piece: a config.json value, the safetensors header (offsets,
    dtype, shape), or a shard index."""
    import shutil
    shutil.copytree(src, dst)
    kind = rng.choice(["config", "config", "config", "header", "header", "index", "tokenizer"])
    if kind == "config":
        cfg = json.loads((dst / "config.json").read_text())
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(sorted(cfg))
            value = rng.choice(CONFIG_VALUES)
            cfg[key] = value
            if value is None and rng.random() < 0.5:
                cfg.pop(key)
        (dst / "config.json").write_text(json.dumps(cfg, allow_nan=True))
    elif kind == "header":
        p = dst / "model.safetensors"
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"])
        entry = header[name]
        field = rng.choice(["data_offsets", "dtype", "shape", "entry"])
        if field == "data_offsets":
            other = header[rng.choice([k for k in header if k != "__metadata__"])]["data_offsets"]
            entry["data_offsets"] = rng.choice([other, [float(x) for x in entry["data_offsets"]],
                                                [entry["data_offsets"][0], entry["data_offsets"][1] + 4],
                                                [-4, entry["data_offsets"][1]], "0,4", [0]])
        elif field == "dtype":
            entry["dtype"] = rng.choice(["I32", "F16", "BF16", "U8", "F8_E4M3", "Q4", "", 5])
        elif field == "shape":
            entry["shape"] = rng.choice([[], [-1], [2 ** 40], entry["shape"][::-1], [1.5], "64"])
        else:
            header[name] = rng.choice([None, [], "x", {"dtype": "F32"}])
        new = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    elif kind == "index":
        bad = rng.choice(["../../../../etc/passwd", "/etc/passwd", "model.safetensors\x00", "x.safetensors",
                          "sub/../../model.safetensors", 3, None])
        wm = rng.choice([{"model.embed_tokens.weight": bad}, [bad], "weights", {"model.embed_tokens.weight":
                                                                                 "model.safetensors"}])
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    else:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg[rng.choice(["chat_template", "bos_token", "eos_token", "add_bos_token"])] = rng.choice(
            [None, 5, [], {"content": 3}, "{% for %}", "{{ ('a' * 2000000000)|length }}", "{{ 1/0 }}"])
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))


# --- the child: runs cases, one JSON line each ---
def run_case(mode: str, seeds: dict, seed: int, i: int, work: Path) -> dict:
    import torch

    import hybridmoe
    from hybridmoe.errors import HybridMoEError
    rng = random.Random(seed * 1_000_003 + i)
    src = seeds["gguf" if rng.random() < 0.7 else "qgguf"] if mode != "hf" else seeds["hf" if rng.random() < 0.7
                                                                                           else "qwen"]
    case = work / f"case{i}"
    try:
        if mode == "hf":
            mutate_hf(Path(src), case, rng)
        else:
            case = case.with_suffix(".gguf")
            mutate_gguf(Path(src), case, rng, header_only=mode == "headers")
        if mode == "headers":
            from hybridmoe.formats.gguf import GGUFFile, hf_config
            from hybridmoe.formats.gguf_vocab import check_vocab
            f = GGUFFile(case)
            hf_config(f)
            check_vocab(f.metadata, f.path)
            return {"outcome": "ok"}
        eng = hybridmoe.load(case)
        logits = eng.logits([1, 5, 9, 13])
        events = list(eng.generate([1, 5, 9, 13] if eng.tokenizer is None else "Hello", max_tokens=3,
                                   temperature=0))
        if any(isinstance(e, hybridmoe.Error) for e in events):
            return {"outcome": "ours", "error": "Error event", "detail": next(
                e.message for e in events if isinstance(e, hybridmoe.Error))[:200]}
        if not torch.isfinite(logits).all():
            return {"outcome": "silent-nonfinite", "detail": "logits() non-finite, generation without Error"}
        return {"outcome": "ok"}
    except (HybridMoEError, ValueError) as e:  # ValueError: the library's own argument errors (bad ids, text)
        if not isinstance(e, HybridMoEError) and type(e) is not ValueError:
            return {"outcome": "foreign", "error": type(e).__name__, "detail": str(e)[:300]}
        msg = str(e)
        if "\n" in msg:
            return {"outcome": "foreign", "error": type(e).__name__, "detail": "multi-line: " + msg[:300]}
        return {"outcome": "ours", "error": type(e).__name__, "detail": msg[:200]}
    except Exception as e:  # noqa: BLE001 (what this script counts)
        import traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        return {"outcome": "foreign", "error": type(e).__name__,
                "detail": f"{str(e)[:200]} @ {where.filename}:{where.lineno}"}
    finally:
        import shutil
        if case.is_dir():
            shutil.rmtree(case, ignore_errors=True)
        else:
            case.unlink(missing_ok=True)


def warm_up(mode: str, seeds: dict) -> None:
    """Imports and kernel compilation happen before the first case, so that the hang watchdog times cases only."""
    import hybridmoe
    from hybridmoe.formats.gguf import GGUFFile
    if mode == "headers":
        GGUFFile(seeds["gguf"])
        return
    for key in (("gguf", "qgguf") if mode == "files" else ("hf", "qwen")):
        list(hybridmoe.load(seeds[key]).generate("Hello", max_tokens=2, temperature=0))


def worker(mode: str, seeds_json: str, seed: int, start: int, stop: int) -> int:
    seeds = json.loads(seeds_json)
    warm_up(mode, seeds)
    with tempfile.TemporaryDirectory() as d:
        for i in range(start, stop):
            print(json.dumps({"start": i}), flush=True)
            print(json.dumps({"i": i, **run_case(mode, seeds, seed, i, Path(d))}), flush=True)
    return 0


# --- the parent: batches of cases in children, with watchdogs ---
def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_mode(mode: str, n: int, seeds: dict, seed: int, batch: int, log=print) -> tuple[Counter, list[dict]]:
    import selectors
    counts: Counter = Counter()
    bad: list[dict] = []
    i = 0
    env = dict(os.environ, GGML_NO_BACKTRACE="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    while i < n:
        stop = min(n, i + batch)
        child = subprocess.Popen([sys.executable, __file__, "--worker", mode, json.dumps(seeds), str(seed), str(i),
                                  str(stop)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        sel = selectors.DefaultSelector()
        sel.register(child.stdout, selectors.EVENT_READ)
        current, started, base = None, time.monotonic(), 0
        while True:
            if current is not None and time.monotonic() - started > HANG_SECONDS:
                child.kill()
                outcome = {"i": current, "outcome": "hang"}
            elif current is not None and base and _rss(child.pid) - base > MEMORY_BYTES:
                child.kill()
                outcome = {"i": current, "outcome": "memory"}
            elif sel.select(timeout=0.05):
                line = child.stdout.readline()
                if not line:  # the child ended: a crash if it was inside a case
                    child.wait()
                    if current is None:
                        break
                    outcome = {"i": current, "outcome": "crash", "detail": f"exit status {child.returncode}"}
                else:
                    msg = json.loads(line)
                    if "start" in msg:
                        current, started, base = msg["start"], time.monotonic(), _rss(child.pid)
                        continue
                    outcome = msg
            else:
                continue
            counts[outcome["outcome"]] += 1
            if outcome["outcome"] in FAILURES:
                bad.append({"mode": mode, **outcome})
            i = outcome["i"] + 1
            current = None
            if outcome["outcome"] in ("hang", "memory", "crash"):
                child.wait()
                break
        sel.close()
        if child.poll() is None:
            child.wait()
        log(f"  {mode}: {i}/{n} cases, {dict(counts)}")
    return counts, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--headers", type=int, default=300, help="mutated GGUF headers through the metadata reader")
    ap.add_argument("--files", type=int, default=20, help="mutated GGUF files through load, logits and generate")
    ap.add_argument("--hf", type=int, default=60, help="mutated HF directories through load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500, help="cases per child process")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        mode, seeds, seed, start, stop = args.worker
        return worker(mode, seeds, int(seed), int(start), int(stop))
    t0 = time.perf_counter()
    summary, failures = {}, []
    with tempfile.TemporaryDirectory() as d:
        seeds = {k: str(v) for k, v in build_seeds(Path(d)).items()}
        for mode, n in (("headers", args.headers), ("files", args.files), ("hf", args.hf)):
            if n:
                counts, bad = run_mode(mode, n, seeds, args.seed, args.batch,
                                       log=lambda s: print(s, file=sys.stderr))
                summary[mode] = dict(counts)
                failures += bad
    out = {"summary": summary, "failures": failures[:50], "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for mode, counts in summary.items():
            print(f"{mode:8s} " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for f in failures[:20]:
            print(f"FAIL {f}")
        print(f"{sum(sum(c.values()) for c in summary.values())} cases in {out['seconds']} s; "
              f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
