"""Stock `mlx_lm.server --trust-remote-code` serving the bundled Titans model over real HTTP on 127.0.0.1.

The server is mlx-lm's own, started as a subprocess; expected texts come from titans_mlx's generation in this process
(greedy, so any difference in the model's cache handling shows as a different token).
"""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from titans_mlx.generate import DEFAULT_MODEL, generate
from titans_mlx.io import load

ROOT = Path(__file__).resolve().parents[1]
DOC = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
       "was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there "
       "be light: and there was light.")  # longer than a segment plus its window: the memory writes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int):
        self.port = port

    def request(self, method, path, body=None, timeout=120):
        """(status, parsed JSON or raw bytes); status None when the server closed the connection without a reply."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, raw
        except (http.client.RemoteDisconnected, ConnectionError):
            return None, None
        finally:
            conn.close()

    def complete(self, prompt, max_tokens=12, **kw):
        status, reply = self.request("POST", "/v1/completions",
                                     {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})
        assert status == 200, reply
        return reply


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(DEFAULT_MODEL),
                                 "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    s = Server(port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlx_lm.server exited: {log.read_text()[-2000:]}"
            try:
                if s.request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlx_lm.server did not come up: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local():
    model, tokenizer = load(DEFAULT_MODEL)
    return lambda prompt, n: generate(model, tokenizer, prompt, max_tokens=n)


def test_completion_equals_titans_mlx_generation(server, local):
    reply = server.complete(DOC, 16)
    assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] == 16
    assert reply["choices"][0]["text"] == local(DOC, 16)


def test_chat_completion_answers(server):
    status, reply = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": DOC}], "max_tokens": 8, "temperature": 0})
    assert status == 200, reply
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] == 8
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_follow_up_reuses_the_saved_state_and_continues_exactly(server, local):
    # the server keeps the cache after (prompt + completion); a follow-up that extends them reads only the new
    # tokens, and its answer is that of one uninterrupted pass over the whole text
    first = DOC[:150]
    answer = server.complete(first, 10)["choices"][0]["text"]
    follow = first + answer + " And God saw the light, that it was good."
    reply = server.complete(follow, 12)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len((first + answer).encode())
    assert reply["choices"][0]["text"] == local(follow, 12)


def test_concurrent_requests_get_the_answers_they_get_alone(server, local):
    prompts = [DOC[i:i + 120] for i in (0, 40, 80)]
    replies = [None] * len(prompts)

    def ask(i):
        replies[i] = server.complete(prompts[i], 10)["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert replies == [local(p, 10) for p in prompts]


def test_bad_requests_get_errors_and_leave_it_serving(server, local):
    assert server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0})[0] == 400
    assert server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -5})[0] == 400
    assert server.request("POST", "/v1/completions", b"{not json")[0] == 400
    status, _ = server.request("POST", "/v1/completions",
                               {"model": str(ROOT / "no-such-model"), "prompt": "hi", "max_tokens": 2})
    assert status == 404
    # an empty prompt is zero byte tokens, which mlx-lm's generate_step refuses: no completion comes back
    status, _ = server.request("POST", "/v1/completions", {"prompt": "", "max_tokens": 2})
    assert status != 200
    assert server.complete(DOC, 6)["choices"][0]["text"] == local(DOC, 6)
