"""`selfextend serve` as users run it: a real uvicorn process on a free localhost port, driven by the
official `openai` client and by raw HTTP for the requests a client library would never send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from selfextend import apply, models  # noqa: E402
from selfextend.inference import answer, pad_id, prefill  # noqa: E402
from selfextend.planning import plan_for  # noqa: E402
from selfextend.samples import passkey_sample, token_counter  # noqa: E402
from conftest import wait_until_healthy  # noqa: E402
from selfextend.serving.local import free_port  # noqa: E402

KEY, NAME, CHUNK, CAP, QUEUE = "sk-test-key", "testbed", 32, 64, 4
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server process and its base URL; stopped (and checked alive) at the end."""
    template = tmp_path_factory.mktemp("serve") / "template.jinja"
    template.write_text(TEMPLATE)
    port = free_port()
    log_path = tmp_path_factory.mktemp("log") / "server.log"
    log = open(log_path, "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "selfextend", "serve", "--model", "testbed", "--port", str(port), "--api-key", KEY,
         "--chunk-size", str(CHUNK), "--chat-template", str(template), "--max-queue", str(QUEUE),
         "--max-tokens-cap", str(CAP), "--max-body-mb", "1", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SELFEXTEND_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, process, log_path, 120)
    yield process, url
    process.terminate()
    process.wait(30)
    log.close()


@pytest.fixture(scope="module")
def reference():
    """The testbed loaded here, and the greedy answer `generate` gives, for comparison."""
    source = models.resolve("testbed")
    tokenizer, model = models.load_tokenizer(source), models.load_model(source)

    def greedy(ids: list[int], max_tokens: int) -> str:
        chosen = plan_for(model, len(ids) + max_tokens)
        apply(model, chosen.group_size, chosen.window_size, effective_length=chosen.effective_length)
        tensor = torch.tensor([ids])
        new = answer(model, tensor, prefill(model, tensor, CHUNK), max_tokens, pad_id(tokenizer))
        return tokenizer.decode(new, skip_special_tokens=True)

    return tokenizer, greedy


def _client(url: str, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, **kwargs)


def _passkey(tokenizer, tokens: int, seed: int = 0):
    return passkey_sample(token_counter(tokenizer), tokens, seed=seed)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_completion_is_the_greedy_answer_streamed_or_not(server, reference):
    _, url = server
    tokenizer, greedy = reference
    sample = _passkey(tokenizer, 300)
    prompt = f"{sample.text}\n\n{sample.question}"
    expected = greedy(tokenizer(prompt).input_ids, 12)
    client = _client(url)
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected
    assert done.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    plan = done.model_extra["selfextend"]
    assert plan["group_size"] > 1  # 300 tokens on a 128-token model: SelfExtend at work
    parts = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == expected
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_is_the_greedy_answer_streamed_or_not(server, reference):
    _, url = server
    tokenizer, greedy = reference
    sample = _passkey(tokenizer, 250, seed=1)
    messages = [{"role": "user", "content": f"{sample.text}\n\n{sample.question}"}]
    ids = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    expected = greedy(list(ids), 10)
    client = _client(url)
    done = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.content == expected and done.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_stop_sampling_and_seed(server):
    _, url = server
    client = _client(url)
    prompt = "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key? The pass key is"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    stop = full.strip()[:1]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.5, top_p=0.9,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same sample


def test_ignore_eos_generates_max_tokens(server):
    """vLLM's `ignore_eos`: an answer that ends at the end-of-sequence token goes on to max_tokens instead, the
    same tokens first; without it the server stops there, as before."""
    _, url = server
    client = _client(url)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # random prompts until the greedy answer ends early (the second one does)
        prompt = torch.randint(4, 56, (100,), generator=generator).tolist()
        short = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        if short.usage.completion_tokens < 16:
            break
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 16
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(short.choices[0].text)


