"""Rollout streaming: a step's prompts go to the vLLM workers in chunks; each chunk, as it completes
(`ray.wait`), goes to the next verifier of the pool (round robin) while generation continues, and
its groups enter the step's calibration stage, joined with their prompts' experts, when its
verdicts arrive.

Lost actors: a chunk whose engine dies (or passes `reliability.rollout_timeout_s`, when the engine
is killed as hung) goes to a healthy engine, or, when none is left, to the restarted one after the
driver's `recover` has pushed it the current weights; the driver recovers every lost engine before
the step ends. A chunk whose verifier dies or passes `reliability.verify_timeout_s` is scored again
on another verifier (a hung one is killed; Ray restarts it). The expert store restarts itself and
Ray retries its reads. DAPO's dynamic sampling draws more prompts until the stage holds
enough informative groups (at most `algorithm.max_sampling_rounds` rounds).

`RolloutStream.start(step)` submits and returns a `PendingRollout` at once, so the driver can
start step t+1's rollout before step t trains (one-step-off); `finish(pending)` drains it and
returns the assembled `TrainBatch` with the rollout's metrics.

Old log-probs overlap generation (`trainer.stream_logprobs`): as a chunk's groups enter the stage,
they also go, as a small batch of their own (every response and expert), to the learners'
`compute_logprobs` (the driver's `score_rows`), while the engines generate the other chunks. The
driver then places those rows in the step's batch (`place_rows`). Not under dynamic sampling,
whose batch is known only at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch

from actors.learner import gather_rank_rows
from actors.rollout import RolloutRequest, SamplingSpec
from calibrl.algo import METHODS, CalibrationStage, Group, TrainBatch
from calibrl.algo.metrics import stage_metrics
from calibrl.config import Config
from calibrl.data import PromptSampler
from calibrl.data.schema import Example

POLL_S = 1.0
"""How often the driver checks the deadlines of what is in flight."""


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`: a resumed run draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step) % (2**31)


@dataclass
class LogprobPart:
    """Old log-probs of one chunk's groups, being computed on the learners while the step generates."""

    keys: list[tuple[int, bool, int]]
    """`row_keys` of the chunk's batch: which row of the step each of its rows is."""
    shape: tuple[int, int]
    """The chunk batch's (rows, response width)."""
    refs: list
    """One `compute_logprobs` ObjectRef per learner rank."""


def row_keys(batch: TrainBatch, first_group: int = 0) -> list[tuple[int, bool, int]]:
    """Each row's (group ordinal in the step, is an expert, index among its group's rows of that kind):
    the same for a row in a chunk's batch and in the step's batch, whatever the experts mixup kept."""
    keys, count = [], {}
    for g, expert in zip(batch.group_index.tolist(), batch.is_expert.tolist()):
        kind = (first_group + g, expert)
        count[kind] = count.get(kind, -1) + 1
        keys.append((*kind, count[kind]))
    return keys


def place_rows(parts: list[LogprobPart], batch: TrainBatch) -> list[tuple[list[int], list[int]]] | None:
    """For each part, (rows of `batch`, its own rows holding them); None if some row of `batch` is in
    no part (the step's batch is then scored whole)."""
    where = {key: (p, j) for p, part in enumerate(parts) for j, key in enumerate(part.keys)}
    keys = row_keys(batch)
    if not parts or any(key not in where for key in keys):
        return None
    placed: list[tuple[list[int], list[int]]] = [([], []) for _ in parts]
    for i, key in enumerate(keys):
        p, j = where[key]
        placed[p][0].append(i)
        placed[p][1].append(j)
    return placed


def gather_parts(parts: list[LogprobPart], placed: list[tuple[list[int], list[int]]],
                 results: list[list[dict]], shape: tuple[int, int], key: str) -> torch.Tensor:
    """The step's (B, T) `key` ("logp" or "entropy") from each part's per-rank results."""
    out = torch.zeros(shape)
    for part, (rows, src), ranks in zip(parts, placed, results):
        width = min(shape[1], part.shape[1])
        out[rows, :width] = gather_rank_rows(ranks, key, part.shape)[src, :width]
    return out


