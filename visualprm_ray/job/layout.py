"""How the job sits on the cluster: how many scorers and preparers, and a CPU scorer's threads.

The driver decides once, from the config, what the cluster's nodes hold and the checkpoint's size
(:func:`plan_resources`). The decision itself is the pure function :func:`plan_layout`, so every
rule is tested without a cluster.

On GPUs there is one scorer per GPU. On CPUs the scorers are replicas of the model, each on a
share of a node's cores: as many as the node's cores and memory allow. Several single-threaded
replicas beat one replica with a thread per core wherever the model fits more than once: torch's
threads split each op of one forward and wait for each other at every op, while replicas share
nothing (2 cores, tiny checkpoint: the job's steady rate went from 18.0 rows/s with one 2-thread
replica to 22-27 rows/s with two 1-thread replicas, docs/PERFORMANCE.md). A checkpoint that fits
once per node gets one replica with every core, which is what large models need on CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig

# One preparer per this many scoring cores on CPU. Single-threaded, preparing a group cost about a
# quarter of scoring it with the tiny checkpoint (5.8 s vs 24.5 s for 96 groups), the cheapest
# scorer there is; with a real checkpoint scoring costs far more and the ratio only grows.
CORES_PER_PREPARER = 4
# A CPU replica's memory beyond its weights: activations and allocator slack grow with the weights
# (x1.5), and the process itself holds torch, transformers and the tokenizer (~1 GiB).
REPLICA_WEIGHT_FACTOR = 1.5
REPLICA_PROCESS_BYTES = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Resources:
    """How the job is laid out on the cluster, decided by the driver from the config and the cluster."""

    device: str
    num_scorers: int
    gpus_per_scorer: float
    num_preparers: int
    # Torch threads of each CPU scorer; None on GPU, where torch's default is left alone.
    cpu_threads_per_scorer: int | None = None
    # The pools may grow to these sizes as nodes join (runtime.max_scorers); at least their starting sizes.
    max_scorers: int | None = None
    max_preparers: int | None = None


@dataclass(frozen=True)
class Node:
    """A node that can run CPU work: its usable cores and Ray's schedulable memory (bytes)."""

    cores: int
    memory: float


@dataclass(frozen=True)
class Cluster:
    """What the layout needs to know about the cluster."""

    cpu_tokens: float  # Ray's logical CPUs over all nodes (a scheduling count, not cores)
    gpus: int
    nodes: list[Node]  # nodes with CPUs


def replica_bytes(parameters: int, dtype: str) -> int:
    """Memory one CPU scorer needs for a model of ``parameters`` weights in ``dtype`` (an estimate)."""
    return int(parameters * DTYPE_BYTES[dtype] * REPLICA_WEIGHT_FACTOR) + REPLICA_PROCESS_BYTES


def plan_layout(config: JobConfig, cluster: Cluster, parameters: int | None) -> Resources:
    """The job's layout; ``parameters`` is the checkpoint's weight count (None: unknown).

    Explicit ``runtime.num_scorers``, ``runtime.num_preparers`` and
    ``runtime.cpu_threads_per_scorer`` always win.
    """
    rt = config.runtime
    device = rt.device if rt.device != "auto" else ("cuda" if cluster.gpus else "cpu")
    if device == "cuda" and not cluster.gpus:
        raise RuntimeError("runtime.device is 'cuda' but the Ray cluster has no GPUs")
    threads = None
    if device == "cuda":
        num_scorers = rt.num_scorers or max(1, int(cluster.gpus / rt.gpus_per_scorer))
        # Preparing a group (tiling ~13 images' worth of pixels, tokenizing) costs a fraction of
        # scoring it on a GPU, so two preparers per scorer keep it fed.
        wanted_preparers = 2 * num_scorers
    else:
        cores = sum(n.cores for n in cluster.nodes) or 1
        wanted_preparers = max(1, math.ceil(cores / CORES_PER_PREPARER))
        num_scorers = rt.num_scorers or _cpu_replicas(
            config, cluster, parameters, rt.num_preparers or wanted_preparers
        )
        threads = rt.cpu_threads_per_scorer or _threads_per_replica(cluster, num_scorers)
    # Leave CPUs for the read tasks: actor pools holding every CPU starve them and the job hangs.
    spare = max(cluster.cpu_tokens - num_scorers * rt.cpus_per_scorer - 1, rt.cpus_per_preparer)
    num_preparers = rt.num_preparers or max(1, min(int(spare / rt.cpus_per_preparer), wanted_preparers))
    max_scorers = max(num_scorers, rt.max_scorers or num_scorers)
    return Resources(
        device=device,
        num_scorers=num_scorers,
        gpus_per_scorer=rt.gpus_per_scorer if device == "cuda" else 0,
        num_preparers=num_preparers,
        cpu_threads_per_scorer=threads,
        max_scorers=max_scorers,
        # Nodes that join bring CPUs too: preparers follow the scorers (two each), unless set.
        max_preparers=num_preparers if rt.num_preparers else max(num_preparers, 2 * max_scorers),
    )


