"""Stop strings and <think> splitting on streamed pieces, however the text is chunked."""
import pytest

from hybridmoe.engine.text import StopFilter, ThinkSplitter, prompt_opens_think


def run_split(pieces, in_think=False):
    sp = ThinkSplitter(in_think)
    out = [x for p in pieces for x in sp.push(p)] + sp.flush()
    merged: list[list[str]] = []
    for text, ch in out:
        if merged and merged[-1][1] == ch:
            merged[-1][0] += text
        else:
            merged.append([text, ch])
    return [tuple(m) for m in merged]


@pytest.mark.parametrize("cut", range(1, 30))
def test_think_split_any_chunking(cut):
    text = "<think>step one</think>The answer is 4."
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    assert run_split(pieces) == [("step one", "reasoning"), ("The answer is 4.", "answer")]


def test_r1_template_starts_inside_reasoning():
    assert prompt_opens_think("<|User|>hi<|Assistant|><think>\n")
    assert not prompt_opens_think("<think>a</think> done")
    assert run_split(["hmm, let me", " think</th", "ink>Yes."], in_think=True) == [
        ("hmm, let me think", "reasoning"), ("Yes.", "answer")]


def test_unclosed_tag_prefix_is_flushed_at_end():
    assert run_split(["a <thi"]) == [("a <thi", "answer")]


@pytest.mark.parametrize("cut", [1, 2, 3, 7])
def test_stop_string_cuts_output(cut):
    text = "Hello there. STOP and more"
    f = StopFilter(("STOP",))
    out, hit = "", False
    for i in range(0, len(text), cut):
        piece, hit = f.push(text[i:i + cut])
        out += piece
        if hit:
            break
    assert hit and out == "Hello there. "


def test_partial_stop_prefix_released_when_it_diverges():
    f = StopFilter(("</s>",))
    assert f.push("a </") == ("a ", False)
    assert f.push("b") == ("</b", False)
