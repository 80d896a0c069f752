"""Entry point for `ray job submit`: the same job as `visualprm-ray score`, attached to the cluster.

    ray job submit --runtime-env cluster/runtime_env.yaml -- \
        python jobs/score_rollouts.py --config jobs/configs/cluster.yaml --set input.uri=s3://...

Inside a submitted job RAY_ADDRESS is set, so the job attaches to the cluster rather than
starting a local Ray.
"""

import sys

from visualprm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["score", *sys.argv[1:]]))
