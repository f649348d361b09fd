"""Build the embedded demo model: a small DeepSeek-V3 trained on the docstrings of the Python standard library.

Three stages, so that tokenization can run on one machine and training on another:

    python scripts/train_demo.py --prepare .demo_data                 # corpus, tokenizer, token ids (.npy)
    python scripts/train_demo.py --data .demo_data --out hybridmoe/demo_model --device cuda
    python scripts/train_demo.py --report hybridmoe/demo_model --data .demo_data   # samples, routing, README.md

Routing is trained as DeepSeek-V3 does it: the router weights get gradients through the gate weights of the
chosen experts, and `e_score_correction_bias` follows the auxiliary-loss-free rule
bias += gamma * sign(mean_load - load) after every step (frozen for the last part of training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus as dc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Model shape. 1 dense + 5 MoE layers; each MoE layer has 16 routed experts in 4 groups (2 groups allowed per
# token, 2 experts per token) plus one shared expert.
MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=640,
    moe_intermediate_size=128,
    num_hidden_layers=6,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_interleave=True,
    tie_word_embeddings=False,
    attention_bias=False,
    initializer_range=0.02,
)
ROPE_THETA = 10000.0
# Keys the upstream DeepSeek-V3 config.json carries that transformers does not need; engines read them.
UPSTREAM_KEYS = dict(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, num_nextn_predict_layers=0,
                     rope_theta=ROPE_THETA, rope_scaling=None, ep_size=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--prepare", metavar="DIR", type=Path,
                       help="extract the corpus, train the tokenizer and write token ids into DIR, then stop")
    stage.add_argument("--report", metavar="MODEL_DIR", type=Path,
                       help="load a trained model with transformers, generate samples, measure routing and "
                            "write MODEL_DIR/README.md, then stop")
    p.add_argument("--data", type=Path, default=REPO / ".demo_data", help="folder written by --prepare")
    p.add_argument("--out", type=Path, default=REPO / "hybridmoe" / "demo_model", help="where the model is saved")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 means --epochs passes over the data")
    p.add_argument("--epochs", type=float, default=12.0, help="passes over the training tokens when --steps is 0")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=3e-4, help="bias update speed of the aux-loss-free balancing")
    p.add_argument("--freeze-bias-at", type=float, default=0.8,
                   help="fraction of training after which the correction bias stops moving")
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation passes")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--experts", default="auto", choices=["auto", "eager", "grouped_mm"],
                   help="transformers experts implementation for training; auto times both on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-size", type=int, default=MODEL["vocab_size"], help="tokenizer size for --prepare")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="with --steps 0, shorten the schedule to fit this many minutes (timed on CUDA); "
                        "in any case stop and save when training runs longer (0: no limit)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------- prepare

def prepare(args: argparse.Namespace) -> None:
    import numpy as np

    out = args.prepare
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    items = dc.extract_items()
    print(f"[prepare] {len(items)} docstrings from {dc.stdlib_dir()} ({time.time() - t0:.1f}s)", flush=True)
    docs = dc.build_documents(items, args.seed)
    train_docs = [t for m, t in docs if not dc.is_validation(m)]
    val_docs = [t for m, t in docs if dc.is_validation(m)]
    print(f"[prepare] {len(train_docs)} train / {len(val_docs)} val documents, "
          f"{sum(map(len, train_docs)) / 1e6:.2f}M / {sum(map(len, val_docs)) / 1e6:.2f}M chars", flush=True)

    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": " q "}, {"role": "assistant", "content": "a"}]
    for gen in (False, True):
        assert dc.render_chat(probe, gen) == dc.render_chat_plain(probe, gen), "chat renderers disagree"

    tok = dc.train_tokenizer(train_docs, args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    dc.dump_json(out / "tokenizer_config.json", dc.tokenizer_config(MODEL["max_position_embeddings"]))
    print(f"[prepare] tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t0:.1f}s)", flush=True)

    for name, texts in (("train", train_docs), ("val", val_docs)):
        ids = [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in enc.ids]
        np.save(out / f"{name}.npy", np.asarray(ids, dtype=np.uint16))
        print(f"[prepare] {name}.npy: {len(ids)} tokens ({sum(map(len, texts)) / len(ids):.2f} chars/token)",
              flush=True)
    with open(out / "samples.txt", "w") as f:
        f.write("\n\n".join(train_docs[:20]))
    special = {s: tok.token_to_id(s) for s in dc.SPECIAL_TOKENS}
    dc.dump_json(out / "meta.json", {**dc.corpus_meta(), "seed": args.seed, "special_ids": special,
                                     "documents": {"train": len(train_docs), "val": len(val_docs)},
                                     "docstrings": len(items)})
    print(f"[prepare] done in {time.time() - t0:.1f}s -> {out}", flush=True)


# ------------------------------------------------------------------------------------------------------- model

def build_config(special: dict[str, int]):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**MODEL, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                              bos_token_id=special[dc.BOS], eos_token_id=special[dc.EOS],
                              pad_token_id=special[dc.PAD])
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


def routers(model) -> list:
    """The router modules of the MoE layers, in layer order."""
    return [m for name, m in model.named_modules() if hasattr(m, "e_score_correction_bias")]


class LoadCounter:
    """Counts, per MoE layer, how many tokens chose each expert (forward hooks on the routers; no host sync)."""

    def __init__(self, model, n_experts: int) -> None:
        import torch

        self.gates = routers(model)
        self.counts = torch.zeros(len(self.gates), n_experts, dtype=torch.int64,
                                  device=self.gates[0].e_score_correction_bias.device)
        self.enabled = True
        for i, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):
        import torch

        def hook(module, inputs, output):
            if not self.enabled:
                return
            # The router returns (logits, weights, indices) in recent transformers; pick the integer tensor.
            ids = next(o for o in output if isinstance(o, torch.Tensor) and not o.is_floating_point())
            self.counts[layer] += torch.bincount(ids.reshape(-1), minlength=self.counts.shape[1])

        return hook

    def take(self):
        counts = self.counts.clone()
        self.counts.zero_()
        return counts


def balance_bias(counter: LoadCounter, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
    import torch

    counts = counter.take().float()  # [L, E]
    with torch.no_grad():
        step = gamma * torch.sign(counts.mean(dim=1, keepdim=True) - counts)
        for gate, delta in zip(counter.gates, step):
            gate.e_score_correction_bias.add_(delta)


def load_tokens(data: Path):
    import numpy as np
    import torch

    train = torch.from_numpy(np.load(data / "train.npy").astype(np.int64))
    val = torch.from_numpy(np.load(data / "val.npy").astype(np.int64))
    return train, val


def batch_at(stream, starts, seq_len: int):
    import torch

    return torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])  # [B, S+1]


def evaluate(model, val, seq_len: int, device, autocast, max_windows: int = 64) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    n = min(max_windows, (len(val) - 1) // seq_len)
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for w in range(0, n, 8):
            starts = torch.arange(w, min(n, w + 8)) * seq_len
            xy = batch_at(val, starts, seq_len).to(device)
            logits = model(input_ids=xy[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += xy[:, 1:].numel()
    model.train()
    return total / count


def make_optimizer(model, args, fused: bool):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norm weights and the router stay free of weight decay.
        (no_decay if p.ndim < 2 or name.endswith("gate.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def new_model(config, seed: int, device, experts: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    else:
        model.config._experts_implementation = experts
    return model.to(device).train()


def pick_experts_impl(config, args, device, autocast, train) -> tuple[str, float]:
    """Times a few training steps with each experts implementation that works; returns the fastest and its s/step."""
    import torch
    import torch.nn.functional as F

    if device.type != "cuda":
        return ("eager" if args.experts == "auto" else args.experts), 0.0
    best, best_t = "eager", float("inf")
    for impl in ("grouped_mm", "eager") if args.experts == "auto" else (args.experts,):
        try:
            model = new_model(config, args.seed, device, impl)
            opt = make_optimizer(model, args, fused=True)
            g = torch.Generator().manual_seed(0)
            for i in range(6):
                if i == 2:
                    torch.cuda.synchronize()
                    t0 = time.time()
                starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=g)
                xy = batch_at(train, starts, args.seq_len).to(device)
                with autocast():
                    logits = model(input_ids=xy[:, :-1]).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = (time.time() - t0) / 4
            print(f"[train] experts={impl}: {dt * 1000:.0f} ms/step", flush=True)
            if dt < best_t:
                best, best_t = impl, dt
        except Exception as exc:  # an implementation missing from this transformers/torch is skipped
            print(f"[train] experts={impl} unavailable: {type(exc).__name__}: {exc}", flush=True)
        finally:
            model = opt = None
            torch.cuda.empty_cache()
    return best, best_t


def train(args: argparse.Namespace) -> None:
    import contextlib

    import torch
    import torch.nn.functional as F

    meta = json.loads((args.data / "meta.json").read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    import transformers

    print(f"[train] torch {torch.__version__}, transformers {transformers.__version__}, device {device}", flush=True)
    train_ids, val_ids = load_tokens(args.data)
    config = build_config(meta["special_ids"])
    tokens_per_step = args.batch * args.seq_len
    impl, step_s = pick_experts_impl(config, args, device, autocast, train_ids)
    total = args.steps or max(1, int(args.epochs * len(train_ids) / tokens_per_step))
    if not args.steps and args.max_minutes and step_s:
        # Fit the whole schedule into the time limit (15% margin for evaluation); the log records the step count.
        total = min(total, int(args.max_minutes * 60 * 0.85 / step_s))
    freeze_at = int(total * args.freeze_bias_at)
    print(f"[train] {len(train_ids)} train / {len(val_ids)} val tokens; {total} steps of {tokens_per_step} tokens "
          f"({total * tokens_per_step / len(train_ids):.1f} epochs)", flush=True)
    model = new_model(config, args.seed, device, impl)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] experts={impl}; {n_params / 1e6:.2f}M parameters", flush=True)
    counter = LoadCounter(model, MODEL["n_routed_experts"])
    opt = make_optimizer(model, args, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)

    log: list[dict] = []
    t0 = time.time()
    running = None
    step = 0
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        xy = batch_at(train_ids, starts, args.seq_len).to(device, non_blocking=True)
        with autocast():
            logits = model(input_ids=xy[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step < freeze_at:
            balance_bias(counter, args.gamma)
        else:
            counter.take()

        last = step == total - 1
        out_of_time = args.max_minutes and time.time() - t0 > args.max_minutes * 60
        if step % 25 == 0 or step % args.eval_every == 0 or last or out_of_time:
            value = loss.item()  # host sync, once per log line
            running = value if running is None else 0.8 * running + 0.2 * value
            entry = {"step": step, "loss": round(value, 4), "lr": round(lr_at(step, total, args), 6),
                     "elapsed_s": round(time.time() - t0, 1)}
            if step % args.eval_every == 0 or last or out_of_time:
                entry["val_loss"] = round(evaluate(model, val_ids, args.seq_len, device, autocast), 4)
                bias = torch.stack([g.e_score_correction_bias for g in counter.gates])
                entry["bias_absmax"] = round(bias.abs().max().item(), 4)
            log.append(entry)
            tps = (step + 1) * tokens_per_step / max(1e-9, time.time() - t0)
            extra = f" val {entry['val_loss']:.3f}" if "val_loss" in entry else ""
            print(f"[train] step {step:5d}/{total} loss {value:.3f} (avg {running:.3f}){extra} "
                  f"lr {entry['lr']:.2e} {tps / 1e3:.0f}k tok/s {entry['elapsed_s']:.0f}s", flush=True)
        if out_of_time:
            print(f"[train] time limit reached at step {step}; saving", flush=True)
            break

    summary = {"steps_done": step + 1, "steps_planned": total, "batch": args.batch, "seq_len": args.seq_len,
               "lr": args.lr, "gamma": args.gamma, "freeze_bias_at": args.freeze_bias_at, "seed": args.seed,
               "experts_impl": impl, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "train_tokens": len(train_ids), "val_tokens": len(val_ids),
               "final_train_loss": log[-1]["loss"], "final_val_loss": log[-1].get("val_loss"),
               "wall_s": round(time.time() - t0, 1), "log": log}
    save(model, args, meta, summary)


def save(model, args, meta: dict, summary: dict) -> None:
    """bf16 weights (the correction bias stays fp32, as upstream), tokenizer, configs and the training log."""
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=torch.bfloat16).eval()
    for gate in routers(model):
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)

    cfg = json.loads((out / "config.json").read_text())
    cfg.update(UPSTREAM_KEYS)
    dc.dump_json(out / "config.json", cfg)
    special = meta["special_ids"]
    dc.dump_json(out / "generation_config.json", {
        "bos_token_id": special[dc.BOS], "eos_token_id": special[dc.EOS], "pad_token_id": special[dc.PAD],
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(args.data / name, out / name)
    summary["corpus"] = {k: meta[k] for k in ("python", "licence", "docstrings", "documents")}
    dc.dump_json(out / "training_log.json", summary)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f"[save] {out}: {sizes}, total {sum(sizes.values()) / 1e6:.2f} MB", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.prepare:
        prepare(args)
    elif args.report:
        from demo_report import report  # the report stage needs only the saved model and the token ids
        report(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
