"""A fault-injecting HTTP proxy in front of an S3-protocol server (moto), for the storage tests.

Not a test module: :mod:`test_storage_faults` imports it (pytest's default ``prepend`` import mode
puts this directory on ``sys.path``). The proxy forwards every request unchanged (method, path,
query, headers with the client's own ``Host``, body) to the upstream endpoint and relays the
answer, except where a rule says to fail: then it answers with a real S3 XML error and never
forwards. Clients (s3fs/aiobotocore in the driver and in Ray workers, pyarrow through fsspec)
therefore see exactly what a throttling or failing S3 sends them, and every retry they make is a
new request that the proxy logs.

Request and response bodies are buffered: test objects are small, and a buffered body can be
re-framed with a ``Content-Length`` whatever framing the client chose.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are not relayed. None of them
# is covered by a SigV4 signature (botocore never signs these), so dropping them keeps it valid.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """Fail requests whose method and key (``bucket/key``) match with ``status`` (a real S3
    error), ``times`` times (-1: always).

    With ``per_key`` the budget is per object key ("the first 2 GETs of every image"); otherwise it
    is shared by every matching request.
    """

    method: str | None
    key_contains: str
    key_suffix: str
    status: int
    times: int
    per_key: bool
    injected_by_key: dict[str, int] = field(default_factory=dict)

    @property
    def injected(self) -> int:
        return sum(self.injected_by_key.values())

    def matches(self, method: str, key: str) -> bool:
        return (
            (self.method is None or self.method == method)
            and self.key_contains in key
            and key.endswith(self.key_suffix)
        )

    def take(self, key: str) -> bool:
        """Whether this request is to be failed; counts it when it is (caller holds the lock)."""
        used = self.injected_by_key.get(key, 0) if self.per_key else self.injected
        if self.times >= 0 and used >= self.times:
            return False
        self.injected_by_key[key] = self.injected_by_key.get(key, 0) + 1
        return True


@dataclass(frozen=True)
class Request:
    """One request the proxy answered: what came in, what went out, and whether it was injected."""

    method: str
    key: str  # "bucket/key" (path-style, URL-decoded), "" for the service root
    query: str
    status: int
    injected: bool
    at: float  # time.monotonic() when answered: the gaps between retries are the backoff


class FaultProxy:
    """The proxy server and its rule table; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[Request] = []
        # Port 0: the kernel picks a free port, with no window in which another process can take it.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------ rules and log

    def fail(
        self,
        *,
        method: str | None = None,
        key_contains: str = "",
        key_suffix: str = "",
        status: int = 503,
        times: int = 1,
        per_key: bool = False,
    ) -> Rule:
        """Add a rule; earlier rules are tried first, and a spent rule lets requests through."""
        if status not in _ERRORS:
            raise ValueError(f"status must be one of {sorted(_ERRORS)}, got {status}")
        rule = Rule(
            method=method,
            key_contains=key_contains,
            key_suffix=key_suffix,
            status=status,
            times=times,
            per_key=per_key,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def injected(self, rule: Rule) -> int:
        with self._lock:
            return rule.injected

    def reset(self) -> None:
        """Drop every rule and the log (the fixture does this between tests)."""
        with self._lock:
            self._rules.clear()
            self._log.clear()

    def requests(self, method: str | None = None, key_contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self._log if (method is None or r.method == method) and key_contains in r.key]

    def _decide(self, method: str, key: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, key) and rule.take(key):
                    return rule
        return None

    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The whole request body, whatever its framing: always read it, so that a keep-alive
    connection stays in step even when the answer is an injected error."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers (aws-chunked checksums travel inside the body, not here) end with a blank line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()  # the CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1: clients keep connections alive (and botocore may send Expect: 100-continue,
        # which BaseHTTPRequestHandler answers by itself under 1.1).
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # the proxy's own log is proxy.requests(); stderr noise helps nobody

        def _handle(self) -> None:
            target = urlsplit(self.path)
            key = unquote(target.path).lstrip("/")
            body = _read_body(self)
            rule = proxy._decide(self.command, key)
            if rule is not None:
                status = rule.status
                self._send_error(status, key)
            else:
                status = self._forward(body)
            proxy._record(
                Request(self.command, key, target.query, status, rule is not None, time.monotonic())
            )

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        def _send_error(self, status: int, key: str) -> None:
            code, message = _ERRORS[status]
            request_id = uuid.uuid4().hex[:16].upper()
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<Resource>/{key}</Resource><RequestId>{request_id}</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-amz-request-id", request_id)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only, even for errors
                self.wfile.write(payload)

        def _forward(self, body: bytes) -> int:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                # skip_host / skip_accept_encoding: the client's own headers go out unchanged, Host
                # above all, because the SigV4 signature covers it.
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        conn.putheader(name, value)
                if body or "Content-Length" in self.headers or self.command in ("PUT", "POST"):
                    # The body was de-chunked on the way in; a length frames it for the upstream.
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                response = conn.getresponse()
                data = response.read()  # http.client knows a HEAD answer has no body
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                # A HEAD answer keeps the object's length; anything else gets its actual body's.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return response.status
            finally:
                conn.close()

    return Handler
