"""Ray job entrypoint: the teacher stage only (`muki-ray predict-teachers`) on the job's cluster."""

from __future__ import annotations

import sys

from muki_ray.run.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("predict-teachers", sys.argv[1:]))
