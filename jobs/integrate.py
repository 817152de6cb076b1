"""Ray job entrypoint: the whole `muki-ray run` pipeline, on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python jobs/integrate.py --config jobs/configs/smoke.yaml [--set key=value ...]

It joins the job's cluster with ray.init() (RAY_ADDRESS is set by the job supervisor) and never
starts a second local Ray. Same flags and exit codes as `muki-ray run`.
"""

from __future__ import annotations

import sys

from muki_ray.run.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("run", sys.argv[1:]))
