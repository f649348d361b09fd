"""The `hybridmoe` command line. Each subcommand is a small function over the public API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import HybridMoEError
from .options import Accelerator, CpuActivations, GpuWeights, RunOptions, Tier, model_path

EPILOG = """examples:
  hybridmoe chat                                   chat with the built-in demo model
  hybridmoe generate ./DeepSeek-V3 -p "Hello" -n 64 --device cuda
  hybridmoe perplexity ./model --file wiki.txt --json
  hybridmoe inspect ./DeepSeek-R1                  works with only config.json present
  hybridmoe convert ./Qwen3-30B-A3B q.gguf --type q4_k_m   GGUF for hybridmoe and llama.cpp
  hybridmoe serve ./DeepSeek-R1 --port 8080         OpenAI-compatible server; `chat --connect URL` uses it
"""


MODEL_HELP = ("model directory (HF config.json + safetensors + tokenizer.json) or GGUF file (x.gguf, or a part of a "
              "split x-00001-of-0000N.gguf); `demo` or nothing: the built-in demo model")


def _model_opts(p: argparse.ArgumentParser) -> None:
    # Run options default to None here: RunOptions holds the defaults, and None tells a flag the user did not give
    # (which a profile may then set) from one that they did.
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto, the GPU if torch sees "
                                                  "one, else the CPU)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, "
                                                 "float32 on cpu)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: min(4096, model's))")


def _choices(mode) -> str:  # the values RunOptions checks, shown in --help
    return "{" + ",".join(m.value for m in mode) + "}"


def _offload_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offload (routed experts in RAM, a GPU expert cache)")
    g.add_argument("--accelerator", default=None, metavar=_choices(Accelerator),
                   help="cuda (default with a CUDA device), or cpu to run the offload engine with the CPU standing "
                        "in for the GPUs")
    g.add_argument("--devices", type=int, default=None, help="GPUs to split the layers over (default: 1)")
    g.add_argument("--expert-cache-slots", type=int, default=None,
                   help="GPU expert slots per device (default: as many as fit; 0 turns the cache off)")
    g.add_argument("--no-prefetch", dest="prefetch", action="store_const", const=False, default=None,
                   help="do not prefetch predicted experts")
    g.add_argument("--experts-tier", default=None, metavar=_choices(Tier),
                   help="host tier of the experts: mmap (page cache, default) or pinned (copied once to pinned RAM)")
    g.add_argument("--cpu-activations", default=None, metavar=_choices(CpuActivations),
                   help="GGUF matrices computed on the CPU: int8-all (default) rounds the inputs of every quantized "
                        "matrix (experts, attention, dense layers, output head) to 8 bits per group of 32 as "
                        "llama.cpp does, several times faster than exact, perplexity within 1%% of it; int8 rounds "
                        "only the routed experts' inputs; f32 is exact (slowest). Experts of Q2_K-Q6_K, Q8_0 and "
                        "IQ4_XS are read in place on the mmap tier, Q4_0 from a repacked copy in RAM")
    g.add_argument("--gpu-weights", default=None, metavar=_choices(GpuWeights),
                   help="a GGUF's non-expert weights on the GPU: dequantized to --dtype (default), or quantized (the "
                        "file's blocks: about half the VRAM at Q8_0, read by hybridmoe's own kernels)")
    g.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="RAM the engine may use, page cache included, e.g. 24GiB (default: the memory cgroup's "
                        "limit or the RAM available); GGUF experts beyond it are read from disk ahead of need, the "
                        "most used kept in RAM (CPU engine)")
    g.add_argument("--profile", default=None, help="hardware profile: a name in profiles/, a TOML file, or auto; "
                   "its [plan] (as `hybridmoe tune` wrote it) sets what the flags above leave unset")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                   help="decode eagerly instead of replaying captured CUDA graphs (slower; for debugging)")


RUN_FLAGS = {"device": "device", "dtype": "dtype", "ctx": "context", "accelerator": "accelerator",
             "devices": "devices", "expert_cache_slots": "expert_cache_slots", "prefetch": "prefetch",
             "experts_tier": "experts_tier", "cpu_activations": "cpu_activations", "cuda_graphs": "cuda_graphs",
             "gpu_weights": "gpu_weights", "memory_budget": "memory_budget"}


def run_options(args) -> RunOptions:
    """The run options of a parsed command line: the flags given, then --profile's plan, then the defaults."""
    explicit = {opt: getattr(args, dest) for dest, opt in RUN_FLAGS.items() if getattr(args, dest, None) is not None}
    if "memory_budget" in explicit:
        explicit["memory_budget"] = _parse_size(explicit["memory_budget"], "--memory-budget")
    profile = None
    spec = getattr(args, "profile", None)
    if spec:
        from .hardware.profile import resolve
        profile = resolve(spec).run_options()
    gpu = None
    if profile and RunOptions.merged(explicit).offloaded is None:  # --device auto: does it find a GPU?
        import torch
        gpu = torch.cuda.is_available()
    return RunOptions.merged(explicit, profile, gpu_available=gpu)


