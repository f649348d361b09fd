"""The report stage of the demo model's build: sample answers, routing statistics, and the model card README.md.

    python scripts/train_demo.py --report hybridmoe/demo_model --data .demo_data
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus as dc  # noqa: E402
from train_demo import MODEL, load_tokens, routers  # noqa: E402

# (prompt, module it asks about); urllib.parse is one of the held-out modules.
PROMPTS = [
    ("What does `json.dumps` do?", "json"),
    ("Explain `textwrap.wrap`.", "textwrap"),
    ("What is the `heapq` module?", "heapq"),
    ("How do I use os.path.join?", "os.path"),
    ("Tell me about collections.OrderedDict.", "collections"),
    ("Which standard library method does this: Shuffle list x in place, and return None.", "random"),
    ("What does `urllib.parse.urlparse` do?", "urllib.parse"),
    ("Hello", ""),
]


def routing_stats(model, ids, seq_len: int, k: int) -> list[dict]:
    """Per MoE layer: load share of each expert and how skewed it is, on the given tokens."""
    import torch

    records: list[list] = [[] for _ in routers(model)]
    hooks = []
    for i, gate in enumerate(routers(model)):
        def hook(module, inputs, output, i=i):
            records[i].append(next(o for o in output if not o.is_floating_point()).reshape(-1, k))
        hooks.append(gate.register_forward_hook(hook))
    with torch.no_grad():
        for s in range(0, len(ids) - seq_len, seq_len):
            model(input_ids=ids[s:s + seq_len][None])
    for h in hooks:
        h.remove()
    stats = []
    for layer, rec in enumerate(records):
        sel = torch.cat(rec)  # [T, K]
        n_exp = MODEL["n_routed_experts"]
        load = torch.bincount(sel.reshape(-1), minlength=n_exp).double()
        share = load / load.sum()
        ent = -(share[share > 0] * share[share > 0].log()).sum() / math.log(n_exp)
        # Reuse: how many of token t's experts token t-1 also used (k/E if routing were random).
        prev = torch.zeros(len(sel) - 1, n_exp, dtype=torch.bool)
        prev.scatter_(1, sel[:-1], True)
        reuse = prev.gather(1, sel[1:]).float().mean().item()
        top4 = share.sort(descending=True).values[:4].sum().item()
        stats.append({"layer": layer + MODEL["first_k_dense_replace"], "share": [round(x, 4) for x in share.tolist()],
                      "max_over_mean": round(share.max().item() * n_exp, 2),
                      "min_over_mean": round(share.min().item() * n_exp, 2),
                      "top4_share": round(top4, 3), "entropy": round(ent.item(), 3), "reuse_prev_token": round(reuse, 3)})
    return stats


def report(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.report
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[report] loaded {type(model).__name__}: {n_params} parameters", flush=True)

    samples = []
    for i, (prompt, module) in enumerate(PROMPTS):
        messages = [{"role": "user", "content": prompt}]
        text = dc.render_chat_plain(messages, add_generation_prompt=True)
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")["input_ids"]
            assert tok.decode(ids[0]) == text, "chat template and corpus rendering differ"
        except ImportError:  # no jinja2 here: the plain renderer produces the same text
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = {"prompt": prompt, "held_out": dc.is_validation(module)}
        for mode, kwargs in (("greedy", {"do_sample": False}),
                             ("sampled", {"do_sample": True, "temperature": 0.7, "top_p": 0.9})):
            torch.manual_seed(args.seed + i)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=160,
                                 repetition_penalty=1.1 if mode == "greedy" else 1.0, **kwargs)
            out[mode] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        samples.append(out)
        print(f"[report] {prompt}\n  greedy : {out['greedy'][:300]!r}\n  sampled: {out['sampled'][:300]!r}",
              flush=True)

    k = model.config.num_experts_per_tok
    val = load_tokens(args.data)[1][: 16 * 1024]
    stats_val = routing_stats(model, val, 1024, k)
    chat_ids = torch.cat([tok(dc.render_chat_plain([{"role": "user", "content": s["prompt"]},
                                                    {"role": "assistant", "content": s["greedy"]}]),
                              add_special_tokens=False, return_tensors="pt")["input_ids"][0] for s in samples])
    stats_chat = routing_stats(model, chat_ids, len(chat_ids) - 1, k)
    for name, stats in (("val", stats_val), ("chat", stats_chat)):
        for s in stats:
            print(f"[report] routing {name} layer {s['layer']}: max/mean {s['max_over_mean']} "
                  f"min/mean {s['min_over_mean']} top4 {s['top4_share']} entropy {s['entropy']} "
                  f"reuse {s['reuse_prev_token']}", flush=True)
    result = {"parameters": n_params, "samples": samples, "routing_val": stats_val, "routing_chat": stats_chat}
    write_readme(path, result)


def write_readme(path: Path, result: dict) -> None:
    cfg = json.loads((path / "config.json").read_text())
    log_path = path / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    sizes = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.name != "README.md"}
    n = result["parameters"]
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    active = n - n_moe * (cfg["n_routed_experts"] - cfg["num_experts_per_tok"]) * expert

    def routing_table(stats: list[dict]) -> str:
        rows = ["| layer | max/mean | min/mean | top-4 share | entropy | reuse t-1 | rare | load share per expert (%) |",
                "|---|---|---|---|---|---|---|---|"]
        for s in stats:
            shares = " ".join(f"{100 * x:.0f}" for x in s["share"])
            rows.append(f"| {s['layer']} | {s['max_over_mean']} | {s['min_over_mean']} | {s['top4_share']} | "
                        f"{s['entropy']} | {s['reuse_prev_token']} | {sum(x < 0.005 for x in s['share'])} | {shares} |")
        return "\n".join(rows)

    sample_text = "\n\n".join(
        f"**User:** {s['prompt']}{' (a held-out module, never seen in training)' if s['held_out'] else ''}"
        f"\n\n*greedy:*\n\n```text\n{s['greedy']}\n```\n\n*sampled (T=0.7, top-p 0.9):*"
        f"\n\n```text\n{s['sampled']}\n```" for s in result["samples"])
    corpus = log.get("corpus", {})
    passes = log.get("steps_done", 0) * log.get("batch", 0) * log.get("seq_len", 0) / max(1, log.get("train_tokens", 1))
    k, e = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    text = f"""# hybridmoe demo model

