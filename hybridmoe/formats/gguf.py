"""Zero-copy reading of GGUF files (llama.cpp's format) through the `gguf` package, split files included, and the
mapping of their metadata to the config.json keys our model families read.

`gguf.GGUFReader` trusts the counts in a file: a corrupted array length makes it loop for a very long time, and other
damage surfaces as assorted exceptions. So each file's header is first walked once here with every count checked
against the bytes left; only then is it handed to GGUFReader.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from ..errors import ConfigError, ModelFileError
from .families import GGUF_KEYS, GGUF_MODEL_TYPES, GGUF_REQUIRED
from .gguf_names import GATING_FUNCS

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value type -> struct format of a scalar (8 = string, 9 = array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Header:
    """Bounds-checked little-endian cursor over a file's bytes."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: corrupt or truncated GGUF header ({what} at byte {self.pos})")

    def take(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise self.fail(f"file ends inside {what}")
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.take("Q", what)
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} of {n} bytes runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, in_array: bool = False) -> None:
        if vtype in SCALARS:
            self.take(SCALARS[vtype], f"the value of {key!r}")
        elif vtype == 8:
            self.string(f"the value of {key!r}")
        elif vtype == 9 and not in_array:
            itype, count = self.take("I", f"{key!r}"), self.take("Q", f"{key!r}")
            if itype in SCALARS:
                size = struct.calcsize("<" + SCALARS[itype]) * count
                if size > len(self.buf) - self.pos:
                    raise self.fail(f"array {key!r} of {count} items runs past the end of the file")
                self.pos += size
            elif itype == 8 and count <= (len(self.buf) - self.pos) // 8:
                for _ in range(count):
                    self.string(f"an item of {key!r}")
            else:
                raise self.fail(f"array {key!r} has item type {itype} and {count} items")
        else:
            raise self.fail(f"key {key!r} has unknown value type {vtype}")


