"""The client against a small HTTP server on loopback: retries on 503, errors, the wire format."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from visualprm_ray import client
from visualprm_ray.serve.config import TOKEN_ENV


class _Server:
    """Answers each POST with the next of ``answers`` (status, headers, body) and records requests."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((dict(self.headers), body))
                status, headers, payload = outer.answers.pop(0)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


OK = (200, {}, {"model": "sha256:x", "results": [{"score": 0.5}]})
FULL = (503, {"Retry-After": "0"}, {"error": "queue full"})


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_full_queue_is_retried_then_answered(kind, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "tok")
    server = _Server([FULL, FULL, OK])
    try:
        if kind == "sync":
            results = client.PRMClient(server.url).score("q?", ["a", ["b", "c"]], b"\x89PNG")
        else:
            results = asyncio.run(
                client.AsyncPRMClient(server.url).score("q?", ["a", ["b", "c"]], b"\x89PNG")
            )
    finally:
        server.close()
    assert results == [{"score": 0.5}]
    assert len(server.requests) == 3
    headers, body = server.requests[-1]
    assert headers["Authorization"] == "Bearer tok"
    assert body == {
        "question": "q?",
        "responses": ["a", ["b", "c"]],
        "images": [base64.b64encode(b"\x89PNG").decode()],
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_other_errors_and_a_queue_that_stays_full_raise_with_the_servers_message(kind):
    server = _Server([(400, {}, {"error": "not a scoring request: question"}), FULL, FULL])
    try:
        for status, message in ((400, "not a scoring request"), (503, "queue full")):
            scorer = (client.PRMClient if kind == "sync" else client.AsyncPRMClient)(
                server.url, token="t", retries=1
            )
            with pytest.raises(client.ScoreError, match=message) as caught:
                result = scorer.score("q", ["a"])  # the sync client raises here
                if kind == "async":
                    asyncio.run(result)
            assert caught.value.status == status
    finally:
        server.close()
    assert len(server.requests) == 3  # the 400 once; the 503 once and once again


def test_images_go_as_base64_or_as_the_string_given(tmp_path):
    image = Image.new("RGB", (4, 3), "red")
    decoded = Image.open(io.BytesIO(base64.b64decode(client.encode_image(image))))
    assert decoded.size == (4, 3)
    (tmp_path / "a.png").write_bytes(b"bytes")
    assert base64.b64decode(client.encode_image(tmp_path / "a.png")) == b"bytes"
    assert client.encode_image("s3://bucket/a.png") == "s3://bucket/a.png"
    with pytest.raises(TypeError):
        client.encode_image(3)
    assert client.TOKEN_ENV == TOKEN_ENV
