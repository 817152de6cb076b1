"""What the console shows: muki-ray's own lines always; Ray Data's console lines only with --verbose.

Ray Data's logs still reach its session log file (/tmp/ray/session_*/logs/ray-data). Handlers here
write to the sys.stderr of the moment, not the one of import time, so a caller that swaps
sys.stderr (a test capturing output, a job runner) never gets a handler on a closed stream.
"""

from __future__ import annotations

import logging
import sys
import warnings

import ray.data  # noqa: F401  (Ray Data sets up its loggers on import; configure() adjusts them after)


class LiveStderr(logging.StreamHandler):
    """A StreamHandler bound to whatever sys.stderr is when a record is emitted."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the live stream wins
        pass


def configure(verbose: bool) -> None:
    """Our loggers at INFO (DEBUG with --verbose); Ray Data's console lines only with --verbose."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    ours = logging.getLogger("muki_ray")
    if not any(isinstance(h, LiveStderr) for h in ours.handlers):
        handler = LiveStderr()
        handler.setFormatter(fmt)
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    data = logging.getLogger("ray.data")
    for h in list(data.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            data.removeHandler(h)
    console = LiveStderr()
    console.setLevel(logging.INFO if verbose else logging.CRITICAL)
    console.setFormatter(fmt)
    data.addHandler(console)
    if not verbose:  # Ray Data's advice on concurrency and block counts, printed per dataset
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\.")