def _check_buffer(buf: memoryview, path: Path) -> None:
    """Walk one file's header and tensor table; raise ModelFileError naming the damage, the tensor and the file."""
    h = _Header(buf, path)
    if len(buf) < 4 or bytes(buf[:4]) != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
    h.pos = 4
    version = h.take("I", "the version")
    if version not in (2, 3):
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 or 3; big-endian files neither)")
    n_tensors, n_kv = h.take("Q", "the tensor count"), h.take("Q", "the key count")
    if n_kv > len(buf) // 13 or n_tensors > len(buf) // 24:  # bytes the smallest entries take
        raise h.fail(f"{n_kv} keys and {n_tensors} tensors cannot fit in {len(buf)} bytes")
    alignment = 32
    for _ in range(n_kv):
        key = h.string("a key")
        vtype = h.take("I", f"the type of {key!r}")
        start = h.pos
        h.value(vtype, key)
        if key == "general.alignment":
            if vtype != 4:
                raise h.fail("general.alignment is not a uint32")
            alignment = struct.unpack_from("<I", buf, start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise h.fail(f"general.alignment {alignment} is not a power of two")
    infos = []
    for _ in range(n_tensors):
        name = h.string("a tensor name")
        n_dims = h.take("I", f"the rank of {name!r}")
        if n_dims > MAX_DIMS:
            raise h.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [h.take("Q", f"the shape of {name!r}") for _ in range(n_dims)]
        qtype, offset = h.take("I", f"the type of {name!r}"), h.take("Q", f"the offset of {name!r}")
        infos.append((name, dims, qtype, offset))
    base = -(-h.pos // alignment) * alignment
    spans = []
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelFileError(f"{path}: tensor {name!r} has unknown GGML type {qtype}") from None
        if any(d <= 0 or d > 2 ** 40 for d in dims) or (dims and dims[0] % block):
            raise ModelFileError(f"{path}: tensor {name!r} has invalid shape {dims} for type "
                                 f"{GGMLQuantizationType(qtype).name}")
        end = base + offset + math.prod(dims) // block * type_size
        if end > len(buf):
            raise ModelFileError(f"{path}: truncated file: tensor {name!r} ends at byte {end} but the file has "
                                 f"{len(buf)} bytes; re-download it")
        spans.append((base + offset, end, name))
    spans.sort()
    for (_, end, before), (start, _, name) in zip(spans, spans[1:]):
        if start < end:  # two tensors sharing bytes: an edit of one would silently change the other
            raise ModelFileError(f"{path}: corrupt tensor table: tensor {name!r} overlaps {before!r}")


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    file: Path
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first): [rows, cols] for a matrix
    raw: np.ndarray  # uint8 [*shape[:-1], row_bytes], a view of the file's mapping

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


def split_parts(path: Path) -> list[Path]:
    """All files of a split model (`x-00001-of-00003.gguf`, any part may be named), else [path]."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ModelFileError(f"{path}: split model part(s) missing: {', '.join(missing)}")
    return parts


class GGUFFile:
    """The metadata and tensors of a GGUF model, one file or all parts of a split one, mapped without copying."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: file not found")
        self.parts = split_parts(self.path)
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for i, part in enumerate(self.parts):
            fields, tensors = _read(part)
            if i == 0:
                self.metadata = fields
            n = fields.get("split.count")
            if len(self.parts) > 1 and (n != len(self.parts) or fields.get("split.no") != i):
                raise ModelFileError(f"{part}: split metadata (split.no {fields.get('split.no')}, split.count {n}) "
                                     f"does not match the file name")
            for t in tensors:
                if t.name in self.tensors:
                    raise ModelFileError(f"{part}: tensor {t.name!r} is also in {self.tensors[t.name].file}")
                self.tensors[t.name] = t
        self.arch = self.metadata.get("general.architecture")
        if not isinstance(self.arch, str):
            raise ModelFileError(f"{self.path}: metadata key 'general.architecture' is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


def _read(path: Path) -> tuple[dict[str, object], list[GGUFTensor]]:
    try:
        size = path.stat().st_size
        if size < 24:
            raise ModelFileError(f"{path}: truncated GGUF file ({size} bytes)")
        mm = np.memmap(path, mode="c")  # copy-on-write: writable views that are never written
        _check_buffer(memoryview(mm), path)
        reader = GGUFReader(path, "c")
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            fields[key] = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise ModelFileError(f"{path}: metadata key {key!r} cannot be read ({e})") from None
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        raw = np.asarray(t.data).view(np.uint8).reshape(*shape[:-1], shape[-1] // block * type_size)
        tensors.append(GGUFTensor(t.name, path, GGMLQuantizationType(t.tensor_type), shape, raw))
    return fields, tensors


FLOAT_KEYS = {"rms_norm_eps", "rope_theta", "routed_scaling_factor"}
BOOL_KEYS = {"norm_topk_prob"}


def _value(f: GGUFFile, key: str, ours: str, value) -> int | float | bool:
    """The value with the type its config key takes: a mutated or foreign file must not reach the model code."""
    if ours in BOOL_KEYS and isinstance(value, bool):
        return value
    if ours in FLOAT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 31:
        return value
    raise ConfigError(f"{f.path}: metadata key {key!r} has value {value!r} of an unexpected type or range")


def metadata_names(arch: str) -> dict[str, str]:
    """config.json key -> the metadata key it comes from, for error messages about a GGUF file's values."""
    rope = {"factor": "rope.scaling.factor", "original_max_position_embeddings": "rope.scaling.original_context_length",
            "beta_fast": "rope.scaling.yarn_beta_fast", "beta_slow": "rope.scaling.yarn_beta_slow",
            "mscale": "rope.scaling.yarn_log_multiplier", "mscale_all_dim": "rope.scaling.yarn_log_multiplier"}
    return ({ours: f"{arch}.{key}" for key, ours in GGUF_KEYS.get(arch, {}).items()}
            | {f"rope_scaling.{ours}": f"{arch}.{key}" for ours, key in rope.items()})


def hf_config(f: GGUFFile) -> dict:
    """config.json keys for the model family of this file's architecture, from its metadata and tensor list."""
    arch = f.arch
    if arch not in GGUF_KEYS:
        raise ConfigError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: "
                          f"{', '.join(sorted(GGUF_KEYS))}")
    missing = [f"{arch}.{k}" for k in GGUF_REQUIRED[arch] if f.get(f"{arch}.{k}") is None]
    if missing:
        raise ConfigError(f"{f.path}: missing metadata key(s) {', '.join(missing)}")
    cfg: dict = {"hidden_act": "silu", "architecture": arch}
    for key, ours in GGUF_KEYS[arch].items():
        if f.get(f"{arch}.{key}") is not None:
            cfg[ours] = _value(f, f"{arch}.{key}", ours, f.get(f"{arch}.{key}"))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if cfg[key] < 1:
            raise ConfigError(f"{f.path}: metadata for {key} is {cfg[key]}; it must be at least 1")
    # As llama.cpp: the count must match the layers present (also keeps a corrupted count from building a huge
    # module tree, and a smaller one from silently dropping layers).
    blocks = {int(m[1]) for m in map(re.compile(r"blk\.(\d+)\.").match, f.tensors) if m}
    count = cfg["num_hidden_layers"]
    if len(blocks) != count or blocks and max(blocks) != count - 1:  # distinct numbers >= 0: they are 0..count-1
        have = f"layers {min(blocks)} to {max(blocks)} ({len(blocks)} in all)" if blocks else "no layers"
        raise ModelFileError(f"{f.path}: metadata {arch}.block_count is {count} but the file has tensors for "
                             f"{have}; the file is damaged or was written wrongly")
    nextn = f.get(f"{arch}.nextn_predict_layers", 0)  # multi-token-prediction layers, counted in block_count
    if not isinstance(nextn, int) or isinstance(nextn, bool) or not 0 <= nextn < count:
        raise ConfigError(f"{f.path}: metadata {arch}.nextn_predict_layers is {nextn!r}; it must be a whole number "
                          f"below block_count ({count})")
    cfg["num_hidden_layers"] = count - nextn
    tokens = f.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else None
    if "vocab_size" not in cfg:
        embd = f.tensors.get("token_embd.weight")
        cfg["vocab_size"] = n_tokens if n_tokens is not None else embd.shape[0] if embd else None
        if not cfg["vocab_size"]:
            raise ConfigError(f"{f.path}: vocabulary size unknown (no {arch}.vocab_size, tokenizer.ggml.tokens "
                              "or token_embd.weight)")
    elif n_tokens is not None and n_tokens != cfg["vocab_size"]:  # ids past the tokenizer's list abort llama.cpp
        raise ModelFileError(f"{f.path}: metadata {arch}.vocab_size is {cfg['vocab_size']} but "
                             f"tokenizer.ggml.tokens has {n_tokens} tokens")
    cfg["tie_word_embeddings"] = "output.weight" not in f
    if isinstance(f.get("tokenizer.chat_template"), str):
        cfg["chat_template"] = f.get("tokenizer.chat_template")
    cfg["rope_scaling"] = _rope_scaling(f, arch)
    if arch == "deepseek2":
        _deepseek2(f, cfg)
    else:
        cfg["model_type"] = GGUF_MODEL_TYPES[arch]
        cfg["num_experts"] = cfg["num_local_experts"] = cfg.pop("n_routed_experts", None)
    if arch == "qwen3moe":
        cfg["norm_topk_prob"] = True  # llama.cpp always renormalises Qwen3-MoE's top-k weights
        cfg["attention_bias"] = "blk.0.attn_q.bias" in f
        cfg["mlp_only_layers"] = [i for i in range(cfg["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in f]
        if cfg.get("intermediate_size") is None:
            cfg["intermediate_size"] = 0  # used only by dense layers, which then fail the shape check
    if arch == "llama" and not cfg.get("num_local_experts"):
        raise ConfigError(f"{f.path}: a llama-architecture GGUF without experts is a dense model; only "
                          "Mixture-of-Experts models are supported")
    return cfg


def _rope_scaling(f: GGUFFile, arch: str) -> dict | None:
    kind = f.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = f.get(f"{arch}.rope.scaling.factor")
    if kind not in ("linear", "yarn") or not isinstance(factor, (int, float)):
        raise ConfigError(f"{f.path}: {arch}.rope.scaling.type {kind!r} with factor {factor!r} is not supported "
                          "(linear or yarn with a factor)")
    out = {"type": kind, "rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        out["original_max_position_embeddings"] = f.get(f"{arch}.rope.scaling.original_context_length")
        out["beta_fast"] = f.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)
        out["beta_slow"] = f.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)
        log_mul = f.get(f"{arch}.rope.scaling.yarn_log_multiplier")
        if log_mul:
            # The converter stores 0.1 * mscale_all_dim. llama.cpp does not store `mscale` and takes it equal to
            # mscale_all_dim (as in DeepSeek's configs); we read it the same way.
            out["mscale_all_dim"] = out["mscale"] = float(log_mul) / 0.1
    return out


def _deepseek2(f: GGUFFile, cfg: dict) -> None:
    gating = cfg.pop("expert_gating_func", None)
    scoring = GATING_FUNCS.get(gating or 1)  # files without the key are DeepSeek-V2: softmax, as llama.cpp assumes
    if scoring is None:
        raise ConfigError(f"{f.path}: deepseek2.expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    # V3's routing (sigmoid, bias, weights scaled after normalisation) is what llama.cpp computes for any deepseek2
    # file that has a correction bias; V2 files have none.
    has_bias = any(name.endswith("exp_probs_b.bias") for name in f.tensors)
    cfg["model_type"] = "deepseek_v3" if scoring == "sigmoid" or has_bias else "deepseek_v2"
    cfg["scoring_func"] = scoring
    n_group = cfg.get("n_group") or 1
    cfg["topk_method"] = "noaux_tc" if has_bias else "group_limited_greedy" if n_group > 1 else "greedy"
    rope = cfg["qk_rope_head_dim"]
    if cfg.get("key_length_mla"):  # the MLA-aware converter stores the latent as one "MQA" head
        cfg["qk_nope_head_dim"] = cfg["key_length_mla"] - rope
        cfg["v_head_dim"] = cfg.get("value_length_mla")
    else:
        cfg["qk_nope_head_dim"] = (cfg.get("key_length") or 0) - rope
        cfg["v_head_dim"] = cfg.get("value_length")
    if cfg["qk_nope_head_dim"] < 1 or not cfg["v_head_dim"]:
        raise ConfigError(f"{f.path}: deepseek2 head sizes missing or invalid (attention.key_length_mla / "
                          "value_length_mla or attention.key_length / value_length)")
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg["routed_scaling_factor"] = cfg.get("routed_scaling_factor") or 1.0  # 0 means none in llama.cpp
    cfg["rope_interleave"] = True  # llama.cpp's "normal" rope on adjacent pairs, as in DeepSeek's checkpoints
    if not cfg.get("n_routed_experts"):
        raise ConfigError(f"{f.path}: deepseek2.expert_count is missing; dense DeepSeek models are not supported")
