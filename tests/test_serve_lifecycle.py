"""`lmkiln serve` under pressure: a client that leaves mid-stream frees its row, a full queue answers
429, SIGTERM drains the requests in flight and exits, and binding beyond loopback needs a key.

The server has one row and one waiting place, and a base model with a 4096-token context, so that
a long request is still running while the test looks at it.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest
from conftest import run_cli
from finetune_helpers import make_base
from serve_helpers import request, start_server, stop_server

NAME = "long-base"
LONG = 3500
"""Tokens of the long request: seconds of generation, so it is still running while the test looks."""
pytestmark = pytest.mark.slow  # a live server per module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    # wide enough that the long request takes seconds, not a fraction of one, on an idle machine
    base = make_base(root / "base", block_size=4096, d_model=256)
    log = root / "server.log"
    proc, url = start_server(
        str(base),
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--model-name",
        NAME,
        "--mode",
        "completion",
        log=log,
    )
    yield proc, url, log
    stop_server(proc)


def open_stream(url: str, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {
        "model": NAME,
        "prompt": "red cat",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def events(response: http.client.HTTPResponse):
    """The data of each server-sent event, up to and including [DONE]."""
    while True:
        line = response.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            yield data
            if data == "[DONE]":
                return


def wait_until(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(url: str) -> dict:
    return request(url + "/health")[1]


def test_binding_beyond_loopback_needs_an_api_key(server):
    proc = run_cli("serve", "no-such-run", "--host", "0.0.0.0", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 exposes the model beyond this machine; set a key with --api-key KEY "
        "(or LMKILN_API_KEY) to bind it, or keep the default 127.0.0.1"
    ]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    _, url, _ = server
    conn, response = open_stream(url, 2000)
    stream = events(response)
    for _ in range(3):  # the role chunk and two pieces of text
        next(stream)
    conn.close()  # the client goes away in the middle of a 2000-token answer
    wait_until(lambda: health(url)["finished"].get("cancelled") == 1, "the request to be cancelled")
    assert health(url)["running"] == 0
    status, body = request(url + "/v1/completions", "POST", {"model": NAME, "prompt": "sun", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3  # the only row is free again


def test_a_full_queue_answers_429_and_sigterm_drains_the_requests_in_flight(server):
    proc, url, log = server
    conn, response = open_stream(url, LONG)
    stream = events(response)
    next(stream)
    wait_until(lambda: health(url)["running"] == 1, "the long request to run")
    waiting: dict = {}

    def second() -> None:
        waiting["answer"] = request(
            url + "/v1/completions", "POST", {"model": NAME, "prompt": "dog", "max_tokens": 20}
        )

    thread = threading.Thread(target=second)
    thread.start()
    wait_until(lambda: health(url)["waiting"] == 1, "the second request to wait")
    status, body = request(url + "/v1/completions", "POST", {"model": NAME, "prompt": "sun", "max_tokens": 2})
    assert status == 429 and body["error"]["code"] == "queue_full"

    proc.send_signal(signal.SIGTERM)

    def refused() -> bool:  # 503 while uvicorn closes its socket, then no connection at all
        try:
            status, body = request(url + "/health")
            return False
        except OSError:
            return True

    wait_until(refused, "the server to stop listening", 30)
    rest = [json.loads(data) for data in stream if data != "[DONE]"]  # the stream runs to its end
    conn.close()
    assert (
        rest[-2]["choices"][0]["finish_reason"] == "length" and rest[-1]["usage"]["completion_tokens"] == LONG
    )
    thread.join(60)
    status, body = waiting["answer"]
    assert status == 200 and body["usage"]["completion_tokens"] == 20  # the waiting one was served too
    proc.wait(60)
    assert proc.returncode in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "server stopped" in text and "Traceback" not in text
