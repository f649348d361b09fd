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
    p.add_argument("--profile", default=None, help="hardware profile (TOML)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("repl", help="plain line-based chat on stdin/stdout (scriptable)")
    _model_opts(p, optional=True)
    p.add_argument("--profile", default=None, help="hardware profile (TOML)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_repl)

    p = sub.add_parser("generate", help="complete a prompt and stream the text to stdout")
    _model_opts(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    _sampling_opts(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="negative log-likelihood and perplexity of a text or token ids")
    _model_opts(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="text file, tokenized with the model's tokenizer")
    src.add_argument("--tokens", help='token ids, e.g. "1 2 3"')
    p.add_argument("--json", action="store_true", help="print JSON: n_tokens, nll, ppl, nll_per_token, argmax")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("inspect", help="architecture, parameters by category, bytes read per token (config only)")
    p.add_argument("model", help="model directory or its config.json (weights not needed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
    return ap


def _load(args):
    from . import load
    return load(args.model, device=args.device, dtype=args.dtype, context=args.ctx)


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
