"""What the console shows, and the run log that keeps everything.

Console (stderr): muki-ray's own lines (a start and an end line per stage, the figures that matter,
warnings and errors) and a progress line per long stage. With --verbose, every other logger too
(Ray, Ray Data, transformers, Python warnings) and the Ray workers' output, as Ray prints it.

Run log (`RUN_DIR/logs/run-<timestamp>.log`, `open_run_log`): all of it, always: muki-ray at DEBUG,
the other loggers, warnings, the Ray workers' stdout/stderr and the cluster's error messages. What
comes before the checks pass is held in memory and written when the log opens, so a bad input
leaves the run directory untouched.

Handlers write to the sys.stderr of the moment, not the one of import time, so a caller that swaps
sys.stderr (a test capturing output, a job runner) never gets a handler on a closed stream.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import ray.data  # noqa: F401  (Ray Data sets up its loggers on import; configure() adjusts them after)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that print on their own (propagate=False): each gets the run log's handler itself.
SELF_PRINTING = ("ray", "ray.data", "ray.train", "transformers")
_state: dict = {"verbose": False, "file": None, "path": None, "pending": None}


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


class ConsoleFormat(logging.Formatter):
    """`HH:MM:SS message`; a warning or an error says so."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"


def verbose() -> bool:
    return _state["verbose"]


def configure(verbose: bool) -> None:
    """Our lines on the console at INFO; everything else only with --verbose (and in the run log)."""
    _state["verbose"] = verbose
    if _state.get("file") is not None:  # a previous command in this process (tests call main() often)
        _state["file"].close()
    _state.update(file=None, path=None, pending=Pending())
    _attach(_state["pending"])
    ours = logging.getLogger("muki_ray")
    if not any(isinstance(h, LiveStderr) for h in ours.handlers):
        handler = LiveStderr()
        handler.setFormatter(ConsoleFormat() if not verbose else logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        ours.addHandler(handler)
    for h in ours.handlers:
        if isinstance(h, LiveStderr):
            h.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.setLevel(logging.DEBUG)
    ours.propagate = True  # (caplog and other root handlers see our lines; the root's console skips them)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, (LiveStderr, logging.NullHandler)):
            root.removeHandler(h)
    if verbose:
        other = LiveStderr()
        other.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        other.addFilter(lambda r: not r.name.startswith("muki_ray"))  # ours has its own console handler
        root.addHandler(other)
    else:
        root.addHandler(logging.NullHandler())  # no handler at all would print warnings via lastResort
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings are log records: in the run log, on the console with --verbose
    for name in SELF_PRINTING:
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if _console_stream(h):
                h.setLevel(logging.INFO if verbose else logging.CRITICAL + 1)
    if not any(isinstance(h, LiveStderr) for h in logging.getLogger("ray.data").handlers):
        data_console = LiveStderr()  # Ray Data's console lines, which we route like the others
        data_console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        logging.getLogger("ray.data").addHandler(data_console)
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, LiveStderr):
            h.setLevel(logging.INFO if verbose else logging.CRITICAL + 1)
    ray.data.DataContext.get_current().enable_progress_bars = verbose  # ours replace them (progress.py)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_warning()
    if not verbose:
        hf_logging.disable_progress_bar()


def _console_stream(h: logging.Handler) -> bool:
    """A handler that prints to the terminal: not a file, and not a capture handler (pytest's
    caplog handlers are StreamHandlers too, and Ray copies the root's handlers onto its loggers)."""
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not type(h).__module__.startswith("_pytest"))


class Pending(logging.Handler):
    """Holds the records of a command's first moments (checks, Ray start-up) until the run log
    opens: a bad input must leave the run directory untouched, so nothing is written before."""

    def __init__(self, cap: int = 50_000):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.cap = cap

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.cap:
            self.records.append(record)


LOGGERS = ("", "muki_ray", "ray.workers", "ray.native", *SELF_PRINTING)  # every logger the run log listens to


def _once(record: logging.LogRecord) -> bool:
    """A record reaches the run log once, whether its logger propagates to the root or not."""
    if getattr(record, "_muki_logged", False):
        return False
    record._muki_logged = True
    return True


def _attach(handler: logging.Handler) -> None:
    handler.addFilter(_once)
    for name in LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, (Pending, logging.FileHandler)) and getattr(h, "_muki", False):
                lg.removeHandler(h)
        lg.addHandler(handler)
    handler._muki = True
    for name in ("ray.workers", "ray.native"):  # the run log only (the console: as Ray prints, with --verbose)
        logging.getLogger(name).propagate = False
        logging.getLogger(name).setLevel(logging.DEBUG)


