"""The scoring job's dataset, composed lazily: read -> prepare -> score -> aggregate -> write.

:func:`build_dataset` only chains Ray Data operators (no I/O, no side effects); the driver
(:mod:`visualprm_ray.job.driver`) runs it into the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visualprm_ray.job.inputs import FileSkip, ReadPlan
from visualprm_ray.job.layout import Resources
from visualprm_ray.job.stages.aggregate import aggregate
from visualprm_ray.job.stages.prepare import PrepareStage
from visualprm_ray.job.stages.read import read_groups
from visualprm_ray.job.stages.score import ScoreStage
from visualprm_ray.job.stages.write import ExplodeToCandidates

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.model.source import ModelIdentity


def build_dataset(
    config: JobConfig,
    plan: ReadPlan,
    resources: Resources,
    *,
    model_identity: ModelIdentity | None = None,
    progress: str | None = None,
    journal: str | None = None,
    skip: dict[int, FileSkip] | None = None,
):
    """The lazy dataset of output rows (candidate rows in the output schema).

    ``model_identity`` pins the model: every actor refuses to load anything else;
    ``journal`` names the crash journal actor (poison-row isolation, :mod:`visualprm_ray.job.journal`);
    ``skip`` is what an earlier attempt committed, for the read to leave out (resume).
    """
    from ray.data import ActorPoolStrategy

    from visualprm_ray.job import faults

    rt = config.runtime
    fault_env = faults.forwarded_env()
    # Test-only fault injection travels to the actors only when the driver has it set.
    runtime_env = {"env_vars": fault_env} if fault_env else None
    pinned = model_identity.to_dict() if model_identity is not None else None
    ds = read_groups(config, plan, rows_per_block=rows_per_block(config, plan, plan.num_rows), skip=skip)
    # Ray Data restarts a dead actor and retries its batch without limit (max_restarts and
    # max_task_retries -1, its defaults for actor pools: a lost node or a preemption never fails
    # the job); the journal bounds what a poison group can cost (:mod:`visualprm_ray.job.journal`).
    # What both actor stages are built with: the model (pinned), the progress and journal actors.
    stage_kwargs = {
        "config": config,
        "model_dir": config.model.source,
        "model_identity": pinned,
        "progress": progress,
        "journal": journal,
    }
    common = {"batch_size": rt.groups_per_batch, "batch_format": "pyarrow", "runtime_env": runtime_env}
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs=stage_kwargs,
        compute=ActorPoolStrategy(min_size=1, max_size=resources.max_preparers or resources.num_preparers),
        num_cpus=rt.cpus_per_preparer,
        **common,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={
            **stage_kwargs,
            "device": resources.device,
            "cpu_threads": resources.cpu_threads_per_scorer,
        },
        # The pool starts at what the cluster holds (or runtime.num_scorers) and grows as nodes
        # join, up to max_scorers.
        compute=ActorPoolStrategy(
            min_size=resources.num_scorers, max_size=resources.max_scorers or resources.num_scorers
        ),
        num_cpus=rt.cpus_per_scorer,
        num_gpus=resources.gpus_per_scorer,
        **common,
    )
    ds = ds.map_batches(aggregate, batch_format="pyarrow")
    # An instance (not the class): a plain function for Ray, fused into the write task.
    return ds.map_batches(ExplodeToCandidates(plan, config.output.include_response), batch_format="pyarrow")


# A block never holds more than this many batches' worth of groups: a stage hands a block on only
# once all of it is done, so bigger blocks add memory and latency and nothing else.
MAX_BATCHES_PER_BLOCK = 4


def rows_per_block(config: JobConfig, plan: ReadPlan, input_rows: int) -> int:
    """Group rows per block (a flat input is read here as its regrouped group rows).

    One batch of groups by default: the first groups reach the scorer as soon as one batch is
    prepared, and a small input is still spread over every actor. ``input.num_blocks`` spreads
    the input over that many blocks instead, up to :data:`MAX_BATCHES_PER_BLOCK` batches each.
    """
    batch = config.runtime.groups_per_batch
    if config.input.num_blocks is None:
        return batch
    return max(1, min(-(-input_rows // config.input.num_blocks), MAX_BATCHES_PER_BLOCK * batch))
