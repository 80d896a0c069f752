"""Shared fixtures."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class S3Server:
    """A running S3-protocol server (moto) on loopback."""

    endpoint_url: str


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode: a real HTTP S3 endpoint, so s3fs, pyarrow and subprocesses (Ray workers
    included) talk to it exactly as they would to AWS. Bound to 127.0.0.1 only, never 0.0.0.0."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_loopback_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the standard AWS environment at the moto server and yield a fresh, empty bucket.

    Set through the environment (not passed around) so that code under test resolves the endpoint
    the way it will in production, and subprocesses started afterwards inherit it.
    """
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    # s3fs shares filesystem instances (and their listing caches) across calls with equal
    # arguments; the environment is not part of that key, so start each test from a clean slate.
    s3fs.S3FileSystem.clear_instance_cache()

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket=bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()


@dataclass(frozen=True)
class BrowserPage:
    """What headless Chromium made of a local HTML file."""

    dom: str  # the DOM after the load event (scripts run)
    screenshot: Path  # PNG of the page at 1280 x 4000


@pytest.fixture
def headless_chromium(tmp_path_factory: pytest.TempPathFactory):
    """``load(html_file) -> BrowserPage``. Without Chromium: skip, except under CI, which installs it
    (.ci/run), so that a browser check never silently stops running there."""
    import os
    import shutil
    import subprocess

    exe = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI installs it (.ci/run) for the report's browser test")
        pytest.skip("chromium is not installed (apt-get install chromium)")

    def run(page: Path, *flags: str) -> str:
        # A fresh profile per run, and everything that would reach the network off: the page must
        # render from the file alone.
        profile = tmp_path_factory.mktemp("chromium-profile")
        result = subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *flags,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    def load(page: Path) -> BrowserPage:
        shot = tmp_path_factory.mktemp("chromium-shot") / "page.png"
        dom = run(page, "--dump-dom")
        run(page, f"--screenshot={shot}", "--window-size=1280,4000")
        assert shot.is_file(), "chromium wrote no screenshot"
        return BrowserPage(dom=dom, screenshot=shot)

    return load
