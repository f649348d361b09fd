"""`hybridmoe pull`: download one model from the Hugging Face Hub, only the files it needs.

GGUF repositories hold many quantizations, each as one file or as split shards, either in a folder named after the
quant (`DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf`) or side by side
(`Qwen3-30B-A3B-Q4_K_M.gguf`); --quant picks one. Safetensors repositories: the weights, the JSON files and the
tokenizer. The file list and sizes come first, then a check of free disk; downloads resume where they stopped."""
from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .errors import HybridMoEError

GiB = 1 << 30
# A quant label inside a file or folder name: Q4_K_M, IQ2_XXS, UD-Q2_K_XL, Q8_0, BF16, F16, TQ1_0, MXFP4_MOE ...
QUANT = re.compile(r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|F32|MXFP4(?:_MOE)?))"
                   r"(?=$|[-_.])", re.IGNORECASE)
SPLIT = re.compile(r"-\d{5}-of-\d{5}$")
HF_FILES = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt")
DISK_MARGIN = 1.02  # the files, plus 2% for the download's temporary state


@dataclass(frozen=True, slots=True)
class RemoteFile:
    path: str
    size: int | None  # None: the Hub did not say


@dataclass(slots=True)
class Selection:
    kind: str  # "gguf" or "safetensors"
    quant: str | None
    files: list[RemoteFile]

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)


def quant_of(path: str) -> str | None:
    """The quant label of a GGUF file: from its name, else from its folder's."""
    p = PurePosixPath(path)
    for part in (SPLIT.sub("", p.stem), *reversed(p.parts[:-1])):
        found = QUANT.findall(part)
        if found:
            return found[-1].upper()
    return None


def _gguf_files(files: list[RemoteFile]) -> list[RemoteFile]:
    # Vision projectors and imatrix data sit beside the model shards but are not part of the model.
    return [f for f in files if f.path.endswith(".gguf") and "mmproj" not in f.path.lower()]


def available_quants(files: list[RemoteFile]) -> list[str]:
    return sorted({q for f in _gguf_files(files) if (q := quant_of(f.path))})


def check_remote_name(repo: str, path: str) -> None:
    """A name from the Hub's listing becomes a path under the download folder: refuse one that is absolute, climbs
    out with `..`, or holds control characters (which could also rewrite the terminal when printed)."""
    p = PurePosixPath(path)
    if (not path or p.is_absolute() or "\\" in path or ".." in p.parts or re.match(r"^[A-Za-z]:", path)
            or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in path)):
        raise HybridMoEError(f"{repo}: the file list names {path!r}, which is not a plain path inside the "
                             "repository; refusing to download from it")


def select(repo: str, files: list[RemoteFile], quant: str | None) -> Selection:
    """The files to fetch, or a one-line error naming what the repository does hold."""
    sel = _select(repo, files, quant)
    for f in sel.files:
        check_remote_name(repo, f.path)
    return sel


def _select(repo: str, files: list[RemoteFile], quant: str | None) -> Selection:
    ggufs = _gguf_files(files)
    if quant is None:
        if ggufs:
            raise HybridMoEError(f"{repo} holds GGUF quantizations; pick one with --quant: "
                                 f"{', '.join(available_quants(files)) or '(none recognised)'}")
        # Top-level files only: sub-folders hold alternative copies (original/, onnx/, ...).
        picked = [f for f in files if "/" not in f.path and any(fnmatch.fnmatch(f.path, p) for p in HF_FILES)]
        if not any(f.path.endswith(".safetensors") for f in picked):
            raise HybridMoEError(f"{repo} has no .safetensors weights at the top level and no GGUF files")
        return Selection("safetensors", None, picked)
    if not ggufs:
        raise HybridMoEError(f"{repo} has no GGUF files, so --quant does not apply; drop --quant to fetch its "
                             "safetensors weights")
    want = quant.upper()
    labels = available_quants(files)
    if want not in labels:
        # "Q4_K_XL" also names "UD-Q4_K_XL" when that is the only such quant
        near = [q for q in labels if q.removeprefix("UD-") == want.removeprefix("UD-")]
        if len(near) != 1:
            raise HybridMoEError(f"quant {quant!r} not found in {repo}; it has: {', '.join(labels) or 'none'}")
        want = near[0]
    picked = sorted((f for f in ggufs if quant_of(f.path) == want), key=lambda f: f.path)
    return Selection("gguf", want, picked)


def local_size(dest: Path, f: RemoteFile) -> int:
    """Bytes of `f` already complete in dest (a resumed download does not need them again)."""
    p = dest / f.path
    return p.stat().st_size if p.is_file() and f.size is not None and p.stat().st_size == f.size else 0