@dataclass
class PendingRollout:
    """One step's rollout in flight: request chunks submitted, groups streamed into `stage`."""

    step: int
    stage: CalibrationStage
    sampler_state: dict
    """The prompt sampler's state before this rollout drew: a checkpoint taken while it is in
    flight resumes by drawing these prompts again."""
    refs: dict = field(default_factory=dict)  # generate ObjectRef -> Generating
    verdicts: dict = field(default_factory=dict)  # verify ObjectRef -> Verifying
    rounds: int = 0
    prompts_drawn: int = 0
    verify_s: float = 0.0
    """Verifier busy seconds, summed over the pool."""
    verify_tail_s: float = 0.0
    """Seconds the driver waited for verdicts after the last chunk finished generating."""
    verify_timeouts: int = 0
    verify_errors: int = 0
    engines_lost: int = 0
    """Chunks whose engine died or hung; each was sent again."""
    verifiers_lost: int = 0
    """Chunks whose verifier died or hung; each was scored again elsewhere."""
    logprob_parts: list[LogprobPart] = field(default_factory=list)
    """Old log-probs of the groups added so far, computed while the rest generates."""
    unscored: list[tuple[list[Group], int]] = field(default_factory=list)
    """Groups `take` added (each chunk's, with its first group ordinal) whose old log-probs `finish`
    asks for, in one call."""
    failed: set = field(default_factory=set)
    """Generate refs whose engine failed while `take` looked: `finish` deals with them."""
    taken_early: int = 0
    """Chunks generated (and sent to the verifiers) before `finish`, while the driver waited on the
    learners."""


@dataclass
class Generating:
    """A chunk of requests on engine `worker` since `started`."""

    examples: list[Example]
    requests: list[RolloutRequest]
    sampling: SamplingSpec
    worker: int
    started: float


@dataclass
class Verifying:
    """A generated chunk on verifier `verifier` since `started`, its experts being fetched."""

    examples: list[Example]
    results: list
    pairs: list[tuple[str, str]]
    experts_ref: ray.ObjectRef
    verifier: int
    started: float


