"""`hybridmoe convert` never leaves a partial file: a full disk (here a file-size limit), Ctrl-C at any stage or an
unwritable folder keep an existing target byte-identical, leave no temporary file, and end with one line and a
non-zero exit (130 for Ctrl-C)."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_llama

from hybridmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]
OLD = b"an existing good file\n" * 1000


def run_convert(hf: Path, out: Path, kind: str, limit: int | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def fsize_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.Popen([sys.executable, "-m", "hybridmoe.cli", "convert", str(hf), str(out), "--type", kind],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=fsize_limit if limit else None, **kw)


def leftovers(folder: Path, out: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != out)


def error_line(err: bytes) -> str:
    lines = [line for line in err.decode().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err.decode()[-2000:]
    return lines[0]


@pytest.mark.parametrize("kind", ["q8_0", pytest.param("q4_k_m", marks=needs_llama)])
def test_file_size_limit_keeps_the_old_file_and_leaves_no_temporary(gguf_models, tmp_path, kind):
    hf, _ = gguf_models("deepseek_v3", "f32")
    out = tmp_path / "m.gguf"
    out.write_bytes(OLD)
    p = run_convert(hf, out, kind, limit=1 << 20)  # the model is several MiB at any type
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1
    line = error_line(err)
    assert str(out) in line and "the disk is full or the file is larger than allowed" in line
    assert "the existing file is unchanged" in line
    assert out.read_bytes() == OLD and leftovers(tmp_path, out) == []


def _interrupt_when(p: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGINT to the command's process group (as Ctrl-C in a terminal) once ready() holds; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        if ready():
            os.killpg(p.pid, signal.SIGINT)
            return True
        time.sleep(0.005)
    return False


def _children(pid: int) -> list[str]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace") for k in kids]
    except OSError:
        return []


@pytest.mark.parametrize("stage", ["writing", pytest.param("unquantized", marks=needs_llama),
                                   pytest.param("quantizing", marks=needs_llama)])
def test_ctrl_c_at_each_stage_exits_130_and_keeps_the_old_file(gguf_models, tmp_path, stage):
    hf, _ = gguf_models("deepseek_v3", "f32")
    out = tmp_path / "m.gguf"
    out.write_bytes(OLD)
    kind = "q8_0" if stage == "writing" else "q4_k_m"
    p = run_convert(hf, out, kind)
    if stage == "quantizing":  # the quantizer runs in a child process: Ctrl-C reaches it too
        ready = lambda: any("quantize" in c for c in _children(p.pid))  # noqa: E731
    else:  # some of the (temporary) output is on disk
        ready = lambda: any(f.stat().st_size > 100_000 for f in tmp_path.iterdir() if f != out  # noqa: E731
                            and (stage != "unquantized" or f.name.endswith("unquantized.gguf")))
    assert _interrupt_when(p, ready), f"the conversion ended before the {stage} stage was seen"
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err.decode()[-2000:]
    assert "Exception ignored" not in err.decode()
    assert out.read_bytes() == OLD and leftovers(tmp_path, out) == []


def test_success_replaces_the_old_file_with_the_usual_permissions(gguf_models, tmp_path, capsys):
    hf, _ = gguf_models("qwen3_moe", "f32")
    out = tmp_path / "m.gguf"
    out.write_bytes(OLD)
    os.chmod(out, 0o640)
    assert main(["convert", str(hf), str(out), "--type", "q8_0"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and leftovers(tmp_path, out) == []
    assert out.stat().st_mode & 0o777 == 0o640
    new = tmp_path / "new.gguf"
    assert main(["convert", str(hf), str(new), "--type", "q8_0"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_or_unwritable_folder_is_one_line(gguf_models, tmp_path, capsys):
    hf, _ = gguf_models("qwen3_moe", "f32")
    cases = [(tmp_path / "no" / "such" / "m.gguf", "does not exist; create it first"),
             (tmp_path, "is a folder; give the output file's name"),
             (Path("/proc/self/m.gguf"), "/proc/self/m.gguf: ")]  # not writable even for root
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        cases.append((ro / "m.gguf", "is not writable"))
    for out, want in cases:
        assert main(["convert", str(hf), str(out), "--type", "q8_0"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err, err