def open_run_log(run_dir: Path) -> Path:
    """Start RUN_DIR/logs/run-<timestamp>.log with what was held so far; from here on it receives
    every logger, warnings and the Ray workers' output. Returns its path."""
    folder = Path(run_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    held = _state.get("pending")
    for record in (held.records if held else []):
        handler.handle(record)
    _attach(handler)
    _state.update(file=handler, pending=None, path=path)
    return path


def discard_run_log() -> None:
    """A bad input found after the log opened (a pool row, say): the run never started, so its log
    goes too and the run directory is left as it was."""
    handler, path = _state.get("file"), _state.get("path")
    pending = Pending()
    _attach(pending)  # detaches the file handler from every logger
    if handler is not None:
        handler.close()
    if path is not None:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # logs of earlier runs stay
            pass
    _state.update(file=None, path=None, pending=pending)


def run_log_path() -> Path | None:
    """The open run log, if any."""
    return _state.get("path")


def capture_ray_output() -> None:
    """Send the Ray workers' stdout/stderr and the cluster's error messages to the run log (and,
    with --verbose, to the console as Ray prints them). Uses Ray's driver-side log dispatcher, a
    private interface: if it moved, Ray keeps printing as it does by default."""
    try:
        import ray._private.worker as worker
    except ImportError:
        return
    original = getattr(worker, "_muki_print_to_stdstream", worker.print_to_stdstream)
    worker._muki_print_to_stdstream = original
    workers_log = logging.getLogger("ray.workers")  # the run log's handler (or the held records) is on it

    def to_log(data, ignore_prefix: bool = False) -> None:
        who = data.get("actor_name") or data.get("task_name") or data.get("pid")
        for line in data.get("lines", []):
            workers_log.log(logging.WARNING if data.get("is_err") else logging.INFO, "(%s pid=%s) %s", who,
                            data.get("pid"), line)
        if _state["verbose"]:
            original(data, ignore_prefix)

    dispatcher = getattr(worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or not hasattr(dispatcher, "remove_handler"):
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("muki_run_log")
    dispatcher.add_handler("muki_run_log", to_log)
    worker.print_to_stdstream = to_log  # the cluster's error messages (e.g. an actor it failed to kill)


class _HandlerlessRay(logging.Handler):
    """Python's last-resort handler while `ray.init` runs: Ray empties its own logger's handlers
    (configure_logging=False), so its start-up warnings (token authentication, say) would otherwise
    print raw. They go to the run log, and to the console only with --verbose."""

    def emit(self, record: logging.LogRecord) -> None:
        native = logging.getLogger("ray.native")
        if native.handlers:  # outside a run (a benchmark's own ray.init) nobody listens: dropped, not
            native.handle(record)  # handed back to this last resort (which would recurse)
        if _state["verbose"]:
            sys.stderr.write(self.format(record) + "\n")


@contextmanager
def ray_starting():
    """Wrap `ray.init`: what Ray logs while it starts reaches the run log, not the raw console,
    and afterwards Ray's logger gets the run log's handler back (ray.init removed it)."""
    previous = logging.lastResort
    logging.lastResort = _HandlerlessRay(logging.DEBUG)
    try:
        yield
    finally:
        logging.lastResort = previous
        current = _state.get("file") or _state.get("pending")
        if current is not None:
            _attach(current)
        if _state["verbose"] and not any(isinstance(h, LiveStderr) for h in logging.getLogger("ray").handlers):
            console = LiveStderr()
            console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
            logging.getLogger("ray").addHandler(console)


def capture_native_output() -> None:
    """Point this process's file descriptor 2 at the run log, so that what Ray's C++ core worker
    writes there (it bypasses Python) reaches the run log, and the console only with --verbose.
    Python's own console output keeps the real stderr (`sys.stderr` becomes a copy of it). Only
    for a process that owns its terminal (the CLI and job entry points), never inside a library
    caller or a test runner."""
    if _state.get("native"):
        return
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    native = logging.getLogger("ray.native")

    def copy() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="backslashreplace") as lines:
            for line in lines:
                native.info(line.rstrip("\n"))
                if _state["verbose"]:
                    sys.stderr.write(line)

    threading.Thread(target=copy, daemon=True, name="native stderr").start()
    _state["native"] = True
