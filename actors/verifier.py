"""Verifier: scores responses with section 1 of docs/algorithm.md (`calibrl.algo.reward.verify`), or with a
user's reward function named by import path (`verifier.reward_function: "module:function"`, the
reference code's `custom_reward_function` idea), each response under a time limit.

`VerifierWorker` is a plain class; `VerifierPool` makes N of them Ray actors named `verifier-0`,
`verifier-1`, ... and splits a batch across them.

Why a child process: a response can make a checker hang (sympy on a pathological expression, a
user's function stuck in a loop) or crash the interpreter, and a thread cannot be stopped. Each
worker scores in one child process and streams the batch to it; it waits at most `timeout_s` for
each result. On a timeout the child is killed and a fresh one forked, the item gets reward 0 and
the reason `timeout`; an exception inside the scorer gives reward 0 and `error:<ExceptionType>`;
a child that dies gives `error:ChildDied`. The remaining items are resent to the new child, so a
bad item costs at most `timeout_s` plus a fork. Children come from a forkserver that has the
scorer's modules preloaded (a fork costs milliseconds; `spawn` would re-import sympy each time,
and plain `fork` is unsafe in a threaded Ray worker).
"""

from __future__ import annotations

import ctypes
import importlib
import math
import multiprocessing
import numbers
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

import ray

from actors.group import named_actor
from actors.logs import actor_log_dir
from calibrl.algo.reward import Verdict, format_matches, verify
from calibrl.config import Config

FAILED = Verdict(reward=0.0, accuracy=0.0, format_ok=False, passed=False)
TIMEOUT, CHILD_DIED = "timeout", "error:ChildDied"  # failure reasons besides `error:<ExceptionType>`
STARTUP_TIMEOUT_S = 120.0
"""Time a fresh child may take to import the scorer (the first one also starts the forkserver)."""


def load_reward_function(path: str) -> Callable:
    """The function named by `module:function` (the module must be importable where the verifier runs)."""
    module_name, sep, fn_name = path.partition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"verifier.reward_function={path!r}: expected an import path 'module:function'")
    module = importlib.import_module(module_name)
    try:
        fn = getattr(module, fn_name)
    except AttributeError:
        raise ValueError(f"verifier.reward_function={path!r}: module {module_name} "
                         f"has no {fn_name!r}") from None
    if not callable(fn):
        raise TypeError(f"verifier.reward_function={path!r}: {fn_name} is not callable")
    return fn


def to_verdict(result, response: str, *, pass_threshold: float) -> Verdict:
    """A reward function's return value as a Verdict. A number r becomes reward r with passed = r > threshold,
    accuracy = 1.0 if passed else 0.0, and format_ok from the section-1 format check on the response."""
    if isinstance(result, Verdict):
        return result
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        raise TypeError(f"reward function returned {type(result).__name__}; expected a float or a Verdict")
    reward = float(result)
    if not math.isfinite(reward):
        raise ValueError(f"reward function returned {reward}")
    passed = reward > pass_threshold
    return Verdict(reward=reward, accuracy=float(passed), format_ok=format_matches(response.strip()),
                   passed=passed)


def _serve(conn, reward_function: str | None, pass_threshold: float) -> None:
    """Child process: score each batch received on `conn`, one result message per item, in order."""
    # die with the forkserver (which exits with the worker): no orphan left hanging
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        fn = load_reward_function(reward_function) if reward_function else None
        verify("<think></think><answer>1</answer>", "2")  # imports math-verify before the first timed item
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for response, answer in batch:
            try:
                if fn is None:
                    v = verify(response, answer, pass_threshold=pass_threshold)
                else:
                    v = to_verdict(fn(response, answer), response, pass_threshold=pass_threshold)
                conn.send(("ok", (v.reward, v.accuracy, v.format_ok, v.passed)))
            except Exception as e:  # noqa: BLE001 - any failure of the scorer is this item's reward 0
                conn.send(("error", type(e).__name__))


