"""hybridmoe against transformers' own modeling classes on random tiny checkpoints, in f32."""
import pytest
import torch

import hybridmoe
from hybridmoe.layers.cache import Batch

FAMILIES = ["deepseek_v3", "deepseek_v2", "deepseek_v2_group", "qwen3_moe", "qwen2_moe", "mixtral"]
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, tiny_vocab(), (n,), generator=g).tolist()


def tiny_vocab() -> int:
    import tiny
    return tiny.VOCAB


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny_models):
    path = tiny_models(request.param)
    return request.param, hybridmoe.load(path), reference(path)


def test_full_sequence_logits_match_transformers(pair):
    name, eng, ref = pair
    ids = tokens(40)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = eng.logits(ids)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL, name


@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 5, 1, 6]])
def test_cached_decode_matches_full_sequence(pair, chunks):
    name, eng, _ = pair
    ids = tokens(sum(chunks), seed=1)
    full = eng.logits(ids)
    model = eng.model
    cache = model.new_cache(1, len(ids))
    pos, outs = 0, []
    with torch.no_grad():
        for n in chunks:
            batch = Batch.make([pos], [n], [0], "cpu")
            outs.append(model(torch.tensor([ids[pos:pos + n]]), batch, cache)[0])
            pos += n
    assert rel_err(torch.cat(outs), full) <= TOL, name


def test_greedy_generation_matches_transformers_generate(pair):
    name, eng, ref = pair
    prompt = tokens(6, seed=2)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    events = list(eng.generate(prompt, temperature=0, max_tokens=32, ignore_eos=True))
    done = events[-1]
    assert isinstance(done, hybridmoe.Done) and done.reason == "length"
    assert list(done.token_ids) == want, name


def test_batch_of_three_matches_each_alone(pair):
    name, eng, _ = pair
    seqs = [tokens(n, seed=10 + n) for n in (5, 9, 13)]
    alone = [eng.logits(s) for s in seqs]
    model = eng.model
    cache = model.new_cache(3, 32)
    T = max(len(s) for s in seqs)
    padded = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        # rows in shuffled slots, prefilled together
        slots = [2, 0, 1]
        out = model(padded, Batch.make([0, 0, 0], [len(s) for s in seqs], slots, "cpu"), cache)
        for b, s in enumerate(seqs):
            assert rel_err(out[b, :len(s)], alone[b]) <= TOL, name
        # then decode one more token per row, each at its own position
        nxt = [int(alone[b][-1].argmax()) for b in range(3)]
        out = model(torch.tensor([[t] for t in nxt]), Batch.make([len(s) for s in seqs], [1, 1, 1], slots, "cpu"),
                    cache)
        for b, s in enumerate(seqs):
            want = eng.logits(s + [nxt[b]])[-1]
            assert rel_err(out[b, 0], want) <= TOL, name


def test_upstream_config_form_gives_same_logits(tiny_models, tmp_path):
    """DeepSeek repos ship rope_scaling + rope_theta and scoring_func/topk_method; transformers 5 drops them."""
    import shutil

    import tiny
    src = tiny_models("deepseek_v3")
    dst = tmp_path / "upstream"
    shutil.copytree(src, dst)
    tiny.to_upstream_config(dst)
    ids = tokens(24, seed=3)
    a = hybridmoe.load(src).logits(ids)
    b = hybridmoe.load(dst).logits(ids)
    assert torch.equal(a, b)


def test_softmax_scoring_changes_routing(tiny_models, tmp_path):
    """The scoring function is read from config.json (a test that the key is not ignored)."""
    import json
    import shutil
    src = tiny_models("deepseek_v3")
    dst = tmp_path / "softmax"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["scoring_func"] = "softmax"
    (dst / "config.json").write_text(json.dumps(cfg))
    ids = tokens(16, seed=4)
    assert rel_err(hybridmoe.load(dst).logits(ids), hybridmoe.load(src).logits(ids)) > 1e-3
