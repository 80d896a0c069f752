"""A client of ``visualprm-ray serve``: sync (:class:`PRMClient`) and asyncio (:class:`AsyncPRMClient`).

Both send ``POST /v1/score`` with the bearer token (``token=`` or ``$VISUALPRM_SERVE_TOKEN``), retry a
503 (a full queue) after its ``Retry-After`` seconds, or a growing backoff, up to ``retries`` times,
and raise :class:`ScoreError` for any other non-200 answer, with the server's message. Images may be
``bytes``, PIL images or local files (sent as base64), or strings passed as they are (a base64
payload, or an ``s3://``/``gs://`` URI or a path the server reads itself). No Ray is needed, and the
sync client needs nothing beyond the standard library (the async one uses aiohttp).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKEN_ENV = "VISUALPRM_SERVE_TOKEN"


class ScoreError(RuntimeError):
    """The server answered something other than 200 (after the retries, for 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def encode_image(image: Any) -> str:
    """The wire form of an image: base64 of its bytes, or a string as it is."""
    if isinstance(image, str):
        return image
    if isinstance(image, Path):
        image = image.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if hasattr(image, "save"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    raise TypeError(f"an image is bytes, a PIL image, a Path or a string, not {type(image).__name__}")


def request_body(question: str, responses: Sequence[str | Sequence[str]], images: Any = None) -> bytes:
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    payload = {
        "question": question,
        "responses": [r if isinstance(r, str) else list(r) for r in responses],
        "images": [encode_image(i) for i in images],
    }
    return json.dumps(payload).encode()


def _retry_after(header: str | None, attempt: int, backoff: float) -> float:
    try:
        return max(0.0, float(header)) if header is not None else backoff * 2**attempt
    except ValueError:
        return backoff * 2**attempt


class PRMClient:
    """``PRMClient("http://127.0.0.1:8000").score(question, responses, images)`` -> per-candidate results."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}

    def score_raw(self, question: str, responses: Sequence[str | Sequence[str]], images: Any = None) -> dict:
        """The server's whole answer: ``{"model": ..., "results": [...]}``."""
        import urllib.error
        import urllib.request

        body = request_body(question, responses, images)
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(f"{self.url}/v1/score", data=body, headers=self._headers())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                if exc.code == 503 and attempt < self.retries:
                    time.sleep(_retry_after(exc.headers.get("Retry-After"), attempt, self.backoff))
                    continue
                raise ScoreError(exc.code, _message(text)) from None
        raise AssertionError("unreachable")

    def score(
        self, question: str, responses: Sequence[str | Sequence[str]], images: Any = None
    ) -> list[dict]:
        """Per-candidate results in input order (``step_scores``, ``score``, ``rank``, ``error``...)."""
        return self.score_raw(question, responses, images)["results"]

    def health(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/v1/health", timeout=self.timeout) as answer:
                return answer.status == 200
        except OSError:
            return False


class AsyncPRMClient(PRMClient):
    """The same over aiohttp: ``await client.score(...)``; many requests in flight from one loop."""

    async def score_raw(
        self, question: str, responses: Sequence[str | Sequence[str]], images: Any = None
    ) -> dict:
        import asyncio

        import aiohttp

        body = request_body(question, responses, images)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(self.retries + 1):
                async with session.post(f"{self.url}/v1/score", data=body, headers=self._headers()) as answer:
                    if answer.status == 200:
                        return json.loads(await answer.text())
                    text = await answer.text()
                    if answer.status == 503 and attempt < self.retries:
                        await asyncio.sleep(
                            _retry_after(answer.headers.get("Retry-After"), attempt, self.backoff)
                        )
                        continue
                    raise ScoreError(answer.status, _message(text))
        raise AssertionError("unreachable")

    async def score(
        self, question: str, responses: Sequence[str | Sequence[str]], images: Any = None
    ) -> list[dict]:
        return (await self.score_raw(question, responses, images))["results"]

    async def health(self) -> bool:
        import aiohttp

        try:
            async with aiohttp.ClientSession() as session, session.get(f"{self.url}/v1/health") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text[:500]
