"""What a model is made of, from config.json alone: parameters by category and bytes read per decoded token."""
from __future__ import annotations

import torch

from .loader import expected_expert_names, model_args

CATEGORIES = ("embeddings", "attention", "dense", "shared_experts", "routers", "routed_experts", "norms")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


def _category(name: str) -> str:
    if name.startswith(("tok_embeddings", "output")):
        return "embeddings"
    if "experts." in name:
        return "routed_experts"
    if ".ffn.shared" in name:
        return "shared_experts"
    if ".ffn.router" in name:
        return "routers"
    if name.endswith("norm.weight") and ".attn." not in name:
        return "norms"
    if ".attn." in name:
        return "attention"
    return "dense"


def summarize(cfg: dict) -> dict:
    """Parameter counts by category, bytes on disk and bytes read per decoded token, for a config dict."""
    family, args = model_args(cfg)
    with torch.device("meta"):
        model = family.build(args)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    wbytes = DTYPE_BYTES.get(dtype, 2)
    fp8 = (cfg.get("quantization_config") or {}).get("quant_method") == "fp8"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("output.weight")
    shapes |= expected_expert_names(args, model)
    params = dict.fromkeys(CATEGORIES, 0)
    nbytes = dict.fromkeys(CATEGORIES, 0)
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        cat = _category(name)
        params[cat] += n
        quantized = fp8 and len(shape) == 2 and cat in ("attention", "dense", "shared_experts", "routed_experts")
        # fp8 weights carry one f32 scale per 128x128 block
        nbytes[cat] += n + 4 * -(-shape[0] // 128) * -(-shape[1] // 128) if quantized else n * wbytes
    n_moe = len(model.moe_layers())
    per_expert = nbytes["routed_experts"] / max(1, n_moe * args.n_routed_experts)
    top_k = args.router.top_k if getattr(args, "router", None) else 0
    emb_row = args.dim * wbytes
    read = {c: nbytes[c] for c in CATEGORIES if c not in ("embeddings", "routed_experts")}
    read["embeddings"] = nbytes["embeddings"] - args.vocab_size * args.dim * wbytes + emb_row \
        if not args.tie_embeddings else nbytes["embeddings"]
    read["routed_experts"] = int(per_expert * top_k * n_moe)
    active = sum(params.values()) - params["routed_experts"] + (params["routed_experts"] * top_k
                                                               // max(1, args.n_routed_experts))
    return {
        "model_type": cfg.get("model_type"),
        "layers": args.n_layers,
        "moe_layers": n_moe,
        "hidden_size": args.dim,
        "routed_experts": args.n_routed_experts,
        "experts_per_token": top_k,
        "dtype": "fp8 (block-scaled)" if fp8 else dtype,
        "params": params,
        "params_total": sum(params.values()),
        "params_active": active,
        "bytes": nbytes,
        "bytes_total": sum(nbytes.values()),
        "bytes_per_expert": int(per_expert),
        "bytes_read_per_token": read,
        "bytes_read_per_token_total": sum(read.values()),
    }


def summarize_gguf(path) -> dict:
    """As summarize(), with bytes as the GGUF file stores them (quantized), from the header and tensor table."""
    from ..formats.gguf import GGUFFile, hf_config
    from ..formats.families import GGUF_TENSORS
    from ..formats.gguf_names import GGUF_IGNORED
    from ..formats.names import NameMap
    from ..kernels.cpu import decode_route
    f = GGUFFile(path)
    s = summarize(hf_config(f))
    names = NameMap(GGUF_TENSORS[f.arch], ignored=GGUF_IGNORED)
    nbytes = dict.fromkeys(CATEGORIES, 0)
    for name, t in f.tensors.items():
        mapped = names(name)
        if mapped is None or (mapped[1] is not None and mapped[1] >= s["layers"]):
            continue  # unused tensors and multi-token-prediction layers
        nbytes[_category(mapped[0].partition(":")[0])] += t.nbytes
    n_experts = max(1, s["moe_layers"] * s["routed_experts"])
    per_expert = nbytes["routed_experts"] / n_experts
    read = dict(nbytes)
    read["routed_experts"] = int(per_expert * s["experts_per_token"] * s["moe_layers"])
    emb = f.tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in f.tensors:
        read["embeddings"] -= emb.nbytes - emb.nbytes // max(1, emb.shape[0])  # one embedding row per token
    types = sorted({t.qtype for n, t in f.tensors.items() if "_exps." in n})
    s["expert_cpu_decode"] = {t.name: decode_route(t) for t in types}
    s.update(dtype=f"GGUF, experts {'/'.join(t.name for t in types)}", bytes=nbytes, bytes_total=sum(nbytes.values()),
             bytes_per_expert=int(per_expert), bytes_read_per_token=read,
             bytes_read_per_token_total=sum(read.values()))
    return s
