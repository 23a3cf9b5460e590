"""Where an actor's output goes.

Quiet mode (`trainer.log_level=info`, the default): everything a process writes to stdout and
stderr (vLLM, DeepSpeed, transformers, native code) goes to `{run dir}/logs/{actor}.log`; log
records at WARNING and above still reach the console, through the actor's original stderr that
Ray forwards to the driver, prefixed `(rollout-0 pid=...)` by Ray. Warnings known to be false
alarms or expected notices (`FALSE_ALARMS`) are kept out of the console (they stay in the file).
Verbose mode (`trainer.log_level=debug`): nothing is redirected.
"""

from __future__ import annotations

import logging
import os
import sys

FALSE_ALARMS = (
    # every in-place weight reload: modules without weights (rotary embeddings, norms) are
    # reported as failed, although the reload loads every weight there is (tests/actors check it)
    "Failed to load weights",
    # the CPU backend pins its threads once; later set_num_threads calls are skipped, as they should
    "doesn't allow to use `torch.set_num_threads`",
    # vLLM's start-up notices about choices calibrl makes on purpose (eager mode, a seeded
    # in-process engine) or about the CPU build (no Triton, no tcmalloc/iomp preload)
    "Enforce eager set", "Inductor compilation was disabled", "The global random seed is set to",
    "Triton is installed, but doesn't include CPU backend", "Triton is not installed",
    "Model Runner V2 requires Triton", "Reset SSM cache type", "is not found in LD_PRELOAD",
)
"""Warnings kept out of the console (they stay in the actor's log file)."""
try:
    from ray._private.ray_constants import LOG_PREFIX_ACTOR_NAME as ACTOR_NAME_TOKEN
except ImportError:  # the value of every Ray release so far
    ACTOR_NAME_TOKEN = ":actor_name:"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Console(logging.Handler):
    """WARNING and above, minus the false alarms, to the console stream."""

    def __init__(self, stream):
        super().__init__(logging.WARNING)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if any(alarm in message for alarm in FALSE_ALARMS):
                return
            self.stream.write(f"{record.levelname} {record.name}: {message.splitlines()[0]}\n")
            self.stream.flush()
        except (OSError, ValueError):  # logging must never take an actor down
            self.handleError(record)


_console: _Console | None = None


def capture_output(name: str, log_dir: str | None) -> str | None:
    """Redirect this process's stdout/stderr to `{log_dir}/{name}.log` (appending) and keep warnings
    and errors on the console. Call first thing in an actor's `__init__`; `log_dir=None` (verbose
    mode) leaves everything as it is. Returns the log file's path."""
    global _console
    if log_dir is None or _console is not None:
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{name}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1)
    # Ray's log monitor prefixes a stream's lines with the name announced last on it; Ray announces
    # the actor's repr on stdout/stderr after __init__, which now go to the file: announce it here
    console.write(f"{ACTOR_NAME_TOKEN}{name}\n")
    log = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # vLLM then logs through the root logger instead of its own handler (same file, and the console
    # handler sees its warnings); subprocesses inherit both the variable and the redirected fds
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    file_handler = logging.StreamHandler(log)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    _console = _Console(console)
    root.addHandler(file_handler)
    root.addHandler(_console)
    return path


def forward_warnings(*logger_names: str) -> None:
    """Also send the warnings of loggers that do not propagate to the root (DeepSpeed's) to the
    console. A no-op outside quiet mode."""
    if _console is None:
        return
    for n in logger_names:
        logger = logging.getLogger(n)
        if _console not in logger.handlers:
            logger.addHandler(_console)


def actor_log_dir(cfg) -> str | None:
    """The directory actors write their output to under `cfg`, or None in verbose mode."""
    if cfg.trainer.log_level == "debug":
        return None
    return os.path.abspath(os.path.join(cfg.trainer.output_dir, "logs"))