def test_follow_up_reuses_the_document_prefix(server, reference):
    _, url = server
    tokenizer, greedy = reference
    sample = _passkey(tokenizer, 600, seed=2)
    first, second = f"{sample.text}\n\n{sample.question}", f"{sample.text}\n\nWhat is the pass key? The key is"
    client = _client(url)
    client.completions.create(model=NAME, prompt=first, max_tokens=8, temperature=0)
    hits, prefilled = _metric(url, "selfextend_prefix_cache_hits_total"), _metric(url, "selfextend_prefill_tokens_total")
    again = client.completions.create(model=NAME, prompt=second, max_tokens=8, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    shared = len(tokenizer(f"{sample.text}\n\n").input_ids)
    assert cached == (shared - 1) // CHUNK * CHUNK > 0 if shared > CHUNK else cached >= 0
    assert cached > 400
    assert again.choices[0].text == greedy(tokenizer(second).input_ids, 8)
    assert _metric(url, "selfextend_prefix_cache_hits_total") == hits + 1
    assert _metric(url, "selfextend_prefill_tokens_total") - prefilled == again.usage.prompt_tokens - 1 - cached


BAD_REQUESTS = [  # (name, path, body, headers, status, words in the message)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "testbed", "messages": [', None, 400, "not valid JSON"),
    ("body not an object", "/v1/chat/completions", [1, 2], None, 400, ""),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None, 400, "model"),
    ("missing messages", "/v1/chat/completions", {"model": NAME}, None, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": NAME, "messages": []}, None, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
     None, 400, "role"),
    ("messages not a list", "/v1/chat/completions", {"model": NAME, "messages": "hi"}, None, 400, "messages"),
    ("content a number", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]},
     None, 400, "content"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, None, 404, "gpt-9"),
    ("model is a path", "/v1/completions", {"model": "/etc/passwd", "prompt": "hi"}, None, 404, "does not exist"),
    ("max_tokens zero", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, None, 400,
     "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -3}, None, 400,
     "max_tokens"),
    ("max_tokens above cap", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": CAP + 1}, None, 400,
     f"cap of {CAP}"),
    ("max_tokens a string", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}, None, 400,
     "max_tokens"),
    ("temperature out of range", "/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 3}, None, 400,
     "temperature"),
    ("top_p zero", "/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("stream not a boolean", "/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, None, 400,
     "stream"),
    ("five stop strings", "/v1/completions", {"model": NAME, "prompt": "hi", "stop": list("abcde")}, None, 400,
     "stop"),
    ("n above one", "/v1/completions", {"model": NAME, "prompt": "hi", "n": 2}, None, 400, "not supported"),
    ("token id out of vocabulary", "/v1/completions", {"model": NAME, "prompt": [1, 99999]}, None, 400, "token ids"),
    ("missing prompt", "/v1/completions", {"model": NAME}, None, 400, "prompt"),
    ("prompt past the limit", "/v1/completions", {"model": NAME, "prompt": "7 " * 8000, "max_tokens": 8}, None, 400,
     "maximum context length with SelfExtend is 7688"),
    ("body over the cap", "/v1/completions", {"model": NAME, "prompt": "x" * (1 << 20)}, None, 413, "larger than"),
    ("no API key", "/v1/completions", {"model": NAME, "prompt": "hi"}, {"authorization": ""}, 401, "missing API key"),
    ("wrong API key", "/v1/completions", {"model": NAME, "prompt": "hi"}, {"authorization": "Bearer sk-nope"}, 401,
     "incorrect API key"),
    ("wrong scheme", "/v1/models", None, {"authorization": f"Basic {KEY}"}, 401, "incorrect API key"),
    ("unknown path", "/v1/engines", {"model": NAME}, None, 404, "Not Found"),
]


@pytest.mark.parametrize("name,path,body,headers,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, path, body, headers, status, words):
    _, url = server
    sent = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **(headers or {})}
    sent = {k: v for k, v in sent.items() if v}
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    response = httpx.request("GET" if body is None else "POST", f"{url}{path}", content=content, headers=sent,
                             timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_client_that_leaves_stops_its_request(server, reference):
    _, url = server
    tokenizer, _ = reference
    sample = _passkey(tokenizer, 7000, seed=3)  # about 220 chunks
    prompt = f"{sample.text}\n\n{sample.question}"
    cancelled, prefilled = _metric(url, "selfextend_requests_cancelled_total"), _metric(url, "selfextend_prefill_tokens_total")
    body = {"model": NAME, "prompt": prompt, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=30) as response:
        assert response.status_code == 200
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=5)  # a long prefill does not hold up the rest
        assert health.status_code == 200 and time.monotonic() - started < 5
    deadline = time.monotonic() + 30
    while _metric(url, "selfextend_requests_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(url, "selfextend_requests_cancelled_total") == cancelled + 1
    assert _metric(url, "selfextend_prefill_tokens_total") - prefilled < len(tokenizer(prompt).input_ids) - 1


def test_bounded_load(server, reference):
    """16 clients × 4 requests at a server with 4 queue places: every answer is right or a 429."""
    process, url = server
    tokenizer, greedy = reference
    prompts = [f"{_passkey(tokenizer, 160, seed=s).text}\n\nWhat is the pass key? The pass key is" for s in range(4)]
    expected = [greedy(tokenizer(p).input_ids, 8) for p in prompts]
    client = _client(url, max_retries=0, timeout=60)
    outcomes, lock = [], threading.Lock()

    def user(u: int) -> None:
        for r in range(4):
            k = (u + r) % len(prompts)
            try:
                text = client.completions.create(model=NAME, prompt=prompts[k], max_tokens=8,
                                                 temperature=0).choices[0].text
                outcome = "ok" if text == expected[k] else f"wrong: {text!r}"
            except openai.RateLimitError as error:
                outcome = "429" if int(error.response.headers["retry-after"]) >= 1 else "429 without Retry-After"
            except Exception as error:  # noqa: BLE001 - any other outcome is a failure to report
                outcome = f"error: {error!r}"
            with lock:
                outcomes.append(outcome)

    started = time.monotonic()
    users = [threading.Thread(target=user, args=(u,)) for u in range(16)]
    for t in users:
        t.start()
    for t in users:
        t.join(timeout=180)
    seconds = time.monotonic() - started
    assert not any(t.is_alive() for t in users), "the load test did not finish in time"
    rss = Path(f"/proc/{process.pid}/status").read_text().split("VmHWM:")[1].split()[0]
    print(f"\nload: {len(outcomes)} requests in {seconds:.1f}s: {outcomes.count('ok')} answered, "
          f"{outcomes.count('429')} refused (429); server peak RSS {int(rss) / 1024:.0f} MiB")
    assert len(outcomes) == 64
    assert set(outcomes) <= {"ok", "429"}, [o for o in outcomes if o not in ("ok", "429")]
    assert outcomes.count("ok") >= QUEUE
    assert httpx.get(f"{url}/health").status_code == 200
