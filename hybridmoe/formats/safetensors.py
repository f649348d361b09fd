"""Zero-copy reading of (sharded) safetensors files.

The header is parsed here rather than through `safe_open` because we need each tensor's byte offset to build
tensors that alias a private mmap of the file: weights are then backed by the page cache, never held twice.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import ModelFileError

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header; every tensor must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise ModelFileError(f"{path}: corrupt or truncated safetensors header (header size {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFileError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if not (isinstance(shape, list) and all(_count(d) for d in shape) and _count(begin) and _count(end)):
            raise ModelFileError(f"{path}: corrupt header entry for tensor {name!r} (shape {shape!r}, data_offsets "
                                 f"{meta['data_offsets']!r}: whole numbers >= 0 expected)")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        shape = tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * DTYPES[dtype][1]:
            raise ModelFileError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {numel * DTYPES[dtype][1]} for shape {list(shape)}")
        if base + end > size:
            raise ModelFileError(
                f"{path}: truncated file: tensor {name!r} ends at byte {base + end} but the file has {size} bytes; "
                "re-download this shard")
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
    _check_layout(out.values(), base, path)
    return out


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_layout(infos, base: int, path: Path) -> None:
    """As the safetensors library requires: tensors tile the data section in order, without overlap or gap, so
    that no two tensors share bytes (an edit to one would silently change the other)."""
    at = base
    for info in sorted(infos, key=lambda i: (i.start, i.nbytes)):
        if info.start != at:
            what = "overlaps the tensor before it" if info.start < at else f"leaves a gap of {info.start - at} bytes"
            raise ModelFileError(f"{path}: corrupt header: tensor {info.name!r} {what} (it starts at byte "
                                 f"{info.start}, the data before it ends at {at})")
        at = info.start + info.nbytes


def _check_shard_name(fname: str, index: Path) -> None:
    """A shard is a .safetensors file inside the model directory: the index must not lead the loader elsewhere."""
    p = PurePosixPath(fname)
    if (p.is_absolute() or "\\" in fname or ".." in p.parts or not fname.endswith(".safetensors")
            or any(ord(c) < 32 or ord(c) == 127 for c in fname)):
        raise ModelFileError(f"{index}: weight_map names the file {fname!r}; shards must be .safetensors files "
                             "inside the model directory")


class SafetensorsFiles:
    """All tensors of a model directory, from model.safetensors or model.safetensors.index.json."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
                raise ModelFileError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise ModelFileError(f"{index}: corrupt index (weight_map must map tensor names to file names)")
            for fname in set(weight_map.values()):
                _check_shard_name(fname, index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise ModelFileError(f"{self.dir}: no model.safetensors or model.safetensors.index.json found")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise ModelFileError(f"{path}: shard listed in model.safetensors.index.json is missing; download it")
            self.tensors.update(read_header(path))
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.tensors:
                    raise ModelFileError(f"{self.dir / fname}: tensor {name!r} listed in the index is not in the file")
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def mapped(self, names, n_layers: int, model_type: str):
        """(name, info, our name, layer) of every tensor the decoder uses, through the name table `names`
        (formats.names.NameMap): FP8 scales, ignored tensors and multi-token-prediction layers past `n_layers` are
        skipped; a name the table does not know is an error that names the tensor and its file."""
        for name, info in self.tensors.items():
            if name.endswith("_scale_inv") or names.ignored(name):
                continue
            mapped = names(name)
            if mapped is None:
                raise ModelFileError(f"{info.file}: unexpected tensor {name!r} for model_type {model_type!r}")
            ours, layer = mapped
            if layer is None or layer < n_layers:
                yield name, info, ours, layer

    def get(self, name: str) -> torch.Tensor:
        """A CPU tensor aliasing the file's pages (copy-on-write mapping, so it is writable but never written)."""
        info = self.tensors[name]
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mm
        dtype, itemsize = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        t = torch.frombuffer(mm, dtype=dtype, count=info.nbytes // itemsize, offset=info.start)
        return t.view(info.shape)
