"""Running it: the stages in order (`pipeline`), the run report (`report`), the `muki-ray` command
(`cli.entry`) and the Ray job entry point (`jobs.job_main`).
"""