def load_from_args(args):
    """The engine for a parsed command line (model and run options). Where the kernels' cache was empty, a note on
    a terminal says, once the model has loaded, that the first generation compiles them."""
    from . import load
    from .kernels.cpu.target import first_run_note
    engine = load(args.model, options=run_options(args))
    note = first_run_note()
    if note and sys.stderr.isatty():  # like `loading…`: for a person watching, not for scripts reading stderr
        print(f"note: {note}", file=sys.stderr, flush=True)
    return engine


def _sampling_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min_p * max prob (default: 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default: 1.0, off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybridmoe", description="Run huge Mixture-of-Experts LLMs on one "
                                 "workstation: attention on the GPUs, routed experts in RAM.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    ap.add_argument("--version", action="version", version=f"hybridmoe {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    for name, text, func in (("chat", "terminal chat with a live monitor (Textual)", cmd_chat),
                             ("repl", "plain line-based chat on stdin/stdout (scriptable)", cmd_repl)):
        p = sub.add_parser(name, help=text)
        _model_opts(p)
        _offload_opts(p)
        p.add_argument("--system", default=None, help="system prompt")
        p.add_argument("--connect", default=None, metavar="URL", help="use a running `hybridmoe serve` (e.g. "
                       "http://127.0.0.1:8080) instead of loading a model")
        p.add_argument("--api-key", default=os.environ.get("HYBRIDMOE_API_KEY"),
                       help="with --connect: the server's key (default: $HYBRIDMOE_API_KEY)")
        p.set_defaults(func=func)

    p = sub.add_parser("generate", help="complete a prompt and stream the text to stdout")
    _model_opts(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    _sampling_opts(p)
    _offload_opts(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="negative log-likelihood and perplexity of a text or token ids")
    _model_opts(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="text file, tokenized with the model's tokenizer")
    src.add_argument("--tokens", help='token ids, e.g. "1 2 3"')
    p.add_argument("--json", action="store_true", help="print JSON: n_tokens, nll, ppl, nll_per_token, argmax")
    _offload_opts(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("plan", help="where layers, KV cache and experts would live on this (or a described) machine")
    p.add_argument("model", nargs="?", default=None, help="model directory or its config.json (weights not "
                   "needed), or a GGUF file; `demo` or nothing: the built-in demo model")
    p.add_argument("--ctx", type=int, default=4096, help="context length to budget KV cache for (default: 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    p.add_argument("--gpus", default=None, help='describe GPUs instead of probing, e.g. "2x48GiB" or "80GiB,24GiB", or none')
    p.add_argument("--ram", default=None, help='describe host RAM instead of probing, e.g. "512GiB"')
    p.add_argument("--cores", type=int, default=None, help="CPU cores (default: probed)")
    p.add_argument("--experts-tier", choices=("auto", "pinned", "mmap"), default="auto",
                   help="host tier for experts (default: pinned if it fits in RAM, else mmap)")
    p.add_argument("--expert-cache-slots", type=int, default=None, help="cap on GPU expert slots per device")
    p.add_argument("--dtype", default=None, help="dtype of the weights at run time (default: bfloat16 with a GPU, "
                   "float32 without, as the engine loads)")
    p.add_argument("--gpu-weights", default="dequantized", metavar=_choices(GpuWeights),
                   help="a GGUF's non-expert weights on the GPU: dequantized to --dtype (default) or quantized "
                        "(as the file stores them)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--profile", default=None, help="plan for the machine a hardware profile describes: a shipped "
                   "name (rtx6000ada-x2, ...), a TOML file, or auto (this machine)")
    p.add_argument("--cluster", default=None, metavar="NODESxGPUS[:GPU|:VRAM]",
                   help="plan for vLLM and SGLang on a cluster instead, e.g. 2x8:H100-80GB: layouts, memory per GPU, "
                        "launch commands per node, decode throughput range")
    p.add_argument("--concurrency", type=int, default=64,
                   help="with --cluster: sequences served at once by the whole cluster (default: 64)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="architecture, parameters by category, bytes read per token (config only)")
    p.add_argument("model", nargs="?", default=None, help="model directory or its config.json (weights not "
                   "needed), or a GGUF file; `demo` or nothing: the built-in demo model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="write an HF model directory as one GGUF file (llama.cpp loads it too)")
    p.add_argument("model", help="HF model directory (config.json + safetensors + tokenizer.json), BF16 or FP8; "
                                 "`demo`: the built-in demo model")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", default="q8_0", choices=["q8_0", "q4_k_m", "bf16", "f32"],
                   help="routed experts' type; attention, shared and dense layers are q8_0 (bf16 / f32 with those "
                        "types). q4_k_m uses llama.cpp's quantizer (default: q8_0)")
    p.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name, if it cannot be inferred")
    p.set_defaults(func=cmd_convert)
    _add_hardware_commands(sub)
    _add_serve_command(sub)
    return ap




def cmd_chat(args) -> int:
    try:
        from hybridmoe_tui.app import run_chat  # before loading: a missing UI fails in a second, not after a load
    except ImportError as e:
        raise HybridMoEError(f"the chat UI needs textual ({e}); install with: pip install textual") from None
    if sys.stderr.isatty() and not args.connect:
        print(f"loading {args.model or 'the demo model'}…", file=sys.stderr, flush=True)
    return run_chat(engine_for(args), system=args.system) or 0


def cmd_repl(args) -> int:
    from .repl import run_repl
    return run_repl(engine_for(args), system=args.system) or 0


def cmd_generate(args) -> int:
    from . import Done, Error, GenerationConfig, Notice, Stats, Text
    from .repl import ProgressLine, answer_events
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    cfg = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                           seed=args.seed, stop=tuple(args.stop))
    engine = load_from_args(args)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": prompt}]
        events = engine.chat(msgs, cfg)
    else:
        events = engine.generate(prompt, cfg)
    channel, last_stats = "answer", None
    try:
        # a long prompt's progress on stderr; Ctrl-C stops at the next prompt chunk or token (twice: at once)
        for ev in answer_events(events, engine, ProgressLine(sys.stderr, sys.stderr.isatty())):
            if isinstance(ev, Text):
                if ev.channel != channel:
                    sys.stdout.write("<think>\n" if ev.channel == "reasoning" else "\n</think>\n")
                    channel = ev.channel
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Notice):  # e.g. the expert cache shrank to fit; stdout keeps only the text
                print(f"note: {ev.message}", file=sys.stderr, flush=True)
            elif isinstance(ev, Stats):
                last_stats = ev
            elif isinstance(ev, Error):
                raise HybridMoEError(ev.message)
            elif isinstance(ev, Done):
                sys.stdout.write("\n")
                s = last_stats
                if s is not None:
                    print(f"[{ev.prompt_tokens} prompt tokens at {s.prefill_tok_s:.1f} tok/s, "
                          f"{ev.completion_tokens} generated at {s.decode_tok_s:.1f} tok/s; stop: {ev.reason}]",
                          file=sys.stderr)
    except KeyboardInterrupt:
        engine.stop()
        sys.stdout.write("\n")
        print("[stopped]", file=sys.stderr)
        return 130
    return 0


def cmd_perplexity(args) -> int:
    import torch
    engine = load_from_args(args)
    if args.tokens is not None:
        try:
            ids = [int(t) for t in args.tokens.replace(",", " ").split()]
        except ValueError:
            raise HybridMoEError("--tokens must be integers separated by spaces, e.g. \"1 2 3\"") from None
    else:
        path = Path(args.file)
        if not path.is_file():
            raise HybridMoEError(f"--file {path}: no such file")
        if engine.tokenizer is None:
            raise HybridMoEError(f"{engine.path}: no tokenizer; pass --tokens instead of --file")
        ids = engine.tokenizer.encode(path.read_text(errors="replace"))
    if len(ids) < 2:
        raise HybridMoEError("need at least 2 tokens to score")
    nll, argmax = [], []
    window = engine.max_context
    # Windows of the context length, each scored on its own (as llama.cpp's perplexity does): a token's history
    # starts at its window's first token, so the first tokens of each window are scored with little context.
    starts = [s for s in range(0, len(ids) - 1, window) if len(ids[s:s + window + 1]) >= 2]
    if len(starts) > 1:
        print(f"{len(ids)} tokens exceed the context of {window}: scored in {len(starts)} windows of up to {window} "
              f"tokens, each on its own (no history across windows; raise --ctx for longer ones)", file=sys.stderr)
    for s in starts:
        chunk = ids[s:s + window + 1]
        logp = torch.log_softmax(engine.logits(chunk[:-1]), dim=-1)
        target = torch.tensor(chunk[1:])
        nll += (-logp.gather(1, target[:, None])[:, 0]).tolist()
        argmax += logp.argmax(-1).tolist()
    mean = sum(nll) / len(nll)
    out = {"n_tokens": len(nll), "nll": mean, "ppl": float(torch.tensor(mean).exp()), "nll_per_token": nll,
           "argmax": argmax, "window": window, "windows": len(starts)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"tokens scored: {out['n_tokens']}  mean NLL: {mean:.4f}  perplexity: {out['ppl']:.4f}")
    return 0


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def cmd_convert(args) -> int:
    from .models.convert import convert
    out = convert(model_path(args.model), args.out, args.type, progress=True, tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {out} ({Path(out).stat().st_size / 2 ** 30:.2f} GiB)")
    return 0


def cmd_inspect(args) -> int:
    from .models.loader import read_config
    from .models.summary import summarize
    model = model_path(args.model)
    if model.suffix == ".gguf":
        from .models.summary import summarize_gguf
        s = summarize_gguf(model)
    else:
        s = summarize(read_config(model))
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"model_type {s['model_type']}: {s['layers']} layers ({s['moe_layers']} MoE), hidden {s['hidden_size']}, "
          f"{s['routed_experts']} routed experts, {s['experts_per_token']} per token, weights {s['dtype']}")
    print(f"{'category':<16}{'params':>10}{'size':>14}{'read/token':>14}")
    for c, n in s["params"].items():
        print(f"{c:<16}{_fmt_count(n):>10}{_fmt_bytes(s['bytes'][c]):>14}"
              f"{_fmt_bytes(s['bytes_read_per_token'][c]):>14}")
    print(f"{'total':<16}{_fmt_count(s['params_total']):>10}{_fmt_bytes(s['bytes_total']):>14}"
          f"{_fmt_bytes(s['bytes_read_per_token_total']):>14}")
    print(f"active parameters per token: {_fmt_count(s['params_active'])}; one routed expert: "
          f"{_fmt_bytes(s['bytes_per_expert'])} (KV-cache reads not included)")
    for qtype, route in s.get("expert_cpu_decode", {}).items():
        print(f"{qtype} experts on the CPU: {route}")
    return 0


def _parse_size(text: str, flag: str) -> int:
    units = {"tib": 1 << 40, "tb": 10 ** 12, "gib": 1 << 30, "gb": 10 ** 9, "mib": 1 << 20, "mb": 10 ** 6}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[:-len(unit)]) * mult)
            except ValueError:
                break
    raise HybridMoEError(f"{flag} {text!r}: expected a size like 48GiB or 512GB")


def _hardware(args):
    from dataclasses import replace

    from .hardware.commands import plan_hardware
    from .offload.plan import GPU
    hw = plan_hardware(getattr(args, "profile", None))
    gpus = hw.gpus
    if args.gpus:
        gpus = []
        for part in ([] if args.gpus.strip().lower() in ("none", "0") else args.gpus.split(",")):
            count, _, size = part.partition("x") if "x" in part else ("1", "", part)
            try:
                n = int(count)
            except ValueError:
                raise HybridMoEError(f"--gpus {args.gpus!r}: expected e.g. 2x48GiB or 80GiB,24GiB") from None
            b = _parse_size(size, "--gpus")
            gpus += [GPU(f"GPU {b / (1 << 30):.0f} GiB", b, b)] * n
    ram = _parse_size(args.ram, "--ram") if args.ram else None
    # replace() keeps the profile's (or probe's) copy and disk rates
    return replace(hw, gpus=tuple(gpus), ram_total=ram or hw.ram_total, ram_available=ram or hw.ram_available,
                   cpu_cores=args.cores or hw.cpu_cores)


def cmd_plan(args) -> int:
    from .engine.engine import DTYPES
    from .models.loader import read_config
    from .offload.plan import PlanOptions, footprint_from_config, footprint_from_gguf, make_plan
    hw = _hardware(args)
    if args.cluster:
        from .cluster_cli import run
        args.model = model_path(args.model)
        return run(args, hw)
    dtype = args.dtype or ("bfloat16" if hw.gpus else "float32")  # as the engine loads
    if dtype not in DTYPES:
        raise HybridMoEError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    wbytes = 4 if DTYPES[dtype].itemsize == 4 else 2
    model = model_path(args.model)
    if model.suffix == ".gguf":  # experts as the file stores them; without a GPU the other layers too
        if args.gpu_weights not in {m.value for m in GpuWeights}:
            raise HybridMoEError(f"--gpu-weights {args.gpu_weights!r}: use one of {_choices(GpuWeights)}")
        as_stored = not hw.gpus or args.gpu_weights == GpuWeights.QUANTIZED
        cfg, fp = {}, footprint_from_gguf(model, weight_bytes=wbytes, layers_as_stored=as_stored)
    else:
        cfg = read_config(model)
        fp = footprint_from_config(cfg, weight_bytes=wbytes, expert_bytes=wbytes)
    popts = PlanOptions(context=args.ctx, batch=args.batch, experts_tier=args.experts_tier,
                        max_slots=args.expert_cache_slots)
    plan = make_plan(fp, hw, popts)
    if "disk" in plan.experts and not args.profile and model.suffix == ".gguf":
        from dataclasses import replace

        from .hardware.probe import measure_disk_read
        rate = measure_disk_read(model)  # the disk that will serve the experts, not a profile's guess
        if rate:
            plan = make_plan(fp, replace(hw, disk_read_bytes_per_s=rate), popts)
    if (cfg.get("quantization_config") or {}).get("quant_method") == "fp8":
        plan.notes.append("FP8 checkpoints are widened to the run-time dtype on load; a GGUF at 4-5 bits per "
                          "weight needs about a third of these expert bytes")
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
        return 0 if plan.fits else 3
    print(f"{'device':<24}{'layers':>10}{'weights':>11}{'KV cache':>11}{'expert slots':>14}{'slot bytes':>12}")
    for i, d in enumerate(plan.devices):
        layers = f"{d.layers[0]}-{d.layers[-1]}" if d.layers else "-"
        print(f"{f'{i}: {d.name}':<24}{layers:>10}{_fmt_bytes(d.bytes_weights):>11}{_fmt_bytes(d.bytes_kv):>11}"
              f"{d.expert_slots:>14}{_fmt_bytes(d.bytes_slots):>12}")
    e = plan.experts
    print(f"experts: {_fmt_bytes(e['bytes'])} in the {e['tier']} tier; {e['cache_slots_total']} cached on GPUs; "
          f"{plan.cpu_threads} CPU threads; prefetch margin {plan.prefetch_margin}; context {plan.context}")
    if "disk" in e:
        d = e["disk"]
        print(f"disk tier: {_fmt_bytes(d['resident_bytes'])} of experts in RAM, {_fmt_bytes(d['read_per_token'])} read "
              f"per token at {d['disk_read_bytes_per_s'] / 1e9:.2f} GB/s: ~{d['decode_tok_s']:.2g} tok/s decode")
    for note in plan.notes:
        print(f"note: {note}")
    for problem in plan.problems:
        print(f"does not fit: {problem}")
    print("fits" if plan.fits else "DOES NOT FIT")
    return 0 if plan.fits else 3


# --- serve, and the clients of a running server
def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_opts(p)
    p.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("HYBRIDMOE_API_KEY"),
                   help="clients must send Authorization: Bearer KEY (default: $HYBRIDMOE_API_KEY)")
    p.add_argument("--insecure-no-key", action="store_true", default=None,
                   help="serve on an address other than loopback without an API key")
    p.add_argument("--max-seqs", type=int, default=None, help="sequences decoded together, each with a KV cache "
                   "of the whole context (default: 4)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a sequence slot; past it "
                   "the server answers 429 (default: 64)")
    _offload_opts(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .engine.scheduler import SchedulerConfig
    from .server.backend import ServeOptions
    from .server.serve import serve
    given = {k: v for k, v in (("host", args.host), ("port", args.port), ("api_key", args.api_key),
                               ("insecure_no_key", args.insecure_no_key)) if v is not None}
    batching = {k: v for k, v in (("max_seqs", args.max_seqs), ("max_queue", args.max_queue)) if v is not None}
    try:
        scheduler = SchedulerConfig(**batching)
    except ValueError as e:
        raise HybridMoEError(f"--{str(e).replace('_', '-')}") from None
    run = run_options(args).updated(sequences=scheduler.max_seqs)  # the plan keeps their KV cache free
    return serve(args.model, run, ServeOptions(**given, scheduler=scheduler))


def engine_for(args):
    """A loaded engine, or with --connect a running server standing in for one."""
    if not args.connect:
        return load_from_args(args)
    if args.model is not None:
        raise HybridMoEError(f"--connect uses the server's model; leave out {args.model!r}")
    from .server.client import RemoteEngine
    return RemoteEngine(args.connect, args.api_key)
# --- end serve


# --- tune, bench, pull: hardware profiles, measurements and downloads (logic in hardware/, engine/bench.py, pull.py)
def _add_hardware_commands(sub) -> None:
    p = sub.add_parser("tune", help="measure this machine, choose the fastest plan for a model, write a profile")
    p.add_argument("model", nargs="?", default=None, help="model directory, config.json or GGUF file, or `demo` "
                                                          "(optional: without it only the machine is measured)")
    p.add_argument("-o", "--output", default=None, help="profile to write (default: ./<gpus>.toml)")
    p.add_argument("--quick", action="store_true", help="measure nothing: take the rates from the matching "
                   "shipped profile (datasheet) or defaults")
    p.add_argument("--profile", default=None, help="tune for the machine this profile describes (nothing measured)")
    p.add_argument("--ctx", type=int, default=None, help="fix the context length (default: the tuner chooses)")
    p.add_argument("--dtype", default=None, help="run-time dtype (default: bfloat16 with a GPU, else float32)")
    p.add_argument("--quant", default=None, help="size an HF model as a GGUF quant would be, e.g. q4_k_m")
    p.add_argument("--budget", type=float, default=60.0, help="seconds for all measurements (default: 60)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("bench", help="prompt and generation speed, llama-bench style (pp512, tg128)")
    _model_opts(p)
    p.add_argument("-p", "--n-prompt", default="512", help="prompt lengths, comma-separated; 0 skips (default: 512)")
    p.add_argument("-n", "--n-gen", default="128", help="tokens to generate, comma-separated; 0 skips "
                                                        "(default: 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions of each test (default: 5)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _offload_opts(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("pull", help="download a model (one GGUF quant, or an HF safetensors model)")
    p.add_argument("repo", help="repository id, e.g. unsloth/DeepSeek-R1-GGUF")
    p.add_argument("--quant", default=None, help="GGUF quant to fetch, e.g. Q4_K_M (required for GGUF repos)")
    p.add_argument("--dir", default=".", help="parent folder of the download (default: .)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--dry-run", action="store_true", help="list files and sizes and check the disk; download nothing")
    p.set_defaults(func=cmd_pull)


def cmd_tune(args) -> int:
    from .engine.calibrate import measure
    from .hardware.commands import TuneRequest, run_tune

    def measure_engine(model: str, accelerator: str):
        return measure(model, accelerator, progress=lambda s: print(f"  {s}", file=sys.stderr))
    model = str(model_path(args.model)) if args.model else None
    run_tune(TuneRequest(model, args.output, args.quick, args.profile, args.ctx, args.dtype, args.quant,
                         args.budget), measure_engine=measure_engine)
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise HybridMoEError(f"{flag} {text!r}: expected integers separated by commas, e.g. 128,512") from None


def cmd_bench(args) -> int:
    from .engine.bench import BenchOptions, format_table, run_bench, to_json
    opts = BenchOptions(_ints(args.n_prompt, "-p"), _ints(args.n_gen, "-n"), args.repetitions, not args.no_warmup)
    if args.ctx is None:  # room for the longest test, within the model's own limit
        args.ctx = max(4096, max(opts.n_prompt) + 2, max(opts.n_gen) + 3)
    results = run_bench(load_from_args(args), opts, progress=lambda s: print(s, file=sys.stderr))
    print(to_json(results) if args.json else format_table(results))
    return 0


def cmd_pull(args) -> int:
    from .pull import pull
    pull(args.repo, args.quant, args.dir, args.dry_run, args.revision)
    return 0
# --- end tune, bench, pull


def main(argv: list[str] | None = None) -> int:
    # Everything inside the try, so that Ctrl-C during the first imports (torch takes a second or two) ends
    # quietly too.
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except HybridMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # invalid settings, e.g. a negative temperature
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, and nobody to say it to
        try:  # so that Python's own flush of stdout at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