class RolloutStream:
    def __init__(self, cfg: Config, *, sampler: PromptSampler, rollout_workers: list, verifiers, experts,
                 pad_token_id: int, recover: Callable[[], None] = lambda: None,
                 notify: Callable[[str], None] = print,
                 score_rows: Callable[[TrainBatch], list] | None = None):
        """`recover()`: bring every lost engine back with the current weights (the driver's);
        `notify(line)`: tell the user what happened; `score_rows(batch)`: submit `compute_logprobs`
        of a chunk's batch to every learner rank, returning the ObjectRefs (None: no streaming)."""
        self.cfg, self.sampler = cfg, sampler
        self.workers, self.verifiers, self.experts = rollout_workers, verifiers, experts
        self.pad_token_id = pad_token_id
        self.recover, self.notify = recover, notify
        self.score_rows = score_rows
        self.lost: set[int] = set()  # engines that died or hung since the last recover()

    def start(self, step: int) -> PendingRollout:
        """Draw step `step`'s prompts and submit them; returns without waiting."""
        a = self.cfg.algorithm
        method = METHODS[a.name]
        with_experts = method.expert_rows and step > a.expert_warmup_steps
        stage = CalibrationStage(
            pad_token_id=self.pad_token_id, mixup=a.mixup if with_experts else "never",
            mix_ratio=a.mix_ratio, pass_low=a.pass_low, pass_high=a.pass_high,
            experts_per_group=a.experts_per_group,
            expert_in_baseline=method.expert_in_baseline, std_normalize=a.std_normalize,
            dynamic_sampling=a.dynamic_sampling, max_response_length=self.cfg.rollout.max_response_length,
            overlong_buffer_tokens=a.overlong_buffer_tokens, overlong_penalty=a.overlong_penalty,
            seed=step_seed(self.cfg.trainer.seed, step))
        pending = PendingRollout(step=step, stage=stage, sampler_state=self.sampler.state_dict())
        self._submit_round(pending)
        return pending

    def _submit_round(self, pending: PendingRollout) -> None:
        """Sample prompts_per_step prompts and send them, in chunks, round-robin to the workers."""
        r = self.cfg.rollout
        examples = self.sampler.next_batch()
        seed0 = step_seed(self.cfg.trainer.seed, pending.step) * 1000 + pending.prompts_drawn
        sampling = SamplingSpec(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                                max_tokens=r.max_response_length)
        chunk = max(1, r.stream_chunk_prompts)
        for k, start in enumerate(range(0, len(examples), chunk)):
            part = examples[start:start + chunk]
            requests = [RolloutRequest(prompt_id=e.id, prompt=e.prompt, images=list(e.images),
                                       seed=seed0 + start + j) for j, e in enumerate(part)]
            self._generate(pending, Generating(part, requests, sampling, k % len(self.workers), 0.0))
        pending.rounds += 1
        pending.prompts_drawn += len(examples)

    def _generate(self, pending: PendingRollout, job: Generating) -> None:
        job.started = time.time()
        pending.refs[self.workers[job.worker].generate.remote(job.requests, job.sampling)] = job

    def in_flight(self, pending: PendingRollout) -> list:
        """What `take` can act on: chunks generating (less any whose engine failed) and chunks being
        verified."""
        return [*(ref for ref in pending.refs if ref not in pending.failed), *pending.verdicts]

    def take(self, pending: PendingRollout, ref) -> None:
        """Take in one finished piece of a rollout while the driver waits on the learners (one-step-off:
        the next step generates during this one's update): a generated chunk goes to the verifiers,
        verified groups into the stage, so that `finish` has little left to do. Their old log-probs
        are asked for at `finish` (the learners are busy now). An engine that died is left to
        `finish`, which recovers it with the weights of that moment."""
        if ref in pending.verdicts:
            self._add_groups(pending, ref, score_now=False)
        elif self._chunk_generated(pending, ref) is None:
            pending.taken_early += 1
        else:
            pending.failed.add(ref)

    def _chunk_generated(self, pending: PendingRollout, ref) -> str | None:
        """A chunk's generate call returned: send the chunk to the verifiers, or say how its engine
        failed (the chunk then stays in `pending.refs`)."""
        try:
            results = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return f"died ({type(e).__name__})"
        self._verify(pending, pending.refs.pop(ref).examples, results)
        return None

    def finish(self, pending: PendingRollout) -> tuple[TrainBatch, dict[str, float]]:
        """Verify completed chunks as they come and add their groups as their verdicts come (refilling
        under dynamic sampling), then assemble the step's batch."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        stage = pending.stage
        generated_at = None
        if pending.unscored:  # taken in while the learners were busy: one call for all
            firsts = [first for _, first in pending.unscored]
            ends = [first + len(groups) for groups, first in pending.unscored]
            assert firsts[1:] == ends[:-1], "groups taken in must have contiguous ordinals"  # rows by key
            self._score_early(pending, [g for groups, _ in pending.unscored for g in groups], firsts[0])
            pending.unscored.clear()
        while pending.refs or pending.verdicts:
            ready, _ = ray.wait([*pending.refs, *pending.verdicts], num_returns=1, timeout=POLL_S)
            if not ready:
                self._cut_hangs(pending)
            elif ready[0] in pending.refs:
                failure = self._chunk_generated(pending, ready[0])
                if failure:
                    self._engine_lost(pending, pending.refs.pop(ready[0]), failure)
            else:
                self._add_groups(pending, ready[0])
            if not pending.refs and generated_at is None:
                generated_at = time.time()
            if (not pending.refs and not pending.verdicts and a.dynamic_sampling
                    and stage.num_informative < t.prompts_per_step
                    and pending.rounds < a.max_sampling_rounds):
                self._submit_round(pending)
                generated_at = None
        if self.lost:
            self.recover()  # every engine serves the current weights before anything else reads them
            self.lost.clear()
        pending.verify_tail_s = time.time() - generated_at if generated_at else 0.0
        t0 = time.time()
        batch, stage_counts = stage.assemble(max_groups=t.prompts_per_step)
        return batch, stage_metrics(stage_counts) | {
            "sampling/rounds": pending.rounds, "sampling/prompts_drawn": pending.prompts_drawn,
            "verify/timeouts": pending.verify_timeouts, "verify/errors": pending.verify_errors,
            "faults/engine_chunks_resent": pending.engines_lost,
            "faults/verifier_chunks_resent": pending.verifiers_lost,
            "time/verify_s": pending.verify_s, "time/verify_tail_s": pending.verify_tail_s,
            "perf/rollout_chunks_taken_early": pending.taken_early,
            "time/calibrate_s": time.time() - t0}

    def _cut_hangs(self, pending: PendingRollout) -> None:
        """Past its deadline, an engine or a verifier counts as hung: it is killed (Ray restarts it)
        and its chunk sent elsewhere."""
        r, now = self.cfg.reliability, time.time()
        for ref, job in list(pending.refs.items()):
            if now - job.started > r.rollout_timeout_s and ref in pending.refs:
                pending.refs.pop(ref)
                ray.kill(self.workers[job.worker], no_restart=False)
                self._engine_lost(pending, job, f"gave no answer in {r.rollout_timeout_s:.0f} s "
                                                "(reliability.rollout_timeout_s) and was killed")
        for ref, job in list(pending.verdicts.items()):
            if now - job.started > r.verify_timeout_s:
                pending.verdicts.pop(ref)
                self.verifiers.replace(job.verifier)
                self._verifier_lost(pending, job, f"gave no verdicts in {r.verify_timeout_s:.0f} s "
                                                  "(reliability.verify_timeout_s) and was killed")

    def _engine_lost(self, pending: PendingRollout, job: Generating, what: str) -> None:
        """Send a lost engine's chunks (this one and any others it held) to healthy engines; with none
        left, to the restarted ones after recovery."""
        lost = job.worker
        jobs = [job] + [pending.refs.pop(ref) for ref, j in list(pending.refs.items()) if j.worker == lost]
        pending.engines_lost += len(jobs)
        self.lost.add(lost)
        healthy = [i for i in range(len(self.workers)) if i not in self.lost]
        if not healthy:
            self.notify(f"[calibrl] step {pending.step}: rollout-{lost} {what}; waiting for Ray to restart "
                        "it and pushing it the current weights")
            self.recover()
            self.lost.clear()
            healthy = list(range(len(self.workers)))
        prompts = sum(len(j.requests) for j in jobs)
        self.notify(f"[calibrl] step {pending.step}: rollout-{lost} {what}; its {prompts} prompt(s) go to "
                    + ", ".join(f"rollout-{i}" for i in healthy))
        for k, j in enumerate(jobs):
            j.worker = healthy[k % len(healthy)]
            self._generate(pending, j)

    def _verify(self, pending: PendingRollout, examples: list[Example], results: list) -> None:
        """Send one generated chunk to the verifier pool and ask for its experts; returns at once."""
        pairs = [(s.text, ex.answer) for ex, res in zip(examples, results) for s in res.samples]
        experts_ref = self.experts.get.remote([ex.id for ex in examples],
                                              self.cfg.algorithm.experts_per_group)
        ref, index = self.verifiers.submit(pairs)
        pending.verdicts[ref] = Verifying(examples, results, pairs, experts_ref, index, time.time())

    def _verifier_lost(self, pending: PendingRollout, job: Verifying, what: str) -> None:
        pending.verifiers_lost += 1
        ref, index = self.verifiers.submit(job.pairs, avoid=job.verifier)
        self.notify(f"[calibrl] step {pending.step}: verifier-{job.verifier} {what}; its chunk goes to "
                    f"verifier-{index}")
        job.verifier, job.started = index, time.time()
        pending.verdicts[ref] = job

    def fetch_experts(self, ref, prompt_ids: list[str]) -> dict:
        """The expert store's answer to `ref` (a `get` of `prompt_ids`). A store that died is restarted
        by Ray, which retries the call; one that hangs past `reliability.verify_timeout_s` is killed
        (Ray restarts it) and asked again."""
        r = self.cfg.reliability
        try:
            return ray.get(ref, timeout=r.verify_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.notify(f"[calibrl] the expert store gave no answer in {r.verify_timeout_s:.0f} s "
                        "(reliability.verify_timeout_s); restarting it")
            ray.kill(self.experts, no_restart=False)
            return ray.get(self.experts.get.remote(prompt_ids, self.cfg.algorithm.experts_per_group),
                           timeout=r.restart_timeout_s)

    def _add_groups(self, pending: PendingRollout, verdict_ref, score_now: bool = True) -> None:
        """A chunk's verdicts arrived: add its groups, with their experts, to the stage (and send them
        to the learners' old log-probs, now or, `score_now=False`, at `finish`)."""
        job = pending.verdicts.pop(verdict_ref)
        try:
            verdicts, verify_metrics = ray.get(verdict_ref)
        except ray.exceptions.RayActorError as e:
            self._verifier_lost(pending, job, f"died ({type(e).__name__})")
            return
        experts = self.fetch_experts(job.experts_ref, [ex.id for ex in job.examples])
        pending.verify_timeouts += verify_metrics["timeouts"]
        pending.verify_errors += verify_metrics["errors"]
        pending.verify_s += verify_metrics["seconds"]
        i, first, groups = 0, pending.stage.num_groups, []
        for ex, res in zip(job.examples, job.results):
            n = len(res.samples)
            groups.append(Group(prompt_id=ex.id, prompt_token_ids=res.prompt_token_ids, answer=ex.answer,
                                responses=res.samples, verdicts=verdicts[i:i + n], experts=experts[ex.id],
                                images=list(ex.images)))
            pending.stage.add(groups[-1])
            i += n
        if self.score_rows is not None and not self.cfg.algorithm.dynamic_sampling:
            if score_now:
                self._score_early(pending, groups, first)
            else:
                pending.unscored.append((groups, first))

    def _score_early(self, pending: PendingRollout, groups: list[Group], first: int) -> None:
        """Send the chunk's rows (every response, and every expert unless the step takes none) to the
        learners' old log-probs now."""
        stage = pending.stage
        chunk = CalibrationStage(pad_token_id=self.pad_token_id, experts_per_group=stage.experts_per_group,
                                 mixup="never" if stage.mixup == "never" else "always")
        for group in groups:
            chunk.add(group)
        batch, _ = chunk.assemble()
        pending.logprob_parts.append(LogprobPart(keys=row_keys(batch, first),
                                                 shape=tuple(batch.response_ids.shape),
                                                 refs=self.score_rows(batch)))
