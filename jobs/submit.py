"""Submit the scoring job to a Ray cluster with `ray job submit` semantics, idempotently.

    python jobs/submit.py --address http://head:8265 --name nightly [--date 2026-11-28] \\
        [--runtime-env cluster/runtime_env.yaml] -- --config jobs/configs/cluster.yaml --set ...

The submission id is derived from the name and the run date (``visualprm-<name>-<date>``), so a
scheduler that fires twice, or an operator who resubmits, does not start a second copy: an
existing pending, running or succeeded submission is waited for instead. Only a failed or stopped
one is submitted again, as ``...-r1``, ``...-r2``; the job itself resumes from its output
(a finished output is a no-op; an unfinished one keeps its committed groups and scores the rest).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ENTRYPOINT = "python jobs/score_rollouts.py"


def submission_id(name: str, date: str, attempt: int) -> str:
    base = f"visualprm-{name}-{date}"
    return base if attempt == 0 else f"{base}-r{attempt}"


def _submit_with_retry(client, *, attempts: int = 30, **kwargs) -> None:
    """Submit, retrying while a freshly started head has no job agent yet (it answers 500 then)."""
    for attempt in range(attempts):
        try:
            client.submit_job(**kwargs)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    parser.add_argument("--name", default="score", help="job name, part of the submission id")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="run date (default today)")
    parser.add_argument("--runtime-env", type=Path, default=None, help="runtime env YAML for the job")
    parser.add_argument("--no-wait", action="store_true", help="return after submitting")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for the job")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the `visualprm-ray score` flags")
    args = parser.parse_args(argv)

    import shlex

    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    client = JobSubmissionClient(args.address)
    existing = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
    attempt = 0
    while True:
        sid = submission_id(args.name, args.date, attempt)
        job = existing.get(sid)
        if job is None:
            runtime_env = yaml.safe_load(args.runtime_env.read_text()) if args.runtime_env else None
            entrypoint = " ".join([ENTRYPOINT, *(shlex.quote(a) for a in job_args)])
            _submit_with_retry(client, entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env)
            print(f"submitted {sid}")
            break
        if job.status in (JobStatus.FAILED, JobStatus.STOPPED):
            attempt += 1
            continue
        print(f"{sid} already exists ({job.status}): waiting for it instead of submitting again")
        break
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(sid)
        if status.is_terminal():
            print(f"{sid}: {status}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)
    print(f"{sid}: still running after {args.timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
