"""Throughput of `hybridmoe serve` under concurrent streamed chat requests: aggregate decode tokens/s at 1, 4, 8 and
16 streams, as ratios against the single stream measured in the same run.

The server runs as its own process (`python -m hybridmoe serve MODEL --port 0 --max-seqs N ...`, so the clients
never share its interpreter), unless --url names one already running. Each round starts S streams at once; each asks
for --tokens tokens (ignore_eos, greedy, distinct prompts). A stream's decode rate counts its tokens after the first
over the time from its first to its last token; the aggregate decode rate is all streams' such tokens over the time
from the round's first first-token to its last token. End-to-end tokens/s (all tokens over the round's wall time,
prompt reading included) is shown too.

    python bench/serve_load.py [MODEL] [--streams 1,4,8,16] [--tokens 64] [--rounds 2] [--max-seqs 16]
                               [--serve-args "--accelerator cpu --expert-cache-slots 8"] [--threads N]
                               [--url http://...]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["os", "sys", "json", "re", "math", "time", "random", "heapq", "bisect", "zlib", "csv", "enum", "abc", "io",
          "glob", "shutil", "socket", "struct", "array", "queue", "string", "types", "copy", "pprint"]


async def one_stream(http: httpx.AsyncClient, i: int, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Tell me about the {TOPICS[i % len(TOPICS)]} module"}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                n = data["usage"]["completion_tokens"]
            if any(c["delta"].get("content") or c["delta"].get("reasoning_content") for c in data["choices"]):
                last = time.perf_counter()
                first = first or last
    return {"start": t0, "first": first, "last": last, "tokens": n}


async def round_(url: str, streams: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=None),
                                 limits=httpx.Limits(max_connections=streams + 4)) as http:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_stream(http, i, tokens) for i in range(streams)))
        t1 = time.perf_counter()
    decode_tokens = sum(g["tokens"] - 1 for g in got)
    span = max(g["last"] for g in got) - min(g["first"] for g in got)
    per_stream = [(g["tokens"] - 1) / (g["last"] - g["first"]) for g in got if g["last"] > g["first"]]
    return {"streams": streams, "tokens": sum(g["tokens"] for g in got), "decode_tok_s": decode_tokens / span,
            "e2e_tok_s": sum(g["tokens"] for g in got) / (t1 - t0),
            "stream_tok_s": sum(per_stream) / len(per_stream), "wall_s": t1 - t0}


def engine_round(batch, streams: int, tokens: int) -> dict:
    """The same round through the batch runner in this process, without HTTP (--engine-only)."""
    from hybridmoe import GenerationConfig, Text
    cfg = GenerationConfig(temperature=0, max_tokens=tokens, ignore_eos=True)
    times: list[dict] = [{"first": None, "last": None} for _ in range(streams)]

    def on_event(i):
        def record(ev):
            if isinstance(ev, Text) and ev.text:
                times[i]["last"] = time.perf_counter()
                times[i]["first"] = times[i]["first"] or times[i]["last"]
        return record

    t0 = time.perf_counter()
    reqs = [batch.submit([{"role": "user", "content": f"Tell me about the {TOPICS[i % len(TOPICS)]} module"}], cfg,
                         on_event=on_event(i)) for i in range(streams)]
    while any(r.done is None for r in reqs):
        time.sleep(0.005)
    t1 = time.perf_counter()
    got = [dict(t, tokens=r.done.completion_tokens) for t, r in zip(times, reqs)]
    span = max(g["last"] for g in got) - min(g["first"] for g in got)
    per_stream = [(g["tokens"] - 1) / (g["last"] - g["first"]) for g in got if g["last"] > g["first"]]
    return {"streams": streams, "tokens": sum(g["tokens"] for g in got),
            "decode_tok_s": sum(g["tokens"] - 1 for g in got) / span,
            "e2e_tok_s": sum(g["tokens"] for g in got) / (t1 - t0),
            "stream_tok_s": sum(per_stream) / len(per_stream), "wall_s": t1 - t0}


def start_server(model: str, max_seqs: int, extra: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:  # torch's and numba's thread pools (a shared machine: fewer threads than cores is steadier)
        env |= {"OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "hybridmoe", "serve", model, "--port", "0", "--max-seqs", str(max_seqs), *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)/v1", line)
        if m:
            url = m[1]
            break
    else:
        sys.exit(f"the server did not start: {proc.wait()}")
    while httpx.get(url + "/health").status_code != 200:
        if proc.poll() is not None:
            sys.exit(f"the server stopped while loading: {proc.stderr.read()}")
        time.sleep(0.2)
    return proc, url


def in_process(args):
    """The model loaded here with the serve flags given, behind a batch runner."""
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from hybridmoe.cli import build_parser, run_options
    from hybridmoe.engine.batch import BatchEngine
    from hybridmoe.engine.scheduler import SchedulerConfig
    import hybridmoe
    parsed = build_parser().parse_args(["serve", args.model, *args.serve_args.split()])
    engine = hybridmoe.load(parsed.model, options=run_options(parsed))
    return BatchEngine(engine, SchedulerConfig(max_seqs=args.max_seqs)).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per stream count; the best is kept")
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--serve-args", default="", help="more `hybridmoe serve` flags, as one string")
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the server (default: all cores)")
    ap.add_argument("--engine-only", action="store_true", help="the same rounds through the batch runner in this "
                    "process, without HTTP (what the server's own overhead costs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    proc = batch = None
    url = args.url
    if args.engine_only:
        run_round = engine_round
        batch = in_process(args)
    else:
        if url is None:
            proc, url = start_server(args.model, args.max_seqs, args.serve_args.split(), args.threads)
        run_round = lambda target, s, n: asyncio.run(round_(target, s, n))  # noqa: E731
    target = batch if args.engine_only else url
    try:
        run_round(target, 1, 4)  # warm-up
        rows = []
        for s in streams:
            best = max((run_round(target, s, args.tokens) for _ in range(args.rounds)),
                       key=lambda r: r["decode_tok_s"])
            rows.append(best)
            print(f"  {s} streams: {best['decode_tok_s']:.1f} decode tok/s", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if batch is not None:
            batch.close()
    base = next((r["decode_tok_s"] for r in rows if r["streams"] == 1), rows[0]["decode_tok_s"])
    for r in rows:
        r["vs_1_stream"] = r["decode_tok_s"] / base
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| streams | decode tok/s (all streams) | x 1 stream | tok/s per stream | end-to-end tok/s | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['streams']} | {r['decode_tok_s']:.1f} | {r['vs_1_stream']:.2f} | {r['stream_tok_s']:.1f} | "
              f"{r['e2e_tok_s']:.1f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
