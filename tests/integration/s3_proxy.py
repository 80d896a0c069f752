"""A latency and accounting proxy in front of the loopback S3 server (moto).

Real object stores answer every request after tens of milliseconds; moto on loopback answers in
well under one. Requests pass through this proxy, which waits ``delay`` seconds before forwarding
each one and records its method, path and the bytes of its response, so a test or a benchmark can
count requests and bytes per object and measure what a per-request latency costs a job.

One HTTP/1.1 request at a time per connection (what boto3, s3fs and pyarrow's clients send); the
proxy reads the request head and body, forwards it, reads the whole response, sends it back.
Bound to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Request:
    method: str
    path: str  # /bucket/key (path-style), query string dropped
    response_bytes: int  # body bytes of the response
    started: float


@dataclass
class S3Proxy:
    """``endpoint_url`` to give clients; ``requests`` as they happened (thread-safe to read)."""

    upstream: str
    delay: float = 0.0
    endpoint_url: str = ""
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="s3-proxy")
        self._thread.start()
        self._ready.wait(10)

    def reset(self, delay: float | None = None) -> None:
        with self._lock:
            self.requests.clear()
            if delay is not None:
                self.delay = delay

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- the server ----------------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = urlsplit(self.upstream)
        up_reader, up_writer = await asyncio.open_connection(up.hostname, up.port)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                if (_header(head, b"expect") or b"").lower() == b"100-continue":
                    # Answered here: the client then sends its body, forwarded without the header.
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    head = _without(head, b"expect")
                body = await _read_body(reader, head)
                started = time.time()
                if self.delay:
                    await asyncio.sleep(self.delay)
                up_writer.write(head + body)
                await up_writer.drain()
                response_head = await _read_head(up_reader)
                if response_head is None:
                    break
                method = head.split(b" ", 1)[0].decode()
                response_body = b"" if method == "HEAD" else await _read_body(up_reader, response_head)
                writer.write(response_head + response_body)
                await writer.drain()
                path = head.split(b" ", 2)[1].decode().split("?", 1)[0]
                with self._lock:
                    self.requests.append(Request(method, path, len(response_body), started))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _without(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [lines[0], *(line for line in lines[1:] if line.partition(b":")[0].strip().lower() != name)]
    return b"\r\n".join(kept)


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    length = _header(head, b"content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        out = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            out += chunk
            if size == 0:
                return out
    return b""