class VerifierWorker:
    """Scores (response, answer) pairs; a response that hangs or raises gets reward 0 and is counted."""

    def __init__(self, *, timeout_s: float = 5.0, pass_threshold: float = 0.1,
                 reward_function: str | None = None):
        """timeout_s: seconds allowed per response; pass_threshold: a response passes when reward > this;
        reward_function: `module:function` with fn(response, answer) -> float | Verdict (None: `verify`)."""
        if not timeout_s > 0:
            raise ValueError(f"verifier.timeout_s={timeout_s} must be > 0")
        if reward_function:
            load_reward_function(reward_function)  # a wrong path fails here, not on the first batch
        self.timeout_s = timeout_s
        self.pass_threshold = pass_threshold
        self.reward_function = reward_function
        self._ctx = multiprocessing.get_context("forkserver")
        # "__main__": the driver script (the Ray worker's, in an actor) is imported once in the forkserver
        # instead of once per child
        preload = ["__main__", "actors.verifier", "calibrl.algo.reward", "math_verify"]
        if reward_function:
            preload.append(reward_function.partition(":")[0])
        self._ctx.set_forkserver_preload(preload)  # also hands the forkserver this process's sys.path
        self._child = None
        self._conn = None
        self.totals: Counter = Counter()
        self._start_child()

    def _start_child(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        self._child = self._ctx.Process(target=_serve,
                                        args=(child_conn, self.reward_function, self.pass_threshold),
                                        name="verifier-scorer", daemon=True)
        self._child.start()
        child_conn.close()
        self._conn = parent_conn
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            self._stop_child()
            raise RuntimeError(f"verifier child did not start within {STARTUP_TIMEOUT_S:.0f} s")
        try:
            status, message = self._conn.recv()
        except EOFError:
            status, message = "failed", f"exited with code {self._child.exitcode}"
        if status != "ready":
            self._stop_child()
            raise RuntimeError(f"verifier child failed to start: {message}")

    def _stop_child(self) -> None:
        self._child.kill()
        self._child.join()
        self._conn.close()
        self._child = self._conn = None

    def _receive(self) -> Verdict | str:
        """The child's next result: a Verdict, or the reason there is none."""
        if not self._conn.poll(self.timeout_s):
            return TIMEOUT
        try:
            status, payload = self._conn.recv()
        except EOFError:
            return CHILD_DIED
        return Verdict(*payload) if status == "ok" else f"error:{payload}"

    def score(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[Verdict], dict]:
        """Verdicts for (response, answer) pairs, in order, and metrics for this call:
        {scored, timeouts, errors, restarts, seconds, reasons: {"timeout" | "error:<Type>": count}}."""
        start = time.monotonic()
        verdicts: list[Verdict] = []
        reasons: Counter = Counter()
        restarts = 0
        while len(verdicts) < len(pairs):
            if self._child is None:
                self._start_child()
                restarts += 1
            self._conn.send(list(pairs[len(verdicts):]))
            while len(verdicts) < len(pairs):
                result = self._receive()
                if isinstance(result, Verdict):
                    verdicts.append(result)
                    continue
                reasons[result] += 1
                verdicts.append(FAILED)
                # stuck or gone: the rest of the batch goes to a fresh child
                if result in (TIMEOUT, CHILD_DIED):
                    self._stop_child()
                    break
        metrics = {"scored": len(pairs) - sum(reasons.values()), "timeouts": reasons[TIMEOUT],
                   "errors": sum(n for r, n in reasons.items() if r.startswith("error:")),
                   "restarts": restarts, "seconds": time.monotonic() - start, "reasons": dict(reasons)}
        self.totals.update({k: metrics[k] for k in ("scored", "timeouts", "errors", "restarts")})
        self.totals.update({f"reason/{r}": n for r, n in reasons.items()})
        return verdicts, metrics

    def state(self) -> dict:
        """Counts over the worker's life: scored, timeouts, errors, restarts, reason/<reason>."""
        return dict(self.totals)

    def close(self) -> None:
        if self._child is not None:
            self._conn.send(None)
            self._child.join(timeout=2)
            self._stop_child()


def merge_metrics(parts: Sequence[dict]) -> dict:
    """Sum per-worker `score` metrics (seconds: the slowest worker)."""
    reasons: Counter = Counter()
    for m in parts:
        reasons.update(m["reasons"])
    merged = {k: sum(m[k] for m in parts) for k in ("scored", "timeouts", "errors", "restarts")}
    merged["seconds"] = max((m["seconds"] for m in parts), default=0.0)
    merged["reasons"] = dict(reasons)
    return merged


class VerifierPool:
    """`num_workers` VerifierWorker actors named `{name_prefix}-{i}`; `score` splits a batch across them."""

    def __init__(self, num_workers: int, *, timeout_s: float = 5.0, pass_threshold: float = 0.1,
                 reward_function: str | None = None, num_cpus_per_worker: float = 1.0,
                 name_prefix: str = "verifier", log_dir: str | None = None, max_restarts: int = 0):
        self.workers = [named_actor(VerifierWorker, f"{name_prefix}-{i}", num_cpus=num_cpus_per_worker,
                                    log_dir=log_dir, max_restarts=max_restarts,
                                    timeout_s=timeout_s, pass_threshold=pass_threshold,
                                    reward_function=reward_function)
                        for i in range(num_workers)]

        self._next = 0

    @classmethod
    def from_config(cls, cfg: Config, *, name_prefix: str = "verifier") -> VerifierPool:
        """The run's verifier pool, from `cfg.verifier`."""
        v = cfg.verifier
        return cls(v.num_workers, timeout_s=v.timeout_s, pass_threshold=v.pass_threshold,
                   reward_function=v.reward_function, num_cpus_per_worker=v.num_cpus_per_worker,
                   name_prefix=name_prefix, log_dir=actor_log_dir(cfg),
                   max_restarts=cfg.reliability.actor_restarts)

    def submit(self, pairs: Sequence[tuple[str, str]], *,
               avoid: int | None = None) -> tuple[ray.ObjectRef, int]:
        """Score (response, answer) pairs on the next worker (round robin, skipping `avoid` when there
        is another); returns the ref, which resolves to `VerifierWorker.score`'s (verdicts, metrics),
        and the worker's index. For streaming many small chunks."""
        index = self._next % len(self.workers)
        if index == avoid and len(self.workers) > 1:
            self._next += 1
            index = self._next % len(self.workers)
        self._next += 1
        return self.workers[index].score.remote(list(pairs)), index

    def replace(self, index: int) -> None:
        """Kill worker `index` (hung); Ray starts it again under the same name."""
        ray.kill(self.workers[index], no_restart=False)

    def score(self, responses: Sequence[str], answers: Sequence[str],
              timeout: float | None = None) -> tuple[list[Verdict], dict]:
        """Verdicts for responses[i] against answers[i], in order, and the merged metrics (at most
        `timeout` seconds: Ray's GetTimeoutError)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        pairs = list(zip(responses, answers))
        chunk = -(-len(pairs) // len(self.workers)) or 1
        refs = [w.score.remote(pairs[i * chunk:(i + 1) * chunk]) for i, w in enumerate(self.workers)
                if pairs[i * chunk:(i + 1) * chunk]]
        results = ray.get(refs, timeout=timeout)
        verdicts = [v for part, _ in results for v in part]
        return verdicts, merge_metrics([m for _, m in results])

    def state(self) -> list[dict]:
        return ray.get([w.state.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