A small DeepSeek-V3 (`model_type: deepseek_v3`, `DeepseekV3ForCausalLM`) that `hybridmoe chat` runs when no model
is given. It answers questions about the Python standard library, in the style of its docstrings. It is a test
and benchmark model: it knows only what the docstrings say and invents freely outside them.

## Architecture

| | |
|---|---|
| parameters | {n:,} total, about {active:,} active per token |
| layers | {cfg['num_hidden_layers']} (layer 0 dense MLP, {cfg['intermediate_size']} wide; layers 1-{cfg['num_hidden_layers'] - 1} MoE) |
| hidden size / vocab | {cfg['hidden_size']} / {cfg['vocab_size']} (untied embeddings), context {cfg['max_position_embeddings']} |
| attention | MLA, {cfg['num_attention_heads']} heads, q_lora_rank {cfg['q_lora_rank']}, kv_lora_rank {cfg['kv_lora_rank']}, qk_nope {cfg['qk_nope_head_dim']} + qk_rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}, interleaved RoPE (theta {cfg['rope_theta']:g}) |
| MoE | {e} routed experts ({cfg['moe_intermediate_size']} wide) + {cfg['n_shared_experts']} shared, top-{k}, sigmoid scores with `e_score_correction_bias` (`noaux_tc`), {cfg['n_group']} groups of which {cfg['topk_group']} are kept per token, normalised weights times {cfg['routed_scaling_factor']} |
| weights | `model.safetensors`, bf16 (the `e_score_correction_bias` vectors in fp32, as upstream) |

Files: {", ".join(f"`{k_}` {v / 1e6:.2f} MB" if v > 1e5 else f"`{k_}` {v / 1e3:.1f} kB" for k_, v in sizes.items())}.

## Training data

