"""``visualprm-ray serve``: attach to (or start) Ray, deploy the application, keep it up.

The replicas are sized from the cluster: one per GPU (bf16 as configured) where it has GPUs, one
CPU replica otherwise, unless ``server.replicas`` says. The bearer token is read here, on the
driver, and only its digest travels to the replicas.
"""

from __future__ import annotations

import os

from visualprm_ray.serve.config import ServeConfig, ServeSetupError, load_token

__all__ = ["ServeSetupError", "run_serve", "start"]


def start(config: ServeConfig) -> str:
    """Deploy the endpoint (waiting until its replicas are up) and return its URL."""
    import ray
    from ray import serve

    from visualprm_ray.serve.app import APP_NAME, build_app, placement, token_digest

    digest = token_digest(load_token(config))  # before anything starts: no token, no server
    server = config.server
    if not ray.is_initialized():
        address = server.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address) if address else ray.init()
    replicas, device, cpus = placement(config)
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(
        build_app(config, digest, replicas=replicas, device=device, cpus=cpus),
        name=APP_NAME,
        route_prefix="/",
    )
    return f"http://{server.host}:{server.port}"


def run_serve(config: ServeConfig) -> None:
    """Start the endpoint and serve until interrupted (Ctrl-C or SIGTERM), then take it down."""
    import signal
    import threading

    from ray import serve

    url = start(config)
    print(f"visualprm-ray serve: {url}/v1/score (OpenAPI: {url}/openapi.json); Ctrl-C stops it", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
