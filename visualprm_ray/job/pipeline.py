"""The scoring job's dataset, composed lazily: read -> prepare -> score -> aggregate -> write.

:func:`build_dataset` only chains Ray Data operators (no I/O, no side effects); the driver
(:mod:`visualprm_ray.job.driver`) runs it into the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visualprm_ray.job.inputs import InputFile, ReadPlan
from visualprm_ray.job.layout import Resources
from visualprm_ray.job.stages.aggregate import aggregate
from visualprm_ray.job.stages.prepare import PrepareStage
from visualprm_ray.job.stages.read import read_groups
from visualprm_ray.job.stages.score import ScoreStage
from visualprm_ray.job.stages.write import ExplodeToCandidates

if TYPE_CHECKING:
    from visualprm_ray.job.config import JobConfig


def build_dataset(
    config: JobConfig,
    plan: ReadPlan,
    resources: Resources,
    files: list[InputFile],
    *,
    progress: str | None = None,
    journal: str | None = None,
    skip_ids=None,
):
    """The lazy dataset of output rows (candidate rows in the output schema).

    ``files`` are the input files with their row groups, from :func:`count_input`;
    ``journal`` names the crash journal actor (poison-row isolation, :mod:`visualprm_ray.job.journal`);
    ``skip_ids`` is an object-store reference to the ids already committed (resume).
    """
    from ray.data import ActorPoolStrategy

    from visualprm_ray.job import faults

    rt = config.runtime
    fault_env = faults.forwarded_env()
    rows = sum(sum(f.row_group_rows) for f in files)
    ds = read_groups(
        config, plan, files, rows_per_block=rows_per_block(config, plan, rows), skip_ids=skip_ids
    )
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs={"config": config, "model_dir": config.model.source, "progress": progress},
        compute=ActorPoolStrategy(min_size=1, max_size=resources.num_preparers),
        num_cpus=rt.cpus_per_preparer,
        batch_size=rt.groups_per_batch,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs={
            "config": config,
            "model_dir": config.model.source,
            "device": resources.device,
            "cpu_threads": resources.cpu_threads_per_scorer,
            "progress": progress,
            "journal": journal,
        },
        compute=ActorPoolStrategy(size=resources.num_scorers),
        num_cpus=rt.cpus_per_scorer,
        num_gpus=resources.gpus_per_scorer,
        batch_size=rt.groups_per_batch,
        batch_format="pyarrow",
        # A dead actor is restarted by Ray (max_restarts=-1 in Ray Data) and its batch retried.
        # Poison groups need up to max_crashes retries each before the journal records them,
        # on top of the retries kept for ordinary failures (a lost node, a preemption).
        max_task_retries=rt.max_task_retries + rt.groups_per_batch * rt.max_crashes_per_group,
        # Test-only fault injection travels to the actors only when the driver has it set.
        **({"runtime_env": {"env_vars": fault_env}} if fault_env else {}),
    )
    ds = ds.map_batches(aggregate, batch_format="pyarrow")
    # An instance (not the class): a plain function for Ray, fused into the write task.
    return ds.map_batches(ExplodeToCandidates(plan, config.output.include_response), batch_format="pyarrow")


# A block never holds more than this many batches' worth of groups: a stage hands a block on only
# once all of it is done, so bigger blocks add memory and latency and nothing else.
MAX_BATCHES_PER_BLOCK = 4
# Flat rows are candidates (regrouped by a shuffle afterwards): this many per group, roughly.
_FLAT_ROWS_PER_GROUP = 16


def rows_per_block(config: JobConfig, plan: ReadPlan, input_rows: int) -> int:
    """Input rows per block.

    One batch of groups by default: the first groups reach the scorer as soon as one batch is
    prepared, and a small input is still spread over every actor. ``input.num_blocks`` spreads
    the input over that many blocks instead, up to :data:`MAX_BATCHES_PER_BLOCK` batches each.
    """
    batch = config.runtime.groups_per_batch * (_FLAT_ROWS_PER_GROUP if plan.layout == "flat" else 1)
    if config.input.num_blocks is None:
        return batch
    return max(1, min(-(-input_rows // config.input.num_blocks), MAX_BATCHES_PER_BLOCK * batch))
