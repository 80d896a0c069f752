"""The job's layout: scorer replicas, their threads and the preparers, for the clusters users run."""

from __future__ import annotations

import pytest

from visualprm_ray.job.config import JobConfig
from visualprm_ray.job.layout import Cluster, Node, model_parameters, plan_layout

GiB = 1 << 30
TINY = 240_000  # weights of a tiny test checkpoint
EIGHT_B = 8_100_000_000  # VisualPRM-8B


def config(*overrides: str, model: str = "/models/prm") -> JobConfig:
    return JobConfig.from_sources(
        None, list(overrides), input_uri="/in", output_uri="/out", model_source=model
    )


def one_node(cores: int, memory_gib: float, tokens: float | None = None) -> Cluster:
    return Cluster(cpu_tokens=tokens or cores, gpus=0, nodes=[Node(cores=cores, memory=memory_gib * GiB)])


def test_a_two_core_laptop_runs_two_single_threaded_replicas_and_one_preparer():
    # What init_ray starts on a 2-core machine: 4 of Ray's CPUs over 2 cores.
    layout = plan_layout(config("model.dtype=float32"), one_node(2, 16, tokens=4), TINY)
    assert (layout.device, layout.num_scorers, layout.cpu_threads_per_scorer, layout.num_preparers) == (
        "cpu",
        2,
        1,
        1,
    )
    assert layout.gpus_per_scorer == 0


def test_replicas_leave_ray_cpus_for_the_preparers_and_the_read_tasks():
    layout = plan_layout(config(), one_node(16, 64), TINY)
    # 16 CPUs: 4 preparers (one per 4 cores), 1 for the read and write tasks, 11 replicas.
    assert (layout.num_scorers, layout.num_preparers, layout.cpu_threads_per_scorer) == (11, 4, 1)
    assert layout.num_scorers * 1.0 + layout.num_preparers * 1.0 + 1 <= 16


def test_a_model_that_fits_once_gets_one_replica_with_every_core():
    # 8B in bfloat16 needs ~24 GiB with activations: once in 40 GiB.
    layout = plan_layout(config(), one_node(16, 40), EIGHT_B)
    assert (layout.num_scorers, layout.cpu_threads_per_scorer) == (1, 16)


def test_a_model_that_fits_twice_splits_the_cores():
    layout = plan_layout(config(), one_node(16, 64), EIGHT_B)
    assert (layout.num_scorers, layout.cpu_threads_per_scorer) == (2, 8)
    # float32 doubles the weights: once again.
    layout = plan_layout(config("model.dtype=float32"), one_node(16, 64), EIGHT_B)
    assert (layout.num_scorers, layout.cpu_threads_per_scorer) == (1, 16)


def test_a_model_of_unknown_size_gets_one_replica():
    layout = plan_layout(config(), one_node(8, 64), None)
    assert (layout.num_scorers, layout.cpu_threads_per_scorer) == (1, 8)


def test_replicas_spread_over_cpu_nodes():
    cluster = Cluster(cpu_tokens=32, gpus=0, nodes=[Node(8, 64 * GiB), Node(8, 64 * GiB), Node(16, 64 * GiB)])
    layout = plan_layout(config(), cluster, TINY)
    # 32 cores: 8 preparers, 1 CPU for tasks, 23 replicas; 8 per node fits the smallest node.
    assert (layout.num_scorers, layout.num_preparers, layout.cpu_threads_per_scorer) == (23, 8, 1)
    # 8B fits twice on each 64 GiB node: six replicas, two per node, 4 threads on the 8-core nodes.
    layout = plan_layout(config(), cluster, EIGHT_B)
    assert (layout.num_scorers, layout.cpu_threads_per_scorer) == (6, 4)


def test_explicit_settings_win():
    layout = plan_layout(
        config("runtime.num_scorers=3", "runtime.cpu_threads_per_scorer=5", "runtime.num_preparers=2"),
        one_node(16, 64),
        TINY,
    )
    assert (layout.num_scorers, layout.cpu_threads_per_scorer, layout.num_preparers) == (3, 5, 2)
    # A set scorer count splits the cores between the replicas.
    layout = plan_layout(config("runtime.num_scorers=4"), one_node(16, 64), TINY)
    assert (layout.num_scorers, layout.cpu_threads_per_scorer) == (4, 4)


def test_gpu_scorers_one_per_gpu_with_two_preparers_each():
    cluster = Cluster(cpu_tokens=64, gpus=8, nodes=[Node(64, 512 * GiB)])
    layout = plan_layout(config(), cluster, None)
    assert (layout.device, layout.num_scorers, layout.num_preparers) == ("cuda", 8, 16)
    assert layout.cpu_threads_per_scorer is None and layout.gpus_per_scorer == 1.0
    # Few CPUs: the preparers are capped so that the read tasks still get one.
    cluster = Cluster(cpu_tokens=12, gpus=8, nodes=[Node(12, 512 * GiB)])
    assert plan_layout(config(), cluster, None).num_preparers == 3


def test_pools_may_grow_to_max_scorers_with_preparers_in_step():
    cluster = Cluster(cpu_tokens=64, gpus=2, nodes=[Node(64, 512 * GiB)])
    fixed = plan_layout(config(), cluster, None)
    assert (fixed.num_scorers, fixed.max_scorers, fixed.num_preparers, fixed.max_preparers) == (2, 2, 4, 4)
    grows = plan_layout(config("runtime.max_scorers=6"), cluster, None)
    assert (grows.num_scorers, grows.max_scorers, grows.num_preparers, grows.max_preparers) == (2, 6, 4, 12)
    # A maximum below what the cluster holds at start does not shrink the pool; set preparers stay.
    small = plan_layout(config("runtime.max_scorers=1", "runtime.num_preparers=3"), cluster, None)
    assert (small.num_scorers, small.max_scorers, small.num_preparers, small.max_preparers) == (2, 2, 3, 3)


def test_cuda_without_gpus_is_refused():
    with pytest.raises(RuntimeError, match="no GPUs"):
        plan_layout(config("runtime.device=cuda"), one_node(8, 64), None)


def test_model_size_from_the_safetensors_headers(tmp_path):
    from safetensors import safe_open

    from visualprm_ray.model.checkpoint import safetensors_files
    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model")
    # The slow way: open every tensor.
    expected = 0
    for path in safetensors_files(model):
        with safe_open(path, framework="pt") as f:
            expected += sum(f.get_tensor(name).numel() for name in f.keys())  # noqa: SIM118 - safe_open is not iterable
    assert expected > 0
    assert model_parameters(config(model=str(model))) == expected
    assert model_parameters(config(model="OpenGVLab/VisualPRM-8B")) is None  # a hub id: not fetched


def test_model_size_on_object_storage_matches_the_local_count(tmp_path, s3_env):
    import s3fs

    from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model")
    fs = s3fs.S3FileSystem()
    fs.put(str(model) + "/", f"{s3_env}/models/tiny/", recursive=True)
    local = model_parameters(config(model=str(model)))
    assert model_parameters(config(model=f"s3://{s3_env}/models/tiny")) == local
    assert model_parameters(config(model=f"s3://{s3_env}/models/none")) is None
