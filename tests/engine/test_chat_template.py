"""Chat templates come with model files: they render sandboxed, within limits of time and size, and any failure of
theirs is one line naming the file."""
import time

import pytest

import tiny
from hybridmoe.engine.chat_template import MAX_SECONDS, ChatTemplate
from hybridmoe.errors import ConfigError

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
# The constructs real templates use (DeepSeek-R1's and Qwen3's): namespaces, loop variables, splits, filters
REAL = ("{% set ns = namespace(sys='', last=None) %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.sys = m['content'] %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.sys }}"
        "{% for m in messages if m.role != 'system' %}<|{{ m.role }}|>{{ m.content.split('</think>')[-1]|trim }}"
        "{% if not loop.last %}\n{% endif %}{% endfor %}{{ messages|tojson }}{{ '%d'|format(messages|length) }}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def render(source: str) -> str:
    return ChatTemplate(source, "x/tokenizer_config.json").render(MSGS, bos_token="<s>", eos_token="</s>")


def test_real_templates_render_as_before():
    assert render(tiny.CHAT_TEMPLATE) == "<s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    assert render(REAL) == ('<s>Be brief.<|user|>Hi[{"role": "system", "content": "Be brief."}, '
                            '{"role": "user", "content": "Hi"}]2<|assistant|>')


@pytest.mark.parametrize("source, want", [
    ("{{ ('a' * 2000000000)|length }}", "repeats a value 2000000000 times"),
    ("{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "built a value of"),
    ("{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}", "output passed"),
    ("{{ 'a'|center(2000000000) }}", "given the number 2000000000"),
    ("{{ '{:>2000000000}'.format('x') }}", "field millions of characters wide"),
    ("{{ '%2000000000s'|format('x') }}", "field millions of characters wide"),
    ("{{ 10 ** 100000000 }}", "to the power"),
    ("{{ ('a' * 1000000).replace('a', 'a' * 1000) }}", r"replace\(\) would build"),
])
def test_templates_that_would_use_gigabytes_stop_at_once(source, want):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=want) as e:
        render(source)
    assert time.perf_counter() - t0 < 2 and str(e.value).startswith("x/tokenizer_config.json: chat_template")


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'ab' * 3000 %}{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}{% endfor %}{% endfor %}",
])
def test_templates_that_would_run_for_minutes_stop_at_the_time_limit(source):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"ran for more than {MAX_SECONDS:g} s"):
        render(source)
    assert time.perf_counter() - t0 < MAX_SECONDS + 3


@pytest.mark.parametrize("source, want", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for %}", "does not parse"),
    ("{{ messages.pop() }}", "chat_template failed"),  # the sandbox is immutable
])
def test_template_errors_are_one_line(source, want):
    with pytest.raises(ConfigError, match=want) as e:
        render(source)
    assert "\n" not in str(e.value)
