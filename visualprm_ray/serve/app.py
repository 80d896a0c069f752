"""The Ray Serve application: a FastAPI ingress in front of one model replica per GPU (or CPU).

Per request, in order: the bearer token (401), the body size (413, read in chunks so an oversized
body is never held whole), the JSON and its shape (400), then preparation on a small thread pool
(image decoding, tiling, tokens) and scoring through the replica's :class:`~.batching.Coalescer`
on its one model thread. Ray Serve's router queues what the replicas cannot hold
(``max_ongoing_requests``) up to ``max_queued_requests``, past which it answers 503 with
``Retry-After`` (its ``BackpressureConfig``): latency stays bounded instead of growing without end.
A row-level problem is a 200 with per-candidate errors; an exception that is a bug of ours is a 500
for that request only, and the replica goes on.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations (the
# ``Request`` parameter) at definition time, from inside build_app.
import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any

from visualprm_ray.serve.core import ScoreRequest, ScoreResponse

if TYPE_CHECKING:
    from visualprm_ray.serve.config import ServeConfig

APP_NAME = "visualprm"


def token_digest(token: str) -> str:
    """What a replica holds instead of the token itself (it never leaves the driver)."""
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(header: str | None, digest: str) -> bool:
    """Whether an ``Authorization`` header carries the token, compared in constant time."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    return hmac.compare_digest(token_digest(presented.strip()), digest)


class BodyTooLarge(ValueError):
    pass


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused as soon as it is known to pass ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"the body has {length} bytes, over the server's limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"the body has more than {limit} bytes, the server's limit")
        chunks.append(chunk)
    return b"".join(chunks)


def placement(config: "ServeConfig") -> tuple[int, str, float]:
    """Replicas, their device and CPUs each: one replica per GPU of the cluster with a CPU each, or
    one CPU replica holding the cluster's CPUs; what the config sets wins. Ray is asked only for
    what the config leaves open."""
    server = config.server
    if server.device != "cpu" and (server.device == "auto" or server.replicas is None):
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
    else:
        gpus = 0
    device = server.device if server.device != "auto" else ("cuda" if gpus else "cpu")
    replicas = server.replicas or (max(gpus, 1) if device == "cuda" else 1)
    cpus = server.cpus_per_replica
    if cpus is None:
        if device == "cuda":
            cpus = 1.0
        else:
            import ray

            cpus = max(1.0, float(int(ray.cluster_resources().get("CPU", 1)) // replicas))
    return replicas, device, cpus


def app_builder(args: dict) -> Any:
    """The entry of a Serve config file (a RayService's ``serveConfigV2``):
    ``import_path: visualprm_ray.serve.app:app_builder`` with ``args`` ``model`` (the checkpoint),
    optional ``config`` (a server config YAML) and ``set`` (a list of ``KEY=VALUE``). There the
    HTTP host and port are the Serve config's ``http_options``; ``server.host``/``port`` are unused.
    """
    from visualprm_ray.serve.config import ServeConfig, load_token

    unknown = set(args) - {"model", "config", "set"}
    if unknown:
        raise ValueError(f"unknown app_builder args {sorted(unknown)}: expected model, config, set")
    config = ServeConfig.from_sources(
        args.get("config"), list(args.get("set") or []), model_source=args.get("model")
    )
    replicas, device, cpus = placement(config)
    return build_app(config, token_digest(load_token(config)), replicas=replicas, device=device, cpus=cpus)


def build_app(config: "ServeConfig", digest: str, *, replicas: int, device: str, cpus: float = 1.0):
    """The bound application ``serve.run`` deploys."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve
    from ray.serve.config import BackpressureConfig

    import visualprm_ray

    api = FastAPI(
        title="visualprm-ray",
        version=visualprm_ray.__version__,
        description="VisualPRM step scores for a question's candidate responses. Every /v1/score request "
        "needs `Authorization: Bearer <token>`.",
    )
    request_schema = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}},
        },
        "responses": {
            "400": {"description": "Not a valid scoring request (the message says why)."},
            "401": {"description": "No or a wrong bearer token."},
            "413": {"description": "The body is over the server's size limit."},
            "503": {"description": "The queue is full: retry after the Retry-After header's seconds."},
        },
    }

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    class PRMServer:
        def __init__(self, config_data: dict, digest: str, device: str, cpus: float) -> None:
            from concurrent.futures import ThreadPoolExecutor

            from visualprm_ray.serve.batching import Coalescer
            from visualprm_ray.serve.config import ServeConfig
            from visualprm_ray.serve.core import ReplicaScorer

            config = ServeConfig.model_validate(config_data)
            self._server = config.server
            self._digest = digest
            # One thread owns the model (loads it, runs every batch); preparation runs beside it.
            self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="visualprm-model")
            self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="visualprm-prepare")
            if device == "cpu":
                import torch

                threads = max(1, int(cpus))
                self._model_thread.submit(torch.set_num_threads, threads).result()
            self._scorer = self._model_thread.submit(ReplicaScorer, config, device).result()
            self._busy = {"prepare": 0.0, "score": 0.0}  # seconds, for stats()
            self._coalescer = Coalescer(
                self._timed_score,
                size=lambda prepared: prepared.tokens,
                budget=config.scoring.token_budget,
                wait_s=config.server.batch_wait_s,
                executor=self._model_thread,
            )

        def _timed_score(self, batch: list) -> list:
            start = time.perf_counter()
            try:
                return self._scorer.score(batch)
            finally:
                self._busy["score"] += time.perf_counter() - start

        def stats(self) -> dict:
            """The latest scorer batches' sizes (requests each) and the seconds spent preparing and
            scoring: through a Serve handle (``serve.get_app_handle(APP_NAME).stats``), not HTTP."""
            return {"batches": list(self._coalescer.batches), "busy_s": dict(self._busy)}

        @api.get("/v1/health")
        async def health(self) -> dict:
            return {"status": "ok"}

        @api.post("/v1/score", response_model=ScoreResponse, openapi_extra=request_schema)
        async def score(self, request: Request) -> Any:
            import asyncio

            from visualprm_ray.serve.core import BadRequest, parse_request

            if not authorized(request.headers.get("authorization"), self._digest):
                challenge = {"WWW-Authenticate": "Bearer"}
                return error(401, "a bearer token is required: Authorization: Bearer <token>", challenge)
            try:
                body = await read_body(request, self._server.max_body_bytes)
                parsed = parse_request(
                    body, max_candidates=self._server.max_candidates, max_images=self._server.max_images
                )
            except BodyTooLarge as exc:
                return error(413, str(exc))
            except BadRequest as exc:
                return error(400, str(exc))
            loop = asyncio.get_running_loop()
            start = time.perf_counter()
            prepared = await loop.run_in_executor(self._prepare_pool, self._scorer.prepare, parsed)
            self._busy["prepare"] += time.perf_counter() - start
            scores = await self._coalescer.submit(prepared) if prepared.needs_scoring else None
            return self._scorer.response(prepared, scores).model_dump()

    server = config.server
    deployment = serve.deployment(
        serve.ingress(api)(PRMServer),
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": 1 if device == "cuda" else 0},
        max_ongoing_requests=server.max_ongoing_requests,
        max_queued_requests=server.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=server.retry_after_s),
    )
    return deployment.bind(config.model_dump(mode="json"), digest, device, cpus)
