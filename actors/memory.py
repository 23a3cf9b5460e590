"""What one process holds in memory: run inside each actor (through Ray's `__ray_call__`, so no actor
class needs a method for it) and in the driver; `launch.memory.MemoryWatch` collects it per step.

Read from Linux's /proc: the process's own peak resident memory (VmHWM, the kernel's high-water
mark: what "peak RSS" means) and what it holds now (VmRSS); and, where it has descendants (vLLM's
workers under tensor parallelism, the verifier's scoring children), their proportional set size now
(Pss: pages shared with a parent, as forked children's are, count once in all, not once a process).
Where torch has a CUDA device in use, `gpu_peak_gb` is torch's own peak allocation on it.
"""

from __future__ import annotations

import os
import resource
import sys

GB = 1e9


def _kb(path: str, field: str) -> int | None:
    """A `kB` field of a /proc file (`status`: VmHWM, VmRSS; `smaps_rollup`: Pss), or None where it cannot
    be read (not Linux, a process that just exited)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """PID's children, their children, ... (/proc/PID/task/*/children); [] where unreadable."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def process_memory(*, children: bool = True) -> dict[str, float]:
    """This process's `peak_rss_gb` and `rss_gb`, its descendants' `children_pss_gb` (with `children`,
    where it has any), and, where torch uses a CUDA device here, `gpu_peak_gb`."""
    pid = os.getpid()
    peak = _kb(f"/proc/{pid}/status", "VmHWM")
    if peak is None:  # no /proc: getrusage's peak (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    out = {"peak_rss_gb": peak * 1024 / GB}
    now = _kb(f"/proc/{pid}/status", "VmRSS")
    if now is not None:
        out["rss_gb"] = now * 1024 / GB
    descendants = [_kb(f"/proc/{kid}/smaps_rollup", "Pss") for kid in (_descendants(pid) if children else [])]
    if descendants:
        out["children_pss_gb"] = sum(kb or 0 for kb in descendants) * 1024 / GB
    torch = sys.modules.get("torch")  # never imported for this: a verifier may not use torch at all
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return out


def actor_memory(actor) -> tuple[str, dict[str, float]]:
    """(the actor's name, `process_memory()`), for `handle.__ray_call__.remote(actor_memory)`, which
    runs it inside the actor's process with the actor instance as its argument."""
    return getattr(actor, "_actor_name", type(actor).__name__), process_memory()
