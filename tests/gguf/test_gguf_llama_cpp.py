"""hybridmoe against llama.cpp itself on the same GGUF file: teacher-forced top-1 agreement and perplexity."""
import math

import pytest
from conftest import needs_llama
from gguf_helpers import llama_logits, nll

import hybridmoe

pytestmark = needs_llama
CASES = [(f, k) for f in ("deepseek_v3", "qwen3_moe") for k in ("f32", "q8_0", "q4_k_m")] + [("mixtral", "q4_k_m")]


@pytest.mark.parametrize("family,kind", CASES)
def test_agrees_with_llama_cpp(gguf_models, family, kind):
    import tiny
    _, path = gguf_models(family, kind)
    eng = hybridmoe.load(path)
    ids = eng.tokenizer.encode(tiny.CORPUS)[:96]
    ours, theirs = eng.logits(ids), llama_logits(path, ids)
    top1 = (ours.argmax(-1).numpy() == theirs.argmax(-1)).mean()
    ppl_ours, ppl_theirs = math.exp(nll(ours, ids)), math.exp(nll(theirs, ids))
    assert top1 >= 0.9, (family, kind, top1)
    assert abs(ppl_ours / ppl_theirs - 1) <= 0.01, (family, kind, ppl_ours, ppl_theirs)
