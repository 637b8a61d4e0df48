"""`lmkiln serve` against a live server on 127.0.0.1: the official openai client, every bad request,
a bounded load test, greedy answers alone vs batched, and the chat page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import pytest
from serve_helpers import chat_run, request, start_server, stop_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a live server (and a LoRA fine-tune) per module

KEY = "test-key-123"
PROMPTS = ["red cat", "sun moon tree", "dog", "blue green red"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run = chat_run(root)
    log = root / "server.log"
    proc, url = start_server(str(run), "--api-key", KEY, "--model-name", "tiny-chat", log=log)
    yield url, log
    stop_server(proc)
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    status, health = request(server[0] + "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-chat"


def test_chat_completion_with_the_openai_client_stops_at_the_end_of_turn(client):
    reply = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "red cat"}], temperature=0
    )
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "ok", "stop")
    assert reply.usage.completion_tokens == 3  # "o", "k" and the end-of-turn token
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3

    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "red cat"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == "ok" and sum(1 for d in deltas if d) == 2  # a chunk per token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3


def test_completions_stream_and_not_with_stop_and_length(client):
    whole = client.completions.create(model="tiny-chat", prompt="red cat", max_tokens=20, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 20
    text = whole.choices[0].text
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-chat", prompt="red cat", max_tokens=20, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 5
    cut = text[4:6]
    stopped = client.completions.create(
        model="tiny-chat", prompt="red cat", max_tokens=20, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[: text.index(cut)]
    seeded = [
        client.completions.create(model="tiny-chat", prompt="red", max_tokens=10, temperature=1.0, seed=5)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def _post(url: str, path: str, body, key: str | None = KEY):
    return request(url + path, "POST", body, key)


BAD_REQUESTS = {
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, KEY, 404, "model"),
    "malformed JSON": ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', KEY, 400, None),
    "negative max_tokens": (
        "/v1/completions",
        {"model": "tiny-chat", "prompt": "hi", "max_tokens": -5},
        KEY,
        422,
        "max_tokens",
    ),
    "huge max_tokens": (
        "/v1/completions",
        {"model": "tiny-chat", "prompt": "hi", "max_tokens": 10**9},
        KEY,
        400,
        "max_tokens",
    ),
    "prompt longer than the context": (
        "/v1/completions",
        {"model": "tiny-chat", "prompt": "red cat " * 200},
        KEY,
        400,
        "prompt",
    ),
    "missing key": ("/v1/completions", {"model": "tiny-chat", "prompt": "hi"}, None, 401, None),
    "wrong key": ("/v1/completions", {"model": "tiny-chat", "prompt": "hi"}, "test-key-124", 401, None),
    "empty messages": ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, KEY, 422, "messages"),
    "unknown role": (
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]},
        KEY,
        422,
        "messages.0.role",
    ),
    "temperature out of range": (
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 7},
        KEY,
        422,
        "temperature",
    ),
}


def test_an_oversized_body_is_refused_before_it_is_read(server):
    """A 2 MiB body against the 1 MiB limit: 413 from the declared length, before any byte is read."""
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\n\r\n".encode()
        )
        response = b""
        while b"}}" not in response:
            data = conn.recv(65536)
            if not data:
                break
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, case):
    path, body, key, status, param = BAD_REQUESTS[case]
    got, answer = _post(server[0], path, body, key)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert "Traceback" not in answer["error"]["message"]
    ok, reply = _post(server[0], "/v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2})
    assert ok == 200 and 1 <= reply["usage"]["completion_tokens"] <= 2


def test_load_32_streaming_clients_get_the_greedy_answers_they_would_get_alone(server):
    """64 requests from 32 concurrent clients; each answer equals the same prompt's answer generated
    alone (cut at max_tokens where that comes first), with the token count to match."""
    url = server[0]
    alone = {}
    for prompt in PROMPTS:  # one at a time: each runs alone in the batch
        status, body = _post(
            url,
            "/v1/completions",
            {"model": "tiny-chat", "prompt": prompt, "max_tokens": 40, "temperature": 0},
        )
        assert status == 200
        alone[prompt] = (
            body["choices"][0]["text"],
            body["usage"]["completion_tokens"],
            body["choices"][0]["finish_reason"],
        )

    async def one_client(api, index: int) -> list[tuple[str, int, str, int, str]]:
        results = []
        for round_ in range(2):
            prompt, max_tokens = PROMPTS[(index + round_) % len(PROMPTS)], 8 + (index * 7 + round_) % 33
            stream = await api.completions.create(
                model="tiny-chat",
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage, finish = "", None, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            results.append((prompt, max_tokens, text, usage, finish))
        return results

    async def load() -> list:
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            done = await asyncio.wait_for(asyncio.gather(*(one_client(api, i) for i in range(32))), 300)
        finally:
            await api.close()
        return [r for rs in done for r in rs]

    results = asyncio.run(load())
    assert len(results) == 64
    for prompt, max_tokens, text, usage, finish in results:
        alone_text, alone_tokens, alone_finish = alone[prompt]
        if max_tokens < alone_tokens or alone_finish == "length":  # cut at max_tokens: a prefix
            assert (usage, finish) == (max_tokens, "length") and alone_text.startswith(text), prompt
        else:  # the answer ends by itself (end of turn) as it did alone
            assert (usage, finish, text) == (alone_tokens, "stop", alone_text), prompt
    status, health = request(url + "/health")
    assert status == 200 and health["running"] == 0 and health["waiting"] == 0
    assert health["finished"].get("error", 0) == 0


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_the_chat_page_streams_an_answer_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url = server[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 900, "height": 520})
            page.goto(url + "/")
            page.fill("#key", KEY)  # the server wants a key: the page asks for it
            page.click("#key-save")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny-chat')")
            page.fill("#temperature", "0")
            page.fill("#input", "red cat")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant .stats:has-text('tokens/s')", timeout=30_000)
            assert page.inner_text(".user") == "red cat"
            answer = page.inner_text(".assistant")
            assert answer.startswith("ok") and "3 tokens" in answer
            page.fill("#input", "sun moon")  # the conversation goes on: two answers on the page
            page.press("#input", "Enter")
            page.wait_for_function(
                "document.querySelectorAll('.assistant .stats').length === 2 && document.querySelectorAll('.assistant .stats')[1].textContent.includes('tokens/s')"
            )
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert Path(tmp_path / "chat.png").stat().st_size > 1000
