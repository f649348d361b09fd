"""`hybridmoe convert`: an HF checkpoint directory -> one GGUF file that llama.cpp (and our GGUF loader) reads.

The output is streamed: every tensor's size is known from the headers, so the GGUF header is written first and then
the data one tensor (routed experts: one expert) at a time; memory stays at a few GB whatever the model size.
f32 / bf16 / q8_0 are encoded with the `gguf` package. q4_k_m is llama.cpp's own mix of K-quants for the routed
experts, made by its quantizer from a bf16 (or f32) GGUF written first; everything else is then q8_0.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import (GGML_QUANT_SIZES, ExpertGatingFuncType, GGUFWriter, LlamaFileType, RopeScalingType, SpecialVocab,
                  TokenType)
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState
from gguf.quants import quantize
from gguf.vocab import LlamaHfVocab

from ..errors import ConfigError, ModelFileError
from ..formats import llama_child
from ..formats.atomic import check_destination, staged, temporary_name
from ..formats.fp8 import dequant_fp8_blocks
from ..formats.families import ARCH_OF_MODEL_TYPE, BY_MODEL_TYPE, GGUF_ROPE_PERMUTED, GGUF_TENSORS
from ..formats.names import NameMap
from ..formats.safetensors import SafetensorsFiles

TARGETS = {"f32": LlamaFileType.ALL_F32, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
           "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M}
# llama.cpp's pre-tokenizer names, for BPE tokenizers whose splitting is more than plain GPT-2 byte-level.
PRE_TOKENIZERS = {"deepseek_v3": "deepseek-v3", "deepseek_v2": "deepseek-llm", "qwen3_moe": "qwen2"}
EXPERT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(gate|up|down)$")


@dataclass
class Job:
    """One GGUF tensor: its name, shape (torch order), type, and f32 pieces that are its rows in order."""
    name: str
    shape: tuple[int, ...]
    qtype: Q
    pieces: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def convert(src: str | Path, out: str | Path, target: str = "q8_0", progress: bool = True,
            tokenizer_pre: str | None = None) -> Path:
    """Write `out` from the HF model directory `src` (config.json, safetensors, tokenizer.json). The file appears
    under its name only when complete: a failure or Ctrl-C leaves an existing `out` as it was."""
    src, out = Path(src), Path(out)
    if target not in TARGETS:
        raise ConfigError(f"--type {target!r} is not supported; use one of {', '.join(TARGETS)}")
    check_destination(out)
    cfg = _read_config(src)
    with staged(out) as tmp:
        if target != "q4_k_m":
            _write(src, cfg, tmp, target, progress, tokenizer_pre)
            return out
        fp32_source = all(i.dtype == "F32" for i in SafetensorsFiles(src).tensors.values())
        unquantized = temporary_name(out, "unquantized.gguf")
        try:
            _write(src, cfg, unquantized, "f32" if fp32_source else "bf16", progress, tokenizer_pre)
            if progress:
                print("quantizing routed experts with llama.cpp (Q4_K_M mix; the rest Q8_0)", file=sys.stderr)
            llama_quantize(unquantized, tmp)
        finally:
            unquantized.unlink(missing_ok=True)
    return out


_LOG_CALLBACK = None  # kept alive: llama.cpp holds a pointer to it


def quiet_llama_cpp():
    """Import llama_cpp with llama.cpp's own logging limited to errors (it logs every tensor and key otherwise)."""
    global _LOG_CALLBACK
    import llama_cpp as L
    if _LOG_CALLBACK is None:
        @L.llama_log_callback
        def _log(level, text, user_data):
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr)
        _LOG_CALLBACK = _log
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return L


