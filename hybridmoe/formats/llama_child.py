"""llama.cpp calls that can end the process or ignore Ctrl-C run in a child process.

llama.cpp aborts on some damaged vocabularies (a failed assertion, or a C++ exception thrown through its C API), and
during a long quantization Ctrl-C lands in its ctypes log callback, where Python can only print "Exception ignored".
In a child, a crash becomes a one-line error for the parent, and Ctrl-C ends the child at once (it keeps the default
SIGINT action) while the parent cleans up. This file is also the child's script: run with `python -P`, it imports
only the standard library and llama_cpp, so it works whatever the parent's sys.path.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

VOCAB_FAILED = 3  # the child's exit status when llama.cpp returns an error instead of crashing


def run(args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run this script's `args` in a child process (its output captured). KeyboardInterrupt in the parent kills
    the child and propagates."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # a crash must not attach a debugger to print a backtrace
    return subprocess.run([sys.executable, "-P", os.path.abspath(__file__), *args], capture_output=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def failure(r: subprocess.CompletedProcess) -> str:
    """How the child ended, in a few words: the signal that killed it, or its last line of error output."""
    if r.returncode < 0:
        try:
            return f"it crashed with {signal.Signals(-r.returncode).name}"
        except ValueError:
            return f"it was killed by signal {-r.returncode}"
    lines = [line for line in r.stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {r.returncode}"


# --- the child ---
def _llama():
    import llama_cpp as L

    @L.llama_log_callback
    def log(level, text, user_data):
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))
    L.llama_log_set(log, ctypes.c_void_p(0))
    return L, log  # the callback must outlive every call into llama.cpp


def probe_vocab(path: str) -> int:
    """Load the vocabulary, tokenize a sample with every kind of character, and detokenize every id."""
    L, _log = _llama()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        return VOCAB_FAILED
    vocab = L.llama_model_get_vocab(model)
    text = ("".join(map(chr, range(1, 0x2FF))) + " Hello, world!\n\n  \t x = [1, 2]; \u4f60\u597d \U0001F642 "
            "<|im_start|>user<|im_end|> <think></think> <s></s>").encode()
    ids = (L.llama_token * (2 * len(text) + 16))()
    n = L.llama_tokenize(vocab, text, len(text), ids, len(ids), True, True)
    out = ctypes.create_string_buffer(1 << 16)
    L.llama_detokenize(vocab, ids, max(n, 0), out, len(out), False, True)
    one = (L.llama_token * 1)()
    for t in range(L.llama_vocab_n_tokens(vocab)):
        one[0] = t
        L.llama_detokenize(vocab, one, 1, out, len(out), False, True)
    L.llama_model_free(model)
    return 0


def quantize(src: str, dst: str, threads: str) -> int:
    """llama.cpp's quantizer: routed experts get its Q4_K_M mix, every other matrix Q8_0."""
    L, _log = _llama()
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = int(threads)
    params.output_tensor_type = params.token_embedding_type = L.GGML_TYPE_Q8_0
    overrides = (L.llama_model_tensor_override * 2)()
    overrides[0].pattern, overrides[0].type = rb"attn_|_shexp\.|ffn_(gate|up|down)\.weight", L.GGML_TYPE_Q8_0
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(L.llama_model_tensor_override))
    return 0 if L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0 else 1


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the child, even inside llama.cpp
    commands = {"probe": probe_vocab, "quantize": quantize}
    if not argv or argv[0] not in commands:
        print(f"usage: {sys.argv[0]} probe PATH | quantize SRC DST THREADS", file=sys.stderr)
        return 2
    return commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
