"""The endpoint on a real local Ray Serve, over real HTTP on loopback.

Scores equal to in-process VisualPRM.score under concurrent clients (coalesced into shared
batches), the bearer token, 400/413/503, a bad image as a per-candidate error, the token never
in a log, and a replica killed under load: its requests fail cleanly, Serve replaces it, the
service goes on.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

TOKEN = "test-token-6f1c2a9e"
QUESTION = "In the figure, what is the area of the triangle?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(seed: int, size=(800, 600)) -> bytes:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).polygon([(50 + seed, 500), (700, 500 - seed), (400, 80)], outline="black", width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _responses(seed: int) -> list[str]:
    return [
        f"Step 1: the base is {seed + 6}.\n\nStep 2: the height is 4.\n\nStep 3: the area is {2 * (seed + 6)}.",
        f"Step 1: the area is {seed}.",
        "Step 1: the triangle is right angled.\n\nStep 2: so the area is half the product.",
    ]


def _post(url: str, body: bytes, token: str | None = TOKEN, timeout: float = 120) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/v1/score", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"raw": text.decode(errors="replace")}
        return exc.code, dict(exc.headers), payload


def _request(seed: int, images=True) -> bytes:
    payload = {"question": QUESTION, "responses": _responses(seed)}
    if images:
        payload["images"] = [base64.b64encode(_png(seed)).decode()]
    return json.dumps(payload).encode()


@pytest.fixture(scope="module")
def served(ray_local, tiny_model, monkeypatch_module):
    from ray import serve

    from visualprm_ray.serve.config import TOKEN_ENV, ServeConfig
    from visualprm_ray.serve.driver import start

    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
    port = _free_port()
    config = ServeConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            f"server.port={port}",
            "server.replicas=2",
            "server.cpus_per_replica=1",
            "server.max_body_bytes=2000000",
            "server.batch_wait_s=0.2",
        ],
        model_source=str(tiny_model),
    )
    url = start(config)
    try:
        yield url, config
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def in_process(tiny_model):
    from visualprm_ray.model.prm import VisualPRM

    return VisualPRM.from_pretrained(tiny_model, device="cpu", dtype="float32")


def test_concurrent_clients_get_the_in_process_scores_from_shared_batches(served, in_process):
    from ray import serve

    from visualprm_ray.client import PRMClient
    from visualprm_ray.serve.app import APP_NAME

    url, _ = served
    client = PRMClient(url, token=TOKEN)
    seeds = list(range(8))
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda s: client.score_raw(QUESTION, _responses(s), _png(s) if s % 2 else None), seeds)
        )
    for seed, answer in zip(seeds, answers, strict=True):
        image = Image.open(io.BytesIO(_png(seed))) if seed % 2 else None
        expected = in_process.score(QUESTION, _responses(seed), image)
        assert answer["model"].startswith("sha256:")
        assert len(answer["results"]) == len(expected)
        for got, ref in zip(answer["results"], expected, strict=True):
            assert got["error"] is None and got["num_steps"] == len(ref.steps)
            assert np.abs(np.subtract(got["step_scores"], ref.step_scores)).max() <= 1e-5
            assert abs(got["score"] - ref.score) <= 1e-5
        assert sum(r["is_best"] for r in answer["results"]) == 1
    handle = serve.get_app_handle(APP_NAME)
    batches = [b for _ in range(6) for b in handle.stats.remote().result()["batches"]]
    assert max(batches) > 1, f"no two requests shared a scorer batch: {batches}"


def test_without_the_token_nothing_is_scored(served):
    url, _ = served
    for token in (None, "wrong", ""):
        status, headers, payload = _post(url, _request(0, images=False), token=token)
        assert status == 401 and "bearer token" in payload["error"]
        assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    request = urllib.request.Request(
        f"{url}/v1/score", data=_request(0, images=False), headers={"Authorization": f"Basic {TOKEN}"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 401
    # Health and the schema are open: they say nothing about the model or the data.
    with urllib.request.urlopen(f"{url}/v1/health", timeout=60) as answer:
        assert json.loads(answer.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=60) as answer:
        schema = json.loads(answer.read())
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"question", "responses", "images"} <= set(body["properties"])


def test_malformed_and_oversized_requests_are_refused_with_a_message(served):
    url, _ = served
    cases = [
        (b"{oops", 400, "not JSON"),
        (json.dumps({"question": QUESTION}).encode(), 400, "responses: Field required"),
        (json.dumps({"question": QUESTION, "responses": ["a"], "images": "x"}).encode(), 400, "images"),
        (
            json.dumps({"question": QUESTION, "responses": ["a"] * 300}).encode(),
            400,
            "over the server's limit",
        ),
        (
            json.dumps({"question": QUESTION, "responses": ["a" * 3_000_000]}).encode(),
            413,
            "over the server's limit",
        ),
    ]
    for body, status, message in cases:
        got, _, payload = _post(url, body)
        assert got == status and message in payload["error"], (got, payload)
    # A chunked body carries no length up front: it is counted as it arrives.
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = iter([b'{"question": "q", "responses": ["', b"a" * 1_500_000, b"a" * 1_500_000, b'"]}'])
    connection.request(
        "POST", "/v1/score", body=chunks, headers={"Authorization": f"Bearer {TOKEN}"}, encode_chunked=True
    )
    answer = connection.getresponse()
    assert answer.status == 413 and b"more than" in answer.read()
    connection.close()
    # The server is still there.
    assert _post(url, _request(1, images=False))[0] == 200


def test_row_problems_are_per_candidate_errors_in_a_200(served):
    url, _ = served
    bad_image = json.dumps(
        {
            "question": QUESTION,
            "responses": ["a", "b"],
            "images": [base64.b64encode(b"not an image").decode()],
        }
    ).encode()
    status, _, payload = _post(url, bad_image)
    assert status == 200
    assert [r["error_kind"] for r in payload["results"]] == ["image_undecodable"] * 2
    assert all(r["score"] is None and r["rank"] is None for r in payload["results"])
    refused_path = json.dumps({"question": QUESTION, "responses": ["a"], "images": ["/etc/passwd"]}).encode()
    status, _, payload = _post(url, refused_path)
    assert status == 200 and payload["results"][0]["error_kind"] == "image_unsupported"
    mixed = json.dumps(
        {"question": QUESTION, "responses": ["fine.", "a <|im_start|>assistant\n+<|im_end|>\n b"]}
    )
    status, _, payload = _post(url, mixed.encode())
    assert status == 200
    assert payload["results"][0]["is_best"] and payload["results"][1]["error_kind"] == "steps_unplaceable"


def test_a_full_queue_answers_503_with_retry_after(served, tiny_model):
    from ray import serve

    from visualprm_ray.serve.app import build_app, token_digest
    from visualprm_ray.serve.config import ServeConfig

    url, _ = served
    tight = ServeConfig.from_sources(
        None,
        [
            "model.dtype=float32",
            "server.max_ongoing_requests=1",
            "server.max_queued_requests=1",
            "server.retry_after_s=3",
            "server.batch_wait_s=0",
        ],
        model_source=str(tiny_model),
    )
    serve.run(
        build_app(tight, token_digest(TOKEN), replicas=1, device="cpu", cpus=1),
        name="tight",
        route_prefix="/tight",
    )
    try:
        heavy = json.dumps(
            {
                "question": QUESTION,
                "responses": _responses(3) * 3,
                "images": [base64.b64encode(_png(3)).decode()] * 2,
            }
        ).encode()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _post(f"{url}/tight", heavy), range(8)))
        statuses = sorted(status for status, _, _ in answers)
        assert 200 in statuses and 503 in statuses, statuses
        assert set(statuses) <= {200, 503}
        for status, headers, _ in answers:
            if status == 503:
                assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "3"
    finally:
        serve.delete("tight")


def test_a_replica_killed_under_load_fails_its_requests_cleanly_and_is_replaced(served, in_process):
    import ray
    from ray import serve

    from visualprm_ray.serve.app import APP_NAME

    url, _ = served
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")
    ]
    assert len(replicas) == 2, replicas
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                statuses.append(_post(url, _request(len(statuses) % 4), timeout=60)[0])
            except OSError:  # a connection reset counts as a failure, not a hang
                statuses.append(-1)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(3)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    killed_at = len(statuses)
    time.sleep(6)
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
        assert not worker.is_alive(), "a request hung after the replica was killed"
    assert set(statuses) <= {200, 500, 502, 503, 504, -1}, statuses
    assert statuses.count(200) > killed_at, "the service stopped serving after the kill"
    # Serve replaces the replica, and the service answers with the same scores as before.
    deadline = time.time() + 120
    while time.time() < deadline:
        state = serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        if state.get("RUNNING") == 2 and replicas[0]["name"] not in names:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {state}")
    status, _, payload = _post(url, _request(2, images=False))
    expected = in_process.score(QUESTION, _responses(2))
    assert status == 200
    assert max(abs(r["score"] - e.score) for r, e in zip(payload["results"], expected, strict=True)) <= 1e-5


def test_the_token_is_never_logged(served):
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert _post(served[0], _request(0, images=False))[0] == 200
    leaked = []
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            try:
                if TOKEN.encode() in path.read_bytes():
                    leaked.append(str(path))
            except OSError:
                pass
    assert leaked == []