def llama_quantize(src: Path, dst: Path, threads: int | None = None) -> None:
    """llama.cpp's quantizer (routed experts get its Q4_K_M mix, every other matrix Q8_0), in a child process so
    that Ctrl-C stops it at once and a crash in it is a one-line error."""
    from importlib.util import find_spec
    if find_spec("llama_cpp") is None:
        raise ConfigError("--type q4_k_m needs llama.cpp's quantizer: pip install llama-cpp-python")
    r = llama_child.run(["quantize", str(src), str(dst), str(threads or os.cpu_count() or 1)])
    if r.returncode != 0:
        raise ModelFileError(f"{dst}: llama.cpp's quantizer failed on {src} ({llama_child.failure(r)})")


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (expected an HF model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in ARCH_OF_MODEL_TYPE:
        raise ConfigError(f"{path}: model_type {mt!r} cannot be converted to GGUF; supported: "
                          f"{', '.join(ARCH_OF_MODEL_TYPE)}")
    from .loader import model_args  # the same checks of every value as when loading the directory
    model_args(cfg, str(path))
    return cfg


def _write(src: Path, cfg: dict, out: Path, target: str, progress: bool, pre: str | None) -> None:
    arch = ARCH_OF_MODEL_TYPE[cfg["model_type"]]
    files = SafetensorsFiles(src)
    jobs = _jobs(files, cfg, arch, target)
    w = GGUFWriter(out, arch)
    try:
        _write_file(w, src, cfg, arch, jobs, target, progress, pre)
    except BaseException:
        for f in w.fout or []:  # the caller deletes the file; its buffered tail need not reach the disk
            with contextlib.suppress(OSError):
                f.close()
        if progress:
            print(file=sys.stderr)  # the error goes on a line of its own, not after the progress bar
        raise


def _write_file(w: GGUFWriter, src: Path, cfg: dict, arch: str, jobs: list[Job], target: str, progress: bool,
                pre: str | None) -> None:
    _metadata(w, cfg, arch, src.name, TARGETS[target])
    _tokenizer(w, src, cfg, pre)
    for job in jobs:
        w.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    total, done = sum(j.nbytes for j in jobs), 0
    for job in jobs:
        # As GGUFWriter.write_tensor_data, but piece by piece (one expert at a time)
        w.tensors[0].pop(job.name)
        w.write_padding(fout, fout.tell())
        n = 0
        for piece in job.pieces():
            data = _encode(piece, job.qtype)
            fout.write(data.data)  # not tofile(): its errors carry no errno (a full disk would not be named)
            n += data.nbytes
        if n != job.nbytes:
            raise ModelFileError(f"{src}: tensor {job.name} produced {n} bytes, expected {job.nbytes}")
        w.write_padding(fout, n)
        w.state = WriterState.WEIGHTS
        done += n
        if progress:
            bar = "#" * int(30 * done / max(total, 1))
            print(f"\r[{bar:<30}] {done / 2**30:6.2f}/{total / 2**30:.2f} GiB  {job.name:<40}", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    w.close()


def _encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    return quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)


def _choose(name: str, shape: tuple[int, ...], target: str) -> Q:
    """Norms, routers and the router bias stay f32 (llama.cpp never quantizes them); matrices take the target."""
    if len(shape) == 1 or "ffn_gate_inp" in name or target == "f32":
        return Q.F32
    if target == "bf16":
        return Q.BF16
    return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16


def _jobs(files: SafetensorsFiles, cfg: dict, arch: str, target: str) -> list[Job]:
    hf = NameMap(BY_MODEL_TYPE[cfg["model_type"]].hf_tensors)
    to_gguf = NameMap({ours: g for g, ours in GGUF_TENSORS[arch].items() if ":" not in ours})
    n_layers, tied = cfg["num_hidden_layers"], bool(cfg.get("tie_word_embeddings", False))
    block = tuple((cfg.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    permuted = {k.replace("{i}", r"(\d+)"): v for k, v in GGUF_ROPE_PERMUTED.get(arch, {}).items()}

    def load(name: str) -> np.ndarray:
        t = files.get(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if name + "_scale_inv" not in files:
                raise ModelFileError(f"{files.tensors[name].file}: FP8 tensor {name!r} has no {name}_scale_inv")
            t = dequant_fp8_blocks(t, files.get(name + "_scale_inv"), torch.float32, block, name)
        return t.float().numpy()

    jobs, experts = [], {}
    for name, info, ours, layer in files.mapped(hf, n_layers, cfg["model_type"]):
        if ours == "output.weight" and tied:
            continue
        m = EXPERT.match(ours)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = name
            continue
        if arch == "deepseek2" and ours.endswith("attn.wkv_b.weight"):
            jobs += _mla_jobs(name, info.shape, layer, cfg, load, target)
            continue
        gname = to_gguf(ours)[0]
        heads = next((cfg[v] for k, v in permuted.items() if re.fullmatch(k, ours)), None)
        if heads is None:
            fn = lambda n=name: iter([load(n)])  # noqa: E731
        else:
            fn = lambda n=name, h=heads: iter([_permute(load(n), h)])  # noqa: E731
        jobs.append(Job(gname, info.shape, _choose(gname, info.shape, target), fn))
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    for (layer, proj), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(n_experts)):
            raise ModelFileError(f"{files.dir}: layer {layer} has {proj} weights for experts {sorted(by_id)[:8]}..., "
                                 f"expected all {n_experts}")
        names = [by_id[e] for e in range(n_experts)]
        shape = (n_experts, *files.tensors[names[0]].shape)
        gname = to_gguf(f"layers.{layer}.experts.{proj}")[0]
        jobs.append(Job(gname, shape, _choose(gname, shape, target), lambda ns=names: (load(n) for n in ns)))
    jobs.sort(key=lambda j: (j.name.startswith("blk."), int(j.name.split(".")[1]) if j.name.startswith("blk.") else 0))
    return jobs


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from [half 0, half 1] to interleaved pairs: the order llama.cpp's rope expects."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _mla_jobs(name, shape, layer, cfg, load, target) -> list[Job]:
    """kv_b [H*(N+V), R] -> attn_k_b [H, R, N] (transposed) and attn_v_b [H, V, R], as llama.cpp's MLA path reads."""
    H, N, V = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    R = shape[1]

    def part(k: bool) -> Iterator[np.ndarray]:
        kv = load(name).reshape(H, N + V, R)
        yield np.ascontiguousarray(kv[:, :N].transpose(0, 2, 1) if k else kv[:, N:])

    return [Job(f"blk.{layer}.attn_k_b.weight", (H, R, N), _choose("k_b", (H, R, N), target), lambda: part(True)),
            Job(f"blk.{layer}.attn_v_b.weight", (H, V, R), _choose("v_b", (H, V, R), target), lambda: part(False))]


def _rope(cfg: dict) -> tuple[float, dict]:
    params, scaling = dict(cfg.get("rope_parameters") or {}), dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    return float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0))), merged


