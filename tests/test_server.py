"""`kvcompose serve`: a conversation past n_ctx over HTTP, streaming and not, with visible statistics."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install '.[server]')")
pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install '.[server]')")

N_CTX = 256
TURN = "please remember this sentence about foxes and dogs " * 3
# At n_ctx 256 the protected cells (the system prompt and 64 recent tokens) are over a
# third of the cells: the budget must keep at least that much.
BUDGET = "0.75"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(model_path, *options: str):
    """`kvcompose serve` on a free loopback port, yielding its base URL; always stopped on exit."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvcompose_gguf.cli", "serve", str(model_path), "--host", "127.0.0.1",
         "--port", str(port), "--n-ctx", str(N_CTX), "--seed", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()}")
            try:
                _get(base + "/kv/stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail("the server did not answer within 60 s")
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with _serving(tiny_model_path, "--budget", BUDGET) as base:
        yield base


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: dict):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    return urllib.request.urlopen(request, timeout=120)


def _chat(base: str, messages: list, stream: bool) -> tuple[str, dict | None, dict | None]:
    """(reply text, usage, X-KV-Stats header) of one chat completion."""
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "seed": 0, "stream": stream}
    with _post(base + "/v1/chat/completions", body) as response:
        header = response.headers.get("X-KV-Stats")
        if not stream:
            result = json.loads(response.read())
            assert result["choices"][0]["finish_reason"] in ("length", "stop")
            return result["choices"][0]["message"]["content"], result["usage"], json.loads(header)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert header is None  # a stream's headers leave before its reply exists
        pieces, done = [], False
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            delta = json.loads(line[len("data: "):])["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
        assert done, "the stream ended without [DONE]"
        return "".join(pieces), None, None


def test_conversation_past_n_ctx_is_served_with_visible_compression(server, tiny_model_path):
    from kvcompose_gguf import cli
    from kvcompose_gguf.llama import Llama

    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    seen = []
    for turn in range(4):
        stream = turn % 2 == 1
        messages.append({"role": "user", "content": f"{turn}: {TURN}"})
        reply, usage, header = _chat(server, messages, stream)
        messages.append({"role": "assistant", "content": reply})
        stats = _get(server + "/kv/stats")
        if header is not None:
            assert header == stats  # the header and the endpoint describe the same moment
            # Every prompt token and every sampled token but the last (never decoded) is in the history.
            assert stats["logical_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
        seen.append(stats)

    assert [s["logical_tokens"] for s in seen] == sorted(s["logical_tokens"] for s in seen)
    last = seen[-1]
    # Stock llama-cpp-python would refuse this prompt; compression served it in n_ctx cells.
    assert last["logical_tokens"] > N_CTX >= last["cells_used"] and last["n_ctx"] == N_CTX
    assert last["compressions"] >= 1 and len(last["layer_budgets"]) == 4
    stock = Llama(model_path=str(tiny_model_path), n_ctx=N_CTX, flash_attn=True, verbose=False)
    per_cell = cli.kv_bytes_allocated(stock) // N_CTX
    stock.close()
    assert last["kv_bytes_allocated"] == per_cell * N_CTX
    assert last["kv_bytes_full_cache"] == per_cell * last["logical_tokens"]


def test_streaming_and_plain_replies_agree(server):
    messages = [{"role": "user", "content": "tell me about foxes"}]
    plain, _, header = _chat(server, messages, stream=False)
    streamed, _, _ = _chat(server, messages, stream=True)
    after_stream = _get(server + "/kv/stats")
    # temperature 0: the same tokens, whichever way they travel. The tiny model's vocabulary
    # is bytes, and llama-cpp-python's streaming drops a multi-byte character whose bytes
    # arrive in separate tokens, so only the ASCII text is compared.
    assert _ascii(streamed) == _ascii(plain)
    assert after_stream["logical_tokens"] == header["logical_tokens"]


def _ascii(text: str) -> str:
    return text.encode("ascii", "ignore").decode()


def test_bad_request_is_an_http_error_and_the_server_goes_on(server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(server + "/v1/chat/completions", {"messages": "not a list"})
    # llama-cpp-python's route error handler answers validation errors with 500 and the message.
    assert caught.value.code >= 400
    assert "Input should be a valid list" in json.loads(caught.value.read())["error"]["message"]
    reply, _, header = _chat(server, [{"role": "user", "content": "still there?"}], stream=False)
    assert header["logical_tokens"] > 0


def test_stock_server_refuses_what_the_compressing_one_serves(tiny_model_path):
    messages = [{"role": "user", "content": TURN * 3}]  # one prompt longer than n_ctx
    with _serving(tiny_model_path, "--policy", "none") as stock:
        with pytest.raises(urllib.error.HTTPError) as caught:
            _chat(stock, messages, stream=False)
        assert caught.value.code == 400
        assert "maximum context length" in json.loads(caught.value.read())["error"]["message"]
    with _serving(tiny_model_path, "--budget", BUDGET) as compressing:
        reply, usage, header = _chat(compressing, messages, stream=False)
        assert usage["prompt_tokens"] > N_CTX >= header["cells_used"] and header["compressions"] >= 1


def test_refused_settings_are_one_line_errors(tiny_model_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvcompose_gguf.cli", "serve", str(tiny_model_path), "--policy", "no-such-policy",
         "--port", str(_free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "policy 'no-such-policy'" in result.stderr and "Traceback" not in result.stderr
