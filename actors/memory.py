"""What one process holds in memory: run inside each actor (through Ray's `__ray_call__`, so no actor
class needs a method for it) and in the driver; `launch.memory.MemoryWatch` collects it per step.

The process's own peak resident memory is Linux's VmHWM (the kernel's high-water mark: what "peak
RSS" means; psutil does not give it) and what it holds now its VmRSS, read together from
/proc/self/status. Its descendants (vLLM's workers under tensor parallelism, the verifier's scoring
children) are counted by their proportional set size now (psutil's `pss`: pages shared with a
parent, as forked children's are, count once in all, not once a process). Where torch has a CUDA
device in use, `gpu_peak_gb` is torch's own peak allocation on it.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import psutil

GB = 1e9


def _status_kb() -> dict[str, int]:
    """This process's VmHWM and VmRSS in kB, from one read of /proc/self/status ({} without /proc)."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmHWM", "VmRSS")}
    except OSError:
        return {}


def process_memory(*, children: bool = True) -> dict[str, float]:
    """This process's `peak_rss_gb` and `rss_gb`, its descendants' `children_pss_gb` (with `children`,
    where it has any), and, where torch uses a CUDA device here, `gpu_peak_gb`."""
    status = _status_kb()
    if "VmHWM" in status:
        out = {"peak_rss_gb": status["VmHWM"] * 1024 / GB, "rss_gb": status["VmRSS"] * 1024 / GB}
    else:  # no /proc: getrusage's peak (kB on Linux, bytes on macOS) and psutil's resident size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        out = {"peak_rss_gb": peak / GB, "rss_gb": psutil.Process().memory_info().rss / GB}
    if children:
        pss = []
        for kid in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # exited meanwhile, or not ours to read
                pss.append(kid.memory_full_info().pss)
        if pss:
            out["children_pss_gb"] = sum(pss) / GB
    torch = sys.modules.get("torch")  # never imported for this: a verifier may not use torch at all
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return out


def actor_memory(actor) -> tuple[str, dict[str, float]]:
    """(the actor's name, `process_memory()`), for `handle.__ray_call__.remote(actor_memory)`, which
    runs it inside the actor's process with the actor instance as its argument."""
    return getattr(actor, "_actor_name", type(actor).__name__), process_memory()
