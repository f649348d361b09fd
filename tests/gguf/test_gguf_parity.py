"""hybridmoe on a GGUF file against transformers run on that file's weights, dequantized by the `gguf` package.
cpu_activations="f32" (exact, pinned here) is held to 1e-3; "int8" (activations of the experts rounded to 8 bits) to
a relative logit error of 1e-2 and 98 % top-1 agreement at decode; "int8-all" (the default: also attention's and the
head's inputs) to the bounds llama.cpp meets on these files: 90 % teacher-forced top-1 agreement and perplexity
within 1 %."""
import math

import numpy as np
import pytest
import torch
from conftest import needs_llama
from gguf_helpers import nll, reference_model, rel_err, rewrite

import hybridmoe
from hybridmoe.layers.cache import Batch

TOL = 1e-3
CASES = [(f, k) for f in ("deepseek_v3", "qwen3_moe") for k in ("f32", "q8_0", "q4_k_m")] + [("mixtral", "f32")]


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(8, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family,kind", CASES)
def test_logits_match_transformers_on_dequantized_weights(gguf_models, family, kind):
    hf, path = gguf_models(family, kind)
    ids = tokens(48)
    with torch.no_grad():
        want = reference_model(hf, path)(torch.tensor([ids])).logits[0]
    eng = hybridmoe.load(path, cpu_activations="f32")
    got = eng.logits(ids)
    assert rel_err(got, want) <= TOL, (family, kind)
    if kind == "q4_k_m":  # the file really holds K-quant experts
        from hybridmoe.formats.gguf import GGUFFile
        types = {t.qtype.name for n, t in GGUFFile(path).tensors.items() if "_exps" in n}
        assert types <= {"Q4_K", "Q6_K"} and "Q4_K" in types


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_cached_decode_matches_full_sequence(gguf_models, family):
    _, path = gguf_models(family, "q4_k_m")
    eng = hybridmoe.load(path, cpu_activations="f32")  # decode and prefill then agree to float32 rounding
    ids = tokens(12, seed=1)
    full = eng.logits(ids)
    cache = eng.model.new_cache(1, len(ids))
    outs = []
    with torch.no_grad():
        for pos, n in ((0, 5), (5, 1), (6, 6)):
            outs.append(eng.model(torch.tensor([ids[pos:pos + n]]), Batch.make([pos], [n], [0], "cpu"), cache)[0])
    assert rel_err(torch.cat(outs), full) <= 1e-4


def test_legacy_kv_b_form_gives_same_logits(gguf_models, tmp_path):
    """Older files store MLA's kv_b whole (attn_kv_b) and describe heads by key_length / value_length."""
    from hybridmoe.formats.gguf import GGUFFile
    _, path = gguf_models("deepseek_v3", "f32")
    f = GGUFFile(path)
    H, N, V, R = 4, 32, 32, 64
    joined, drop = {}, []
    for i in range(3):
        k_b = f.tensors[f"blk.{i}.attn_k_b.weight"].raw.view(np.float32).reshape(H, R, N)
        v_b = f.tensors[f"blk.{i}.attn_v_b.weight"].raw.view(np.float32).reshape(H, V, R)
        joined[f"blk.{i}.attn_kv_b.weight"] = np.concatenate([k_b.transpose(0, 2, 1), v_b], 1).reshape(-1, R)
        drop += [f"blk.{i}.attn_k_b.weight", f"blk.{i}.attn_v_b.weight"]
    legacy = rewrite(path, tmp_path / "legacy.gguf", drop=drop, tensors=joined, kv={
        "deepseek2.attention.key_length_mla": None, "deepseek2.attention.value_length_mla": None,
        "deepseek2.attention.key_length": N + 32, "deepseek2.attention.value_length": V,
        "deepseek2.attention.head_count_kv": H})
    ids = tokens(20, seed=2)
    assert torch.equal(hybridmoe.load(legacy).logits(ids), hybridmoe.load(path).logits(ids))


def test_split_file_gives_same_logits(gguf_models, tmp_path):
    _, path = gguf_models("qwen3_moe", "f32")
    rewrite(path, tmp_path / "m.gguf", split_max_tensors=10)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) > 2
    ids = tokens(16, seed=3)
    want = hybridmoe.load(path).logits(ids)
    for part in (parts[0], parts[-1]):  # any part names the whole model
        assert torch.equal(hybridmoe.load(part).logits(ids), want)


