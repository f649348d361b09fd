"""bf16 parity on a CUDA device: hybridmoe and transformers, both in bf16 on the GPU, each against transformers in
f32 on the CPU, on random tiny checkpoints of every supported family. Prints one table.

    python bench/cuda_parity.py [--device cuda] [--tokens 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import tiny  # noqa: E402

import hybridmoe  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).abs().max() / b.abs().max()).item()


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1).cpu() == b.argmax(-1).cpu()).float().mean().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in tiny.BUILDERS.items():
            path = build(Path(tmp) / name)
            ids = torch.randint(8, tiny.VOCAB, (1, args.tokens), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits[0]
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(args.device).eval()
                hf_logits = hf(ids.to(args.device)).logits[0]
                hf_gen = hf.generate(ids[:, :8].to(args.device), max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
            eng = hybridmoe.load(path, device=args.device)
            ours = eng.logits(ids[0].tolist())
            done = list(eng.generate(ids[0, :8].tolist(), temperature=0, max_tokens=32, ignore_eos=True))[-1]
            same = sum(a == b for a, b in zip(done.token_ids, hf_gen)) / 32
            rows.append((name, str(eng.dtype).replace("torch.", ""), rel(ours, ref), rel(hf_logits, ref),
                         top1(ours, ref), top1(hf_logits, ref), rel(ours, hf_logits), same))
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"torch {torch.__version__}")
    print(f"{'family':<13}{'dtype':<10}{'ours vs f32':>12}{'HF vs f32':>11}{'top1 ours':>10}{'top1 HF':>9}"
          f"{'ours vs HF':>11}{'greedy32 same':>14}")
    for r in rows:
        print(f"{r[0]:<13}{r[1]:<10}{r[2]:>12.2e}{r[3]:>11.2e}{r[4]:>10.3f}{r[5]:>9.3f}{r[6]:>11.2e}{r[7]:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