The docstrings of the standard library of Python {corpus.get('python', '?')} ({corpus.get('docstrings', '?')} docstrings of
modules, classes, functions and methods), read with `ast` from the library's source files in sorted order (tests, `site-packages`
and build data left out). Licence of the text: **PSF License** (Python Software Foundation License Version 2).
Each module becomes a plain-text page of its docstrings, and each public object becomes chat conversations
("What does `json.dumps` do?" -> signature and docstring, "Which function does this: ...?" -> its name), rendered
with the chat template in `tokenizer_config.json`. About 3% of modules are held out for validation. The tokenizer is
a byte-level BPE trained on the same text, with the special tokens `<|begin|>` (bos), `<|end|>` (eos, end of turn),
`<|pad|>`, `<|system|>`, `<|user|>` and `<|assistant|>`.

## Training

{log.get('steps_done', '?')} steps of {log.get('batch', '?')} x {log.get('seq_len', '?')} tokens over {log.get('train_tokens', 0):,} training tokens (about
{passes:.0f} passes), AdamW (peak lr {log.get('lr', '?')}, cosine), bf16 autocast, on {log.get('device', '?')} in
{log.get('wall_s', '?')} s with torch {log.get('torch', '?')} and transformers {log.get('transformers', '?')}. The router is
trained by gradient through the gate weights; after every step `e_score_correction_bias += {log.get('gamma', '?')} * sign(mean_load - load)` per layer
(DeepSeek-V3's auxiliary-loss-free balancing), frozen for the last {100 * (1 - log.get('freeze_bias_at', 0.8)):.0f}% of the steps.

Final loss: train **{log.get('final_train_loss', '?')}**, validation (held-out modules) **{log.get('final_val_loss', '?')}**
(nats per token, lowest validation loss {min((e['val_loss'] for e in log.get('log', []) if 'val_loss' in e), default='?')}).
The corpus is small and is seen many times, so the model has largely memorised it: asked about an object it was
trained on, it usually gives the right signature and first sentences, then drifts into plausible but wrong text.
About modules it has not seen it produces docstring-like text that is wrong. Stopping at the lowest validation loss
(early, while the training loss was still about 2.5) would give a model that has learned far less of the corpus, so the
schedule runs to the end.

Reproduce:

```sh
python scripts/train_demo.py --prepare .demo_data
python scripts/train_demo.py --data .demo_data --out hybridmoe/demo_model --device cuda --steps {log.get('steps_done', 0)} \\
    --batch {log.get('batch')} --seq-len {log.get('seq_len')} --lr {log.get('lr')} --gamma {log.get('gamma')} --seed {log.get('seed')} --experts {log.get('experts_impl')}
python scripts/train_demo.py --report hybridmoe/demo_model --data .demo_data
```

The corpus and tokenizer are byte-identical for the same interpreter and seed; the weights match closely but not
bit for bit (GPU kernels sum in varying order).

## Routing

Share of the routed token slots each expert receives, per MoE layer, on 16k held-out tokens (uniform would be
{100 / e:.1f}% each). "reuse t-1" is the fraction of a token's experts that the previous token also used
(random routing would give {k / e:.3f}); "entropy" is normalised to 1 for a uniform load; "rare" counts the experts
with less than 0.5% of the load.

The balancing speed sets how skewed the load stays. With gamma = 1e-3 (DeepSeek-V3's value) the loads came out
nearly uniform (max/mean at most 1.6 in four of the five MoE layers; in layer 3 one expert was almost unused) at the
same loss; with 1e-4 one expert took 37-41% of the load in two layers and several were almost unused. The shipped 3e-4 keeps some layers balanced and others skewed,
which is what a cache and prefetch benchmark needs to tell policies apart.

{routing_table(result['routing_val'])}

The same on the chat samples below (prompts and greedy answers):

{routing_table(result['routing_chat'])}

## Samples

Generated with `transformers` from this folder (greedy with repetition penalty 1.1, and sampled), prompt rendered with
the chat template.

{sample_text}
"""
    (path / "README.md").write_text(text)
    print(f"[report] wrote {path / 'README.md'}", flush=True)