def _metadata(w: GGUFWriter, cfg: dict, arch: str, name: str, ftype: LlamaFileType) -> None:
    mt = cfg["model_type"]
    if (cfg.get("moe_layer_freq") or 1) != 1 or (cfg.get("decoder_sparse_step") or 1) != 1:
        raise ConfigError("config.json: MoE layers at a stride (moe_layer_freq / decoder_sparse_step) have no "
                          "GGUF form")
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_context_length(cfg.get("max_position_embeddings") or 4096)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    theta, rope = _rope(cfg)
    w.add_rope_freq_base(theta)
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    w.add_expert_count(n_experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(RopeScalingType.YARN if kind == "yarn" else RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow") or 1))
        if rope.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))  # llama.cpp's convention
    elif kind not in ("default", "linear"):
        raise ConfigError(f"config.json: rope scaling {kind!r} has no GGUF form here (default, linear or yarn)")
    if arch == "deepseek2":
        R, P = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
        if cfg.get("q_lora_rank"):
            w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(R)
        w.add_head_count_kv(1)  # llama.cpp runs MLA as one latent "MQA" head of R + P keys and R values
        w.add_key_length(R + P)
        w.add_value_length(R)
        w.add_key_length_mla(cfg["qk_nope_head_dim"] + P)
        w.add_value_length_mla(cfg["v_head_dim"])
        w.add_rope_dimension_count(P)
        w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
        w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor") or 1.0))
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", mt == "deepseek_v3")))
        sigmoid = (cfg.get("scoring_func") or ("sigmoid" if mt == "deepseek_v3" else "softmax")) == "sigmoid"
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX)
        n_group, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
        if 1 < n_group and topk_group < n_group:  # llama.cpp asserts a real restriction
            w.add_expert_group_count(n_group)
            w.add_expert_group_used_count(topk_group)
        return
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_feed_forward_length(cfg["intermediate_size"])
    if arch == "qwen3moe":
        if not cfg.get("norm_topk_prob", False):
            raise ConfigError("config.json: norm_topk_prob is false, but llama.cpp always renormalises Qwen3-MoE's "
                              "top-k weights; such a model has no faithful GGUF form")
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def _tokenizer(w: GGUFWriter, src: Path, cfg: dict, pre: str | None) -> None:
    path = src / "tokenizer.json"
    if not path.exists():
        raise ModelFileError(f"{path}: not found; the GGUF file carries the tokenizer, so it is needed")
    try:
        _vocab(w, src, path, json.loads(path.read_text(encoding="utf-8")), cfg, pre)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError,
            AttributeError) as e:
        raise ModelFileError(f"{path}: unexpected content ({type(e).__name__}: {e})") from None


def _vocab(w: GGUFWriter, src: Path, path: Path, tj: dict, cfg: dict, pre: str | None) -> None:
    model = tj.get("model") or {}
    n_vocab = cfg["vocab_size"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):  # SentencePiece-style (Mixtral)
        vocab = LlamaHfVocab(src)
        tokens, scores, types = zip(*vocab.all_tokens())
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens) + [f"[PAD{i}]".encode() for i in range(len(tokens), n_vocab)])
        w.add_token_scores(list(scores) + [-1000.0] * (n_vocab - len(tokens)))
        w.add_token_types(list(types) + [TokenType.UNUSED] * (n_vocab - len(tokens)))
    elif model.get("type") == "BPE":
        tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        types = [TokenType.UNUSED] * n_vocab
        for text, i in model["vocab"].items():
            tokens[i], types[i] = text, TokenType.NORMAL
        for t in tj.get("added_tokens") or []:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or _pre_tokenizer(tj, cfg["model_type"], path))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
    else:
        raise ConfigError(f"{path}: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    SpecialVocab(src, load_merges=False, n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _pre_tokenizer(tj: dict, model_type: str, path: Path) -> str:
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # plain GPT-2 splitting
    if model_type in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[model_type]
    raise ConfigError(f"{path}: cannot tell which llama.cpp pre-tokenizer matches; pass --tokenizer-pre NAME")
