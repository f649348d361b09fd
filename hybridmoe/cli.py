"""The `hybridmoe` command line. Each subcommand is a small function over the public API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import HybridMoEError

EPILOG = """examples:
  hybridmoe chat                                   chat with the built-in demo model
  hybridmoe generate ./DeepSeek-V3 -p "Hello" -n 64 --device cuda
  hybridmoe perplexity ./model --file wiki.txt --json
  hybridmoe inspect ./DeepSeek-R1                  works with only config.json present
"""


def _model_opts(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("model", nargs="?", default=None,
                       help="model directory (HF config.json + safetensors + tokenizer.json); default: the demo model")
    else:
        p.add_argument("model", help="model directory (HF config.json + safetensors + tokenizer.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, "
                                                 "float32 on cpu)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: min(4096, model's))")


def _offload_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offload (routed experts in RAM, a GPU expert cache)")
    g.add_argument("--accelerator", choices=("cuda", "cpu"), default=None,
                   help="cuda (default with --device cuda), or cpu to run the offload engine with the CPU standing "
                        "in for the GPUs")
    g.add_argument("--devices", type=int, default=1, help="GPUs to split the layers over (default: 1)")
    g.add_argument("--expert-cache-slots", type=int, default=None,
                   help="GPU expert slots per device (default: as many as fit; 0 turns the cache off)")
    g.add_argument("--no-prefetch", action="store_true", help="do not prefetch predicted experts")
    g.add_argument("--experts-tier", choices=("mmap", "pinned"), default="mmap",
                   help="host tier of the experts: mmap (page cache, default) or pinned (copied once to pinned RAM)")


def load_from_args(args):
    """The engine for a parsed command line (model, device, dtype, ctx and the offload options)."""
    from . import load
    return load(args.model, device=args.device, dtype=args.dtype, context=args.ctx,
                accelerator=getattr(args, "accelerator", None), devices=getattr(args, "devices", 1),
                expert_cache_slots=getattr(args, "expert_cache_slots", None),
                prefetch=not getattr(args, "no_prefetch", False), experts_tier=getattr(args, "experts_tier", "mmap"))


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

    p = sub.add_parser("chat", help="terminal chat with a live monitor (Textual)")
    _model_opts(p, optional=True)
    _offload_opts(p)
    p.add_argument("--profile", default=None, help="hardware profile (TOML)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("repl", help="plain line-based chat on stdin/stdout (scriptable)")
    _model_opts(p, optional=True)
    _offload_opts(p)
    p.add_argument("--profile", default=None, help="hardware profile (TOML)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_repl)

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
    p.add_argument("model", help="model directory or its config.json (weights not needed)")
    p.add_argument("--ctx", type=int, default=4096, help="context length to budget KV cache for (default: 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    p.add_argument("--gpus", default=None, help='describe GPUs instead of probing, e.g. "2x48GiB" or "80GiB,24GiB"')
    p.add_argument("--ram", default=None, help='describe host RAM instead of probing, e.g. "512GiB"')
    p.add_argument("--cores", type=int, default=None, help="CPU cores (default: probed)")
    p.add_argument("--experts-tier", choices=("auto", "pinned", "mmap"), default="auto",
                   help="host tier for experts (default: pinned if it fits in RAM, else mmap)")
    p.add_argument("--expert-cache-slots", type=int, default=None, help="cap on GPU expert slots per device")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the weights at run time (default: bfloat16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="architecture, parameters by category, bytes read per token (config only)")
    p.add_argument("model", help="model directory or its config.json (weights not needed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
    return ap


_load = load_from_args


def cmd_chat(args) -> int:
    try:
        from hybridmoe_tui.app import main as tui_main
    except ImportError as e:
        raise HybridMoEError(f"the chat UI needs textual ({e}); install with: pip install textual") from None
    return tui_main(args) or 0


def cmd_repl(args) -> int:
    from .repl import main as repl_main
    return repl_main(args) or 0


def cmd_generate(args) -> int:
    from . import Done, Error, GenerationConfig, Stats, Text
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    cfg = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                           seed=args.seed, stop=tuple(args.stop))
    engine = _load(args)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": prompt}]
        events = engine.chat(msgs, cfg)
    else:
        events = engine.generate(prompt, cfg)
    channel, last_stats = "answer", None
    try:
        for ev in events:
            if isinstance(ev, Text):
                if ev.channel != channel:
                    sys.stdout.write("<think>\n" if ev.channel == "reasoning" else "\n</think>\n")
                    channel = ev.channel
                sys.stdout.write(ev.text)
                sys.stdout.flush()
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
    engine = _load(args)
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
            raise HybridMoEError(f"{engine.path}: no tokenizer.json; pass --tokens instead of --file")
        ids = engine.tokenizer.encode(path.read_text(errors="replace"))
    if len(ids) < 2:
        raise HybridMoEError("need at least 2 tokens to score")
    nll, argmax = [], []
    window = engine.max_context
    # Windows of the context length, each scored on its own (as llama.cpp's perplexity does).
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window + 1]
        if len(chunk) < 2:
            break
        logp = torch.log_softmax(engine.logits(chunk[:-1]), dim=-1)
        target = torch.tensor(chunk[1:])
        nll += (-logp.gather(1, target[:, None])[:, 0]).tolist()
        argmax += logp.argmax(-1).tolist()
    mean = sum(nll) / len(nll)
    out = {"n_tokens": len(nll), "nll": mean, "ppl": float(torch.tensor(mean).exp()), "nll_per_token": nll,
           "argmax": argmax}
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


def cmd_inspect(args) -> int:
    from .models.loader import read_config
    from .models.summary import summarize
    s = summarize(read_config(args.model))
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
    from .hardware.probe import probe
    from .offload.plan import GPU, Hardware
    hw = probe()
    gpus = hw.gpus
    if args.gpus:
        gpus = []
        for part in args.gpus.split(","):
            count, _, size = part.partition("x") if "x" in part else ("1", "", part)
            try:
                n = int(count)
            except ValueError:
                raise HybridMoEError(f"--gpus {args.gpus!r}: expected e.g. 2x48GiB or 80GiB,24GiB") from None
            b = _parse_size(size, "--gpus")
            gpus += [GPU(f"GPU {b / (1 << 30):.0f} GiB", b, b)] * n
    ram = _parse_size(args.ram, "--ram") if args.ram else None
    return Hardware(tuple(gpus), ram or hw.ram_total, ram or hw.ram_available, args.cores or hw.cpu_cores)


def cmd_plan(args) -> int:
    from .engine.engine import DTYPES
    from .models.loader import read_config
    from .offload.plan import GiB, PlanOptions, footprint_from_config, make_plan
    if args.dtype not in DTYPES:
        raise HybridMoEError(f"--dtype {args.dtype!r}: use one of {', '.join(DTYPES)}")
    cfg = read_config(args.model)
    wbytes = 4 if DTYPES[args.dtype].is_floating_point and DTYPES[args.dtype].itemsize == 4 else 2
    fp = footprint_from_config(cfg, weight_bytes=wbytes, expert_bytes=wbytes)
    plan = make_plan(fp, _hardware(args), PlanOptions(context=args.ctx, batch=args.batch,
                                                      experts_tier=args.experts_tier,
                                                      max_slots=args.expert_cache_slots))
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
    for note in plan.notes:
        print(f"note: {note}")
    for problem in plan.problems:
        print(f"does not fit: {problem}")
    print("fits" if plan.fits else "DOES NOT FIT")
    return 0 if plan.fits else 3


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
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


if __name__ == "__main__":
    sys.exit(main())
