"""Ray job entrypoint: fine-tune the teachers only (`muki-ray prepare-teachers`) on the job's cluster."""

from __future__ import annotations

import sys

from muki_ray.run.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("prepare-teachers", sys.argv[1:]))