def check_space(sel: Selection, dest: Path, free_bytes: int | None = None) -> int:
    """Bytes still to download; a one-line error when the disk holding dest lacks room for them."""
    need = sel.total - sum(local_size(dest, f) for f in sel.files)
    if free_bytes is None:
        probe = dest
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_bytes = shutil.disk_usage(probe).free
    if need * DISK_MARGIN > free_bytes:
        raise HybridMoEError(f"{dest}: needs {need / GiB:.1f} GiB more but the disk has {free_bytes / GiB:.1f} GiB "
                             "free; free some space or pass --dir on a larger disk")
    return need


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HybridMoEError("pull needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _hub_error(repo: str, e: Exception) -> HybridMoEError:
    name = type(e).__name__
    if name == "RepositoryNotFoundError":
        return HybridMoEError(f"{repo}: no such repository (or it is private: log in with `hf auth login`)")
    if name == "GatedRepoError":
        return HybridMoEError(f"{repo}: gated; accept its license on the Hub and log in with `hf auth login`")
    if name == "RevisionNotFoundError":
        return HybridMoEError(f"{repo}: no such revision")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return HybridMoEError(f"{repo}: the disk filled up during the download; free space and run pull again "
                              "(it resumes)")
    if name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError") or isinstance(e, ConnectionError) or any(
            w in name for w in ("Connect", "Timeout", "Network", "Transport")):
        return HybridMoEError(f"{repo}: cannot reach the Hub ({name}); check the network or proxy settings")
    return HybridMoEError(f"{repo}: the Hub answered {name}: {str(e).splitlines()[0] if str(e) else ''}")


def check_reachable(repo: str, endpoint: str, timeout_s: float = 5.0) -> None:
    """One TCP connection to the Hub before any request: without a network the Hub's client retries for half a
    minute, printing each try; this fails at once, in one line."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise HybridMoEError(f"{repo}: cannot reach the Hub at {endpoint} ({e.strerror or type(e).__name__}); "
                             "check the network or proxy settings") from None


def list_files(repo: str, revision: str | None = None) -> list[RemoteFile]:
    """Every file of the repository with its size."""
    if _offline():
        raise HybridMoEError(f"{repo}: offline mode (HF_HUB_OFFLINE is set), so the file list cannot be fetched; "
                             "unset it, or pass a local model path to the other commands")
    hub = _hub()
    if not (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")):  # a proxy makes its own connections
        from huggingface_hub import constants  # a submodule: the package's lazy attributes do not include it
        check_reachable(repo, constants.ENDPOINT)
    try:
        items = hub.HfApi().list_repo_tree(repo, recursive=True, revision=revision)
        return [RemoteFile(i.path, getattr(i, "size", None)) for i in items if type(i).__name__ == "RepoFile"]
    except Exception as e:  # the Hub's errors differ between versions; each is made one line
        raise _hub_error(repo, e) from None


def default_dest(repo: str, sel: Selection, base: str | Path | None) -> Path:
    name = repo.split("/")[-1] + (f"-{sel.quant}" if sel.quant and sel.quant not in repo.upper() else "")
    return Path(base or ".") / name


def pull(repo: str, quant: str | None = None, dest: str | Path | None = None, dry_run: bool = False,
         revision: str | None = None, out=print, lister=None, free_bytes: int | None = None) -> Path:
    """List, check space, download. Returns the path to give to `hybridmoe` (a directory, or the first shard).
    lister and free_bytes stand in for the Hub and the disk in tests."""
    if "/" not in repo or repo.count("/") > 1:
        raise HybridMoEError(f"{repo!r}: expected a repository id like owner/name")
    sel = select(repo, (lister or list_files)(repo, revision), quant)
    folder = default_dest(repo, sel, dest)
    out(f"{repo}: {len(sel.files)} file(s), {sel.total / GiB:.2f} GiB" + (f" ({sel.quant})" if sel.quant else ""))
    for f in sel.files:
        size = "?" if f.size is None else f"{f.size / GiB:.2f} GiB"
        done = " (already here)" if local_size(folder, f) else ""
        out(f"  {size:>11}  {f.path}{done}")
    need = check_space(sel, folder, free_bytes)
    target = folder / sel.files[0].path if sel.kind == "gguf" else folder
    if dry_run:
        out(f"dry run: would download {need / GiB:.2f} GiB into {folder}")
        return target
    hub = _hub()
    try:
        # Exact paths as patterns (glob characters escaped): the listing above is what gets fetched.
        hub.snapshot_download(repo, revision=revision, local_dir=folder,
                              allow_patterns=[re.sub(r"([*?\[])", r"[\1]", f.path) for f in sel.files])
    except Exception as e:
        raise _hub_error(repo, e) from None
    out(f"done: {target}")
    return target
