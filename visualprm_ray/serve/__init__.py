"""Online scoring: the PRM behind a Ray Serve HTTP endpoint, for RL loops (``visualprm-ray serve``).

- :mod:`.config`: the server's settings (the job's model/images/scoring/storage sections + its own);
- :mod:`.core`: one replica's work without Serve: request shapes, image rules, prepare, results;
- :mod:`.batching`: concurrent requests coalesced into scorer batches under the token budget;
- :mod:`.app`: the Serve deployment (auth, limits, routes, backpressure);
- :mod:`.driver`: attach to Ray, deploy, keep serving.

The client is :mod:`visualprm_ray.client`.
"""

from __future__ import annotations

from visualprm_ray.serve.config import ServeConfig

__all__ = ["ServeConfig"]
