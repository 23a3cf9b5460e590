"""Memory per actor, logged with every step: `memory/<actor name>/peak_rss_gb`, `.../rss_gb` and, on a
GPU, `.../gpu_peak_gb`, with `.../children_pss_gb` where an actor has child processes (see
actors/memory.py for what each means), and the driver process's own as `memory/driver/...`.

Sampling never waits on an actor, and asks at most every few seconds (memory moves slowly; a record
between askings carries the last answers). A busy actor (an engine generating the next step in
one-step-off mode) answers when it is free, and its last answer is logged until then; a dead one's
samples stop with it. Only the end of a run waits, for at most `timeout` seconds, so that the run's
last record holds every actor's peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from actors.memory import actor_memory, process_memory


class MemoryWatch:
    def __init__(self, handles: Callable[[], list], *, every_s: float = 5.0):
        """handles: the run's actors now (a restarted or replaced actor is asked under its new handle);
        every_s: ask at most this often (asking all costs the driver ~2 ms, a short SFT step ~250 ms)."""
        self._handles, self._every_s = handles, every_s
        self._pending: dict = {}  # actor handle -> the ref of its answer
        self._asked_at = -float("inf")
        self.latest: dict[str, dict[str, float]] = {}  # actor name -> its last answer

    def poll(self) -> dict[str, float]:
        """Take in what the actors have answered since the last call, ask again those that answered
        (once `every_s` has passed since the last asking), and return every actor's last answer."""
        self._take(timeout=0)
        if time.monotonic() - self._asked_at >= self._every_s:
            self._ask()
        return self.metrics()

    def final(self, timeout: float = 10.0) -> dict[str, float]:
        """Fresh answers from every actor that gives one within `timeout` seconds (from the end of a run,
        when nothing keeps them busy)."""
        deadline = time.monotonic() + timeout
        self._take(timeout=0)
        self._ask()
        while self._pending and time.monotonic() < deadline:
            self._take(timeout=deadline - time.monotonic())
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        # the driver's own process: a driver that started Ray has the whole local cluster as descendants
        sampled = self.latest | {"driver": process_memory(children=False)}
        return {f"memory/{name}/{k}": v for name, mem in sampled.items() for k, v in mem.items()}

    def _take(self, timeout: float) -> None:
        refs = list(self._pending.values())
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(ready)
        for handle, ref in list(self._pending.items()):
            if ref not in done:
                continue
            del self._pending[handle]
            try:
                name, mem = ray.get(ref)
            except ray.exceptions.RayError:  # died (its recovery is the driver's business, not ours)
                continue
            self.latest[name] = mem

    def _ask(self) -> None:
        self._asked_at = time.monotonic()
        for handle in self._handles():
            if handle not in self._pending:
                self._pending[handle] = handle.__ray_call__.remote(actor_memory)


def memory_by_actor(record: dict) -> dict[str, dict[str, float]]:
    """The `memory/<name>/<what>` metrics of a metrics record as {name: {what: value}}, in logged order."""
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if key.startswith("memory/") and key.count("/") == 2:
            _, name, what = key.split("/")
            out.setdefault(name, {})[what] = value
    return out


def last_memory(records: list[dict]) -> dict[str, dict[str, float]]:
    """Each actor's memory from the last record of a run that holds any (the final evaluation's, when
    the run finished)."""
    return next((m for r in reversed(records) if (m := memory_by_actor(r))), {})


def peak_line(memory: dict[str, dict[str, float]]) -> str:
    """'rollout-0 0.93, learner-0 0.88, ...': each actor's peak resident memory in GB (and its GPU peak)."""
    def one(name: str, m: dict[str, float]) -> str:
        gpu = f" (GPU {m['gpu_peak_gb']:.2f})" if "gpu_peak_gb" in m else ""
        return f"{name} {m['peak_rss_gb']:.2f}{gpu}"

    return ", ".join(one(name, m) for name, m in memory.items() if "peak_rss_gb" in m)
