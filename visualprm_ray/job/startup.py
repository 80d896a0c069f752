"""An actor's start-up (model download, device init), with backoff between failed attempts.

Ray Data replaces an actor whose constructor raises (``runtime.max_actor_start_failures`` in a row
end the job, naming the last error: see the driver). Replacing it at once would hammer a throttled
object store or a flapping device, so a failed start waits before it gives up the actor: the wait
doubles with each failure in a row on this node (counted in a small file, since the failed actor's
memory goes with it), with jitter, up to :data:`MAX_WAIT_S`, and a start that succeeds resets it.
A model that is not the one the job is pinned to fails at once: waiting cannot change that.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 30.0


def _counter(stage: str) -> Path:
    return Path(tempfile.gettempdir()) / f"visualprm-ray-start-failures-{stage}-{os.getuid()}"


def failures_in_a_row(stage: str) -> int:
    try:
        return int(_counter(stage).read_text() or 0)
    except (OSError, ValueError):
        return 0


def start(stage: str, load: Callable[[], T]) -> T:
    """``load()``; on failure, wait out this node's backoff for ``stage``, then re-raise."""
    from visualprm_ray.model.source import ModelIdentityError

    try:
        result = load()
    except ModelIdentityError:
        raise
    except Exception:
        failures = failures_in_a_row(stage)
        with contextlib.suppress(OSError):
            _counter(stage).write_text(str(failures + 1))
        time.sleep(min(MAX_WAIT_S, FIRST_WAIT_S * 2**failures) * random.uniform(0.5, 1.5))
        raise
    if failures_in_a_row(stage):
        with contextlib.suppress(OSError):
            _counter(stage).unlink()
    return result