def _cpu_replicas(config: JobConfig, cluster: Cluster, parameters: int | None, preparers: int) -> int:
    if parameters is None:
        return 1  # size unknown (a hub id): one replica, which has to fit anyway
    need = replica_bytes(parameters, config.model.dtype)
    fits = sum(min(n.cores, int(n.memory // need)) for n in cluster.nodes)
    rt = config.runtime
    # Every replica holds cpus_per_scorer of Ray's CPUs; the preparers and one CPU for the read
    # and write tasks must still be schedulable.
    tokens = int((cluster.cpu_tokens - preparers * rt.cpus_per_preparer - 1) // rt.cpus_per_scorer)
    return max(1, min(fits, tokens))


def _threads_per_replica(cluster: Cluster, num_scorers: int) -> int:
    if not cluster.nodes:
        return 1
    # Ray spreads the replicas over the nodes; size for the busiest share on the smallest node.
    per_node = math.ceil(num_scorers / len(cluster.nodes))
    return max(1, min(n.cores for n in cluster.nodes) // per_node)


# -- what the driver reads to decide ---------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the platform tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cluster_view() -> Cluster:
    """The connected Ray cluster as :func:`plan_layout` sees it."""
    import ray

    total = ray.cluster_resources()
    here = ray.get_runtime_context().get_node_id()
    nodes = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        cpus = int(resources.get("CPU", 0))
        if not node.get("Alive") or cpus <= 0:
            continue
        if node.get("NodeID") == here:
            # A local Ray started by the driver declares more CPUs than cores, as headroom for the
            # read and write tasks (init_ray); the replicas are sized on the real cores.
            cpus = min(cpus, usable_cores())
        nodes.append(Node(cores=cpus, memory=float(resources.get("memory", 0))))
    return Cluster(cpu_tokens=float(total.get("CPU", 1)), gpus=int(total.get("GPU", 0)), nodes=nodes)


def model_parameters(config: JobConfig) -> int | None:
    """The checkpoint's weight count from its safetensors headers (a few KB read per file).

    None for a hub id, whose files are only fetched by the actors.
    """
    from pathlib import Path

    from visualprm_ray.model.checkpoint import parameter_count, safetensors_files
    from visualprm_ray.storage import fsspec_filesystem

    source = config.model.source
    if Path(source).is_dir():
        files = [str(p) for p in safetensors_files(Path(source))]
        fs, _ = fsspec_filesystem(files[0], config.storage)
    elif "://" in source:
        fs, root = fsspec_filesystem(source, config.storage)
        files = sorted(fs.glob(f"{root.rstrip('/')}/*.safetensors"))
    else:
        return None
    if not files:
        return None  # the actors' load reports the missing weights
    return parameter_count(lambda path, start, end: fs.cat_file(path, start=start, end=end), files)


def plan_resources(config: JobConfig) -> Resources:
    """The layout for the connected cluster (see :func:`plan_layout`)."""
    cluster = cluster_view()
    device_is_cpu = config.runtime.device == "cpu" or (config.runtime.device == "auto" and not cluster.gpus)
    # The checkpoint is only measured when its size can change the layout.
    needs_size = device_is_cpu and config.runtime.num_scorers is None
    return plan_layout(config, cluster, model_parameters(config) if needs_size else None)
