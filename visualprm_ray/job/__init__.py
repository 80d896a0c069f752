"""The batch job around the PRM: Parquet in, Ray Data stages, Parquet out.

- ``config``: the pydantic job config (one YAML file, ``--set`` overrides);
- ``driver``: :func:`~visualprm_ray.job.driver.run_job`, top to bottom: output mode, counts,
  resume, the dataset, the count check, manifest and ``_SUCCESS``;
- ``pipeline``: the lazy composer of the stages (no I/O);
- ``stages/``: one file per stage, in data-flow order: read -> prepare -> score -> aggregate -> write;
- ``inputs``: the input files as the driver sees them (listing, schema, row groups, layout);
- ``counts``: candidates in and out, and the exactly-once check;
- ``resume``, ``journal``, ``layout``, ``progress``, ``faults``: what an interrupted run committed,
  the crash journal, how the job sits on the cluster, the progress line, test-only fault injection.
"""