@needs_llama
def test_generate_and_chat_with_the_gguf_tokenizer(gguf_models):
    import tiny
    from hybridmoe.engine.tokenizer import Tokenizer
    hf, path = gguf_models("deepseek_v3", "q8_0")
    eng = hybridmoe.load(path)
    ref = Tokenizer(hf)
    for text in ["The quick brown fox", "Hello world! <|user|>hi<|end|>", tiny.CORPUS[:300]]:
        assert eng.tokenizer.encode(text) == ref.encode(text)
        ids = ref.encode(text, add_special_tokens=False)
        assert eng.tokenizer.decode(ids) == ref.decode(ids)
    msgs = [{"role": "user", "content": "Hello"}]
    assert eng.tokenizer.render_chat(msgs) == ref.render_chat(msgs)
    assert eng.tokenizer.eos_ids == ref.eos_ids and eng.tokenizer.bos_id == ref.bos_id
    done = list(eng.chat(msgs, max_tokens=8, temperature=0, ignore_eos=True))[-1]
    assert isinstance(done, hybridmoe.Done) and done.completion_tokens == 8
    done = list(eng.generate("The quick", max_tokens=4, temperature=0, ignore_eos=True))[-1]
    assert done.completion_tokens == 4 and isinstance(done.text, str)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_packed_expert_tier_matches_transformers(gguf_models, family):
    hf, path = gguf_models(family, "q4_k_m")
    ids = tokens(24, seed=4)
    with torch.no_grad():
        want = reference_model(hf, path)(torch.tensor([ids])).logits[0]
    eng = hybridmoe.load(path, experts_tier="pinned", cpu_activations="f32")
    assert eng.model.experts.tier == "packed"
    assert rel_err(eng.logits(ids), want) <= TOL
    assert eng.model.experts.packed  # experts were copied on first use


def test_int8_decode_is_within_bounds_of_transformers(gguf_models):
    """Token-by-token decode, where the 8-bit kernels run. Only qwen3_moe: the tiny random deepseek_v3 and mixtral
    models amplify any rounding of activations (llama.cpp's own logits are 40 % and 11 % off there, ours with int8
    experts 1.0 % and 11 %; see bench/RESULTS.md)."""
    hf, path = gguf_models("qwen3_moe", "q4_k_m")
    ids = tokens(50, seed=5)
    with torch.no_grad():
        want = reference_model(hf, path)(torch.tensor([ids])).logits[0]
        eng = hybridmoe.load(path, experts_tier="pinned", cpu_activations="int8")
        assert eng.model.experts.store.activations == "int8"
        cache = eng.model.new_cache(1, len(ids))
        got = torch.cat([eng.model(torch.tensor([[t]]), Batch.make([i], [1], [0], "cpu"), cache)[0]
                         for i, t in enumerate(ids)])
    assert rel_err(got, want) <= 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.98


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_int8_all_decode_is_within_llama_cpps_bounds(gguf_models, family):
    """Rounding attention's inputs too moves logits by 2-22 % on these random models (llama.cpp: 17-53 %), so only
    what llama.cpp itself meets is asked: measured 93-96 % top-1 and perplexity within 0.1 % (bench/RESULTS.md)."""
    hf, path = gguf_models(family, "q4_k_m")
    ids = tokens(96, seed=5)
    with torch.no_grad():
        want = reference_model(hf, path)(torch.tensor([ids])).logits[0]
        eng = hybridmoe.load(path, experts_tier="pinned", cpu_activations="int8-all")
        assert eng.model.experts.store.activations == "int8"
        assert eng.model.output.packed.activations == "int8"
        cache = eng.model.new_cache(1, len(ids))
        got = torch.cat([eng.model(torch.tensor([[t]]), Batch.make([i], [1], [0], "cpu"), cache)[0]
                         for i, t in enumerate(ids)])
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert abs(math.exp(nll(got, ids)) / math.exp(nll(want, ids)) - 1) <= 0.01
