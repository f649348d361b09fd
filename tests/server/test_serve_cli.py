"""`hybridmoe serve` as a user runs it: flags checked before loading, a port in use said in one line, health while
and after loading, and Ctrl-C (SIGINT) ending the process with no traceback."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def hybridmoe(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridmoe", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120, **kw)


def test_flags_are_checked_before_anything_loads():
    out = hybridmoe("serve", "--host", "0.0.0.0")
    assert out.returncode == 1 and "--api-key" in out.stderr and "Traceback" not in out.stderr
    out = hybridmoe("serve", "--max-seqs", "0")
    assert out.returncode == 1 and "--max-seqs" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = hybridmoe("serve", "--port", str(busy.getsockname()[1]))
    assert out.returncode == 1 and "cannot listen on 127.0.0.1" in out.stderr and "Traceback" not in out.stderr


def test_serve_answers_then_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "hybridmoe", "serve", "demo", "--port", "0"], env=ENV, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)/v1", line)
            if m:
                url = m[1]
                break
        assert url, "no listening line"
        deadline = time.time() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"prompt": "The os module", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(30) == 130 and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
