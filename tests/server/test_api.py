"""The OpenAI-compatible routes, through the real `openai` client and httpx, against a server on a free loopback
port over the demo model: answers equal the engine's own (greedy), streaming format, errors, cancellation."""
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import serve

import hybridmoe
from hybridmoe import Done, GenerationConfig, Text
from hybridmoe.server.backend import Backend, ServeOptions
from hybridmoe.server.serve import Running

HELLO = [{"role": "user", "content": "Hello"}]


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def alone(engine, prompt, **cfg) -> Done:
    return list(engine.generate(prompt, GenerationConfig(**cfg)))[-1]


def metrics(server) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            out[s.name + "".join(f"{{{k}={v}}}" for k, v in s.labels.items())] = s.value
    return out


def test_chat_completion_equals_the_engine_alone(server, demo_engine):
    r = client(server).chat.completions.create(model="demo", messages=HELLO, max_tokens=16, temperature=0)
    solo = alone(demo_engine, HELLO, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == "demo"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == solo.text
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[solo.reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (solo.prompt_tokens, solo.completion_tokens)
    assert r.usage.total_tokens == solo.prompt_tokens + solo.completion_tokens


def test_streamed_chat_format_and_usage(server, demo_engine):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "model": "demo", "messages": HELLO, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *body, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10  # include_usage: a final chunk
    assert all(c["usage"] is None for c in body)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    assert text == alone(demo_engine, HELLO, max_tokens=10, temperature=0).text


def test_completions_and_models(server, demo_engine):
    c = client(server)
    r = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=0)
    solo = alone(demo_engine, "Once upon a time", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == solo.text
    assert r.usage.completion_tokens == solo.completion_tokens
    streamed = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=0,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == solo.text
    models = c.models.list().data
    assert [m.id for m in models] == ["demo"] and models[0].meta["context"] == demo_engine.max_context


def test_seeded_sampling_parameters_reach_the_sampler(server, demo_engine):
    params = dict(temperature=0.9, top_p=0.9, seed=5, frequency_penalty=0.4, presence_penalty=0.2, max_tokens=16)
    r = client(server).chat.completions.create(model="demo", messages=HELLO, **params,
                                               extra_body={"top_k": 20, "min_p": 0.02, "repetition_penalty": 1.1})
    solo = alone(demo_engine, HELLO, top_k=20, min_p=0.02, repetition_penalty=1.1, **params)
    assert r.choices[0].message.content == solo.text


def test_max_completion_tokens_and_stop_as_the_engine_takes_them(server, demo_engine):
    c = client(server)
    r = c.chat.completions.create(model="demo", messages=HELLO, max_completion_tokens=5, max_tokens=9,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"  # the newer name wins
    text = alone(demo_engine, HELLO, max_tokens=24, temperature=0, ignore_eos=True).text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    solo = alone(demo_engine, HELLO, max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    r = c.chat.completions.create(model="demo", messages=HELLO, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert solo.reason == "stop" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == solo.text and stop not in solo.text


def test_sixteen_concurrent_streams_each_equal_their_answer_alone(server, demo_engine):
    questions = [f"Tell me about {w}" for w in ("os", "sys", "json", "re", "math", "time", "random", "heapq",
                                                 "bisect", "zlib", "csv", "enum", "abc", "io", "glob", "shutil")]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = client(server).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": questions[i]}], max_tokens=12, temperature=0,
            stream=True)
        answers[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    before = metrics(server)
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    after = metrics(server)
    assert len(answers) == 16
    for i, q in enumerate(questions):
        assert answers[i] == alone(demo_engine, [{"role": "user", "content": q}], max_tokens=12, temperature=0).text
    steps = after["hybridmoe_decode_steps_total"] - before["hybridmoe_decode_steps_total"]
    tokens = after["hybridmoe_generated_tokens_total"] - before["hybridmoe_generated_tokens_total"]
    assert tokens >= 16 and steps < tokens / 2  # rows decoded together, not one request after another


def test_r1_thinking_streams_as_reasoning_content(tiny_models, tmp_path):
    import shutil

    import tiny
    d = tmp_path / "r1"
    shutil.copytree(tiny_models("deepseek_v3"), d)
    tiny.write_tokenizer(d, tiny.R1_TEMPLATE)
    engine = hybridmoe.load(d)
    events = list(engine.chat(HELLO, GenerationConfig(temperature=0, max_tokens=12, ignore_eos=True)))
    want = {ch: "".join(e.text for e in events if isinstance(e, Text) and e.channel == ch)
            for ch in ("reasoning", "answer")}
    with serve(engine) as srv:
        stream = client(srv).chat.completions.create(model="r1", messages=HELLO, max_tokens=12, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
        got = {"reasoning": "", "answer": ""}
        for ch in stream:
            delta = ch.choices[0].delta
            got["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            got["answer"] += delta.content or ""
        whole = client(srv).chat.completions.create(model="r1", messages=HELLO, max_tokens=12, temperature=0,
                                                    extra_body={"ignore_eos": True})
        # a plain completion of the rendered prompt (which opens <think>) gives the text as the model wrote it
        prompt = engine.tokenizer.render_chat(HELLO)
        raw = client(srv).completions.create(model="r1", prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    assert got["reasoning"] and got == want
    assert whole.choices[0].message.reasoning_content == want["reasoning"]
    assert whole.choices[0].message.content == want["answer"]
    assert raw == want["reasoning"] + ("</think>" + want["answer"] if want["answer"] else "")


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "demo"}, 400, "messages"),
    ({"messages": HELLO, "temperature": -1}, 400, "temperature"),
    ({"messages": HELLO, "n": 2}, 400, "only n=1"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HELLO, "stop": [""]}, 400, "stop"),
    ({"messages": HELLO, "logprobs": True}, 400, "logprobs is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_get_openai_shaped_400s(server, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"


def test_over_long_prompt_and_body_limits(server, demo_engine):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model="demo", prompt="hello " * 3000, max_tokens=4)
    assert f"the context holds {demo_engine.max_context}" in str(e.value)
    r = httpx.post(server.url + "/v1/completions", timeout=30, content=b" " * (9 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route /v1/nowhere"


def test_api_key(demo_engine):
    with serve(demo_engine, api_key="sesame") as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").models.list()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        assert [m.id for m in client(srv, "sesame").models.list().data] == ["demo"]


def test_serving_another_address_needs_a_key_or_the_explicit_flag():
    with pytest.raises(hybridmoe.ConfigError, match="--api-key"):
        ServeOptions(host="0.0.0.0")
    assert ServeOptions(host="0.0.0.0", insecure_no_key=True).api_key is None


def test_client_disconnect_mid_stream_cancels_the_row(server):
    before = metrics(server).get('hybridmoe_requests_total{reason=cancelled}', 0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "messages": HELLO, "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks arrived: the row is decoding
    assert any(line.startswith("data: ") for line in got)
    deadline = time.time() + 30
    while server.backend.batch.running or metrics(server).get('hybridmoe_requests_total{reason=cancelled}',
                                                               0) == before:
        assert time.time() < deadline, "the cancelled row stayed in the batch"
        time.sleep(0.05)


def test_queue_limit_answers_429(demo_engine):
    with serve(demo_engine, max_seqs=1, max_queue=0) as srv:
        body = {"messages": HELLO, "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as first:
            lines = first.iter_lines()
            next(lines)
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=30)
            assert r.status_code == 429 and "try again" in r.json()["error"]["message"], (r.text, [next(lines) for _ in range(4)])


def test_health_while_loading_then_ready_and_metrics(monkeypatch, demo_engine):
    release = threading.Event()

    def slow_load(model, options=None, progress=None):
        progress(0.25)
        release.wait(30)
        return demo_engine

    monkeypatch.setattr(hybridmoe, "load", slow_load)
    backend = Backend("demo", hybridmoe.RunOptions(), ServeOptions()).start()
    with Running(backend) as srv:
        r = httpx.get(srv.url + "/health")
        while r.json().get("progress", 0) < 0.25:
            r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading", "progress": 0.25}
        busy = httpx.post(srv.url + "/v1/chat/completions", json={"messages": HELLO})
        assert busy.status_code == 503 and "loading (25%)" in busy.json()["error"]["message"]
        assert metrics(srv)["hybridmoe_model_load_progress"] == 0.25
        release.set()
        deadline = time.time() + 30
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        client(srv).chat.completions.create(model="demo", messages=HELLO, max_tokens=3)
        m = metrics(srv)
    for name in ("hybridmoe_decode_tokens_per_second", "hybridmoe_requests_running", "hybridmoe_requests_waiting",
                 "hybridmoe_expert_cache_hit_rate", "hybridmoe_expert_bytes_copied_total",
                 "hybridmoe_generated_tokens_total"):
        assert name in m
    assert m["hybridmoe_ready"] == 1 and m["hybridmoe_generated_tokens_total"] >= 1


def test_a_failed_load_is_reported_not_raised(tmp_path):
    backend = Backend(str(tmp_path / "missing"), hybridmoe.RunOptions(), ServeOptions()).start()
    with Running(backend) as srv:
        deadline = time.time() + 30
        while backend.error is None:
            assert time.time() < deadline
            time.sleep(0.02)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "no such file" in r.json()["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
