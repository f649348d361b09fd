"""Writing a file so that it is either complete or absent: the data goes to a temporary file in the target's folder,
is flushed to disk, and only then takes the target's name (a rename within one file system is atomic). A full disk,
a file-size limit or Ctrl-C leaves the target as it was, and no temporary file behind."""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, ModelFileError

FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def check_destination(out: Path, what: str = "output") -> None:
    """A one-line error, before any work, for a target that cannot be written."""
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the {what} file's name, e.g. {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: the folder {out.parent} is not writable")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(out: Path, tag: str = "tmp") -> Path:
    """A new empty file next to `out`, hidden, that names what it is for."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".{tag}", dir=out.parent)
    except OSError as e:
        raise ModelFileError(f"{out}: cannot create a file in {out.parent} ({e.strerror or e})") from None
    os.close(fd)
    return Path(name)


def _mode(out: Path) -> int:
    """The permissions the file would have had if written in place: those of the file it replaces, else the
    default for new files (temporary files are created private)."""
    try:
        return out.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def staged(out: Path):
    """Yields a temporary path next to `out`; when the block ends without an exception the file is flushed to disk
    and renamed to `out`, else deleted. OSErrors become one-line errors naming `out`."""
    tmp = temporary_name(out)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _mode(out))
        os.replace(tmp, out)
        _fsync(out.parent, directory=True)
    except OSError as e:
        why = "the disk is full or the file is larger than allowed" if e.errno in FULL else (e.strerror or str(e))
        if e.filename and e.errno not in FULL:
            why = f"{e.filename}: {why}"
        kept = "the existing file is unchanged" if out.exists() else "nothing was written"
        raise ModelFileError(f"{out}: not written ({why}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
