"""`parley serve` live on a loopback port, on the tiny model, driven by the real `openai` client and raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from app.serve.child import LiveServer


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with LiveServer(tiny_model_dir, tmp_path_factory.mktemp("serve") / "home") as live:
        yield live


def client(live: LiveServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def chat(live, messages, **kw):
    return client(live).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw)


def persona(name: str) -> list[dict]:
    return [{"role": "system", "content": f"You are {name}. Speak like {name} and never break character."}]


# -- reuse ---------------------------------------------------------------------------------------


def test_second_turn_reports_cached_tokens_covering_the_first(server):
    messages = persona("Ada the pirate") + [{"role": "user", "content": "Good morning, captain."}]
    first = chat(server, messages)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Where are we sailing today?"}]
    second = chat(server, messages)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage)
    assert second.usage.prompt_tokens > cached  # the new user turn was prefilled
    assert second.model_extra["parley"]["cache"] == "ram"


def test_streaming_chat_with_the_openai_client_reports_usage(server):
    messages = persona("Grace the admiral") + [{"role": "user", "content": "Status report, please."}]
    first = chat(server, messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the fleet?"}]
    stream = client(server).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                                    stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert finishes in (["length"], ["stop"])
    assert usage.completion_tokens >= 1 and (text or finishes == ["stop"])
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_text_completions_and_alternatives_share_one_prefill(server):
    c = client(server)
    prompt = "The lighthouse keeper wrote in his log that the storm"
    one = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    two = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [ch.index for ch in two.choices] == [0, 1, 2]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.prompt_tokens_details.cached_tokens == one.usage.prompt_tokens - 1  # all but the last token
    assert 3 <= two.usage.completion_tokens <= 18


def test_two_clients_alternating_characters_both_keep_their_caches(server):
    a = persona("Captain Nemo") + [{"role": "user", "content": "Describe the Nautilus."}]
    b = persona("Sherlock Holmes") + [{"role": "user", "content": "What do you deduce about me?"}]
    first = {}
    for name, messages in (("a", a), ("b", b)):
        first[name] = chat(server, messages)
        messages += [{"role": "assistant", "content": first[name].choices[0].message.content},
                     {"role": "user", "content": "Tell me more."}]
    for name, messages in (("a", a), ("b", b)):
        again = chat(server, messages)
        assert again.usage.prompt_tokens_details.cached_tokens >= first[name].usage.prompt_tokens, name


def test_llama_cpp_dialect_over_raw_http(server):
    prompt = "<|im_start|>user\nWrite a haiku about tea.<|im_end|>\n<|im_start|>assistant\n"
    body = {"prompt": prompt, "n_predict": 6, "temperature": 0, "cache_prompt": True,
            "logit_bias": [[5, -2.0], ["tea", False]], "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}
    first = httpx.post(f"{server.url}/completion", json=body, timeout=120).json()
    assert first["stop"] is True and first["tokens_evaluated"] > 0 and "timings" in first
    again = httpx.post(f"{server.url}/completion", json={**body, "stream": True}, timeout=120)
    assert again.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in again.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    assert events[-1]["tokens_cached"] == first["tokens_evaluated"] - 1
    assert events[-1]["timings"]["cache_n"] == events[-1]["tokens_cached"]
    ids = httpx.post(f"{server.url}/tokenize", json={"content": "hello tea"}, timeout=30).json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=30).json()["content"] == "hello tea"
    props = httpx.get(f"{server.url}/props", timeout=30).json()
    assert props["default_generation_settings"]["n_ctx"] == 2048 and props["chat_template"]
    assert httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]


def test_logit_bias_bans_a_token(server):
    tok = httpx.post(f"{server.url}/tokenize", json={"content": "\n"}, timeout=30).json()["tokens"]
    body = {"prompt": "Once upon a time", "n_predict": 12, "temperature": 0}
    banned = httpx.post(f"{server.url}/completion", json={**body, "logit_bias": [[tok[0], False]]}, timeout=120).json()
    forced = httpx.post(f"{server.url}/completion", json={**body, "logit_bias": {str(tok[0]): 100}}, timeout=120).json()
    assert "\n" not in banned["content"]
    assert forced["content"] == "\n" * forced["tokens_predicted"]


def test_stop_strings_end_the_reply_and_are_not_streamed(server):
    """A forced token "the" repeats: the stop "et" (across two tokens) cuts the reply to "th", also when streaming."""
    word = next(w for w in ("the", "and", "in", "of", "to") if len(tokenize(server, w)) == 1)
    stop = word[-1] + word[0]
    token = tokenize(server, word)[0]
    body = {"prompt": "Say it:", "n_predict": 30, "temperature": 0, "logit_bias": [[token, 100]], "stop": [stop, "zzz"]}
    plain = httpx.post(f"{server.url}/completion", json=body, timeout=120).json()
    assert plain["content"] == word[:-1], json.dumps(plain)
    assert (plain["stop_type"], plain["stopping_word"], plain["tokens_predicted"]) == ("word", stop, 2)
    streamed = []
    stream_llama(server.url, body, streamed)
    assert "".join(e["content"] for e in streamed[:-1]) == word[:-1] and streamed[-1]["stop_type"] == "word"
    chat = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=30, temperature=0, logit_bias={str(token): 100},
                                                  stop=word * 3)
    assert chat.choices[0].message.content == "" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens == 3


def tokenize(live, text: str) -> list[int]:
    return httpx.post(f"{live.url}/tokenize", json={"content": text}, timeout=30).json()["tokens"]


# -- several clients ------------------------------------------------------------------------------


def stream_llama(url: str, body: dict, out: list, headers=None) -> None:
    with httpx.stream("POST", f"{url}/completion", json={**body, "stream": True}, timeout=120, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))


def test_concurrent_streams_stay_separate(server):
    """Each stream is forced (logit bias) onto its own token: any mix-up shows as a foreign character."""
    ids = {c: httpx.post(f"{server.url}/tokenize", json={"content": c}, timeout=30).json()["tokens"] for c in "xyz"}
    assert all(len(v) == 1 for v in ids.values())
    results = {c: [] for c in ids}
    threads = [threading.Thread(target=stream_llama, args=(server.url, {
        "prompt": f"Repeat after me: {c}", "n_predict": 20, "temperature": 0.7,
        "logit_bias": [[ids[c][0], 100]]}, results[c])) for c in ids]
    for t in threads:
        t.start()
    health = httpx.get(f"{server.url}/health", timeout=10)  # answers while the engine works
    for t in threads:
        t.join(120)
    assert health.status_code == 200
    for c, events in results.items():
        text = "".join(e["content"] for e in events if not e["stop"])
        assert text == c * 20, (c, text)
        assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 20


def test_disconnect_cancels_the_generation(server):
    before = server.health()["parley"]["cancelled"]
    with httpx.stream("POST", f"{server.url}/completion", timeout=120,
                      json={"prompt": "Tell me a very long story.", "n_predict": 1900, "temperature": 0.8,
                            "stream": True, "logit_bias": [[i, False] for i in range(3)]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the first token arrived: leave
    deadline = time.monotonic() + 60
    while server.health()["parley"]["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = server.health()["parley"]
    assert counts["cancelled"] == before + 1
    assert counts["last_cancelled_after_tokens"] < 1900


# -- bad input ---------------------------------------------------------------------------------------

LONG = "word " * 3000

BAD = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "text"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "temperature"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), 400, "stream"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 99}).encode(), 400, "`n`"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": 5}).encode(), 400, "stop"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}).encode(), 400, "logit_bias"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 7}).encode(), 400, "top_p"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "user": 12}).encode(), 400, "user"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": LONG}]}).encode(), 400, "context window"),
    ("/v1/completions", json.dumps({"prompt": {"a": 1}}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [1, 2, 10**9]}).encode(), 400, "token id"),
    ("/completion", json.dumps({"prompt": LONG, "n_predict": 5}).encode(), 400, "context window"),
    ("/completion", json.dumps({"prompt": "x", "logit_bias": [[1, "big"]]}).encode(), 400, "logit_bias"),
    ("/completion", json.dumps({"prompt": "x", "seed": "s"}).encode(), 400, "seed"),
    ("/completion", json.dumps({"prompt": ""}).encode(), 400, "empty"),
    ("/tokenize", json.dumps({"content": 3}).encode(), 400, "content"),
    ("/detokenize", json.dumps({"tokens": [-1]}).encode(), 400, "token id"),
    ("/completion", b"x" * (9 * 1024 * 1024), 413, "larger than"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p}:{w}" for p, _, _, w in BAD])
def test_bad_input_gets_a_clear_json_4xx(server, path, body, status, words):
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words in message and "Traceback" not in r.text


def test_unknown_paths_and_methods_are_json_errors(server):
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    wrong = httpx.get(f"{server.url}/v1/chat/completions", timeout=10)
    assert (missing.status_code, wrong.status_code) == (404, 405)
    assert "endpoint" in missing.json()["error"]["message"] and "GET" in wrong.json()["error"]["message"]


def test_openai_client_sees_a_bad_request_error(server):
    with pytest.raises(openai.BadRequestError, match="context window"):
        chat(server, [{"role": "user", "content": LONG}])


# -- restart, api key -----------------------------------------------------------------------------------


def test_after_a_restart_the_next_turn_comes_from_disk(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    messages = persona("Marie the chemist") + [{"role": "user", "content": "What are you working on?"}]
    with LiveServer(tiny_model_dir, home) as live:
        first = chat(live, messages, extra_headers={"X-Session-ID": "marie"})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Is it dangerous?"}]
    with LiveServer(tiny_model_dir, home) as live:
        second = chat(live, messages)  # no hint needed: found by content
    assert second.model_extra["parley"]["cache"] == "disk"
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_api_key_is_required_when_given(tiny_model_dir, tmp_path):
    with LiveServer(tiny_model_dir, tmp_path / "home", api_key="s3cret") as live:
        with pytest.raises(openai.AuthenticationError):
            client(live, api_key="wrong").models.list()
        assert client(live, api_key="s3cret").models.list().data
        assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200  # probes need no key


def test_non_loopback_host_requires_an_api_key(capsys):
    from app.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "8089"]) == 1
    assert "--api-key" in capsys.readouterr().err
