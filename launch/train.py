"""The driver: `calibrl train CONFIG [CONFIG ...] [key=value ...]` runs `train(cfg)`.

Read `Trainer.fit` (the run) and `Trainer.train_step` (one RL step) first. One step, top to bottom:

    sample prompts -> rollout requests to the vLLM workers -> as each request completes, verify
    its groups and fetch their experts -> calibration stage (launch/rollout_stream.py), and the
    learners' old log-probs of those groups while the rest generates -> train -> sync weights to
    every rollout worker -> log -> checkpoint

With `trainer.one_step_off`, step t+1's rollouts are submitted before step t trains, so sampling
overlaps learning; every sample carries its weights version and the staleness (at most 1) is
logged. SFT warm-up steps on expert trajectories run first when `trainer.sft_warmup_steps` > 0.
What a method does (its loss, whether it has expert rows, whether it samples at all) comes from
`calibrl.algo.methods.METHODS`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import ray
import torch

from actors.expert_store import ExpertStore
from actors.learner import Learner, gather_rank_rows
from actors.rollout import RolloutWorker
from actors.verifier import VerifierPool
from actors.weight_sync import make_weight_sync
from calibrl.algo import (
    METHODS,
    SFT_WARMUP_METHOD,
    CalibrationStage,
    ExpertTrajectory,
    Group,
    attach_expert_logprobs,
)
from calibrl.algo.metrics import (
    batch_metrics,
    gradient_shares,
    greedy_change_rate,
    nonfinite_streak,
    paired_gain,
    reduce_rank_metrics,
)
from calibrl.config import Config, ConfigError, check_paths, to_yaml, validate
from calibrl.data import PromptSampler, load_examples
from calibrl.data.schema import Example
from calibrl.inputs import prompt_token_ids, response_token_ids
from launch import checkpoint as ckpt
from launch.cluster import connect_ray, needed_cpus
from launch.errors import RunStopped
from launch.evaluate import evaluate
from launch.memory import MemoryWatch
from launch.metrics import MetricsLogger, read_metrics
from launch.progress import Progress
from launch.rollout_stream import PendingRollout, RolloutStream, gather_parts, place_rows, step_seed

PROMPT_DEPENDENCE_PROMPTS = 64
"""Held-out prompts `val/prompt_dependence` is measured on at each evaluation."""
RUN_FILES = ("metrics.jsonl", "rollouts.jsonl", "tensorboard", "checkpoints", "experts")
"""What a run writes in its directory (a fresh run refuses to mix with another's)."""
PROGRESS_KEYS = {"reward": "reward/mean", "acc": "acc/mean", "entropy": "policy/entropy",
                 "calib": "loss/calib"}
"""What the RL progress bar shows: label -> metric."""


class Trainer:
    def __init__(self, cfg: Config):
        """Checks the config, the model directory and the data (every bad input is named before
        anything starts), then joins or starts Ray and starts the run's actors."""
        self.cfg = validate(cfg)
        check_paths(cfg)
        c = cfg
        self.out = c.trainer.output_dir
        os.makedirs(self.out, exist_ok=True)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(c.model.path)
        self.image_kwargs = {"min_pixels": c.model.image_min_pixels, "max_pixels": c.model.image_max_pixels}

        # data: validated at the edge, bad rows named (or skipped and counted)
        def prompt_length(ex: Example) -> int:
            return len(prompt_token_ids(self.tokenizer, ex.prompt, ex.images, **self.image_kwargs))

        read = {"expert_key": c.data.expert_key, "max_images": c.data.max_images_per_prompt,
                    "max_prompt_length": c.data.max_prompt_length, "on_bad_row": c.data.on_bad_row,
                    "batch_rows": c.data.read_batch_rows, "prompt_length": prompt_length}
        self.train_examples, report = load_examples(c.data.train_files, **read)
        self.val_sets = {path: load_examples([path], **read)[0] for path in c.data.val_files}
        if report.rows_skipped:
            print(f"[calibrl] data: {report.summary()}", file=sys.stderr, flush=True)
        self.sampler = PromptSampler(self.train_examples, c.trainer.prompts_per_step, seed=c.trainer.seed,
                                     shuffle=c.data.shuffle)
        self.sft_sampler = PromptSampler(self.train_examples, c.trainer.sft_batch_prompts,
                                         seed=c.trainer.seed + 1,
                                         shuffle=c.data.shuffle)
        self.prompt_ids_cache: dict[str, list[int]] = {}

        # resume: restore the expert additions before the store starts
        self.resume_from = ckpt.resolve_resume(c.trainer.resume, self.out)
        if not self.resume_from:
            self.claim_run_dir()
        self.experts_dir = os.path.join(self.out, "experts")
        if self.resume_from:
            ckpt.restore_expert_additions(self.resume_from, self.experts_dir)

        # actors, named for the Ray dashboard; every role is built from the config the same way
        contended = oversubscribed(c)
        connect_ray(c.trainer.ray_address, num_cpus=max(os.cpu_count() or 1, needed_cpus(c)),
                    quiet=c.trainer.log_level != "debug")
        self.rollout = RolloutWorker.from_config(c)
        self.verifiers = VerifierPool.from_config(c)
        self.experts = ExpertStore.from_config(c)
        self.learners = Learner.from_config(c)
        self.method = METHODS[c.algorithm.name]
        self.progress = Progress()
        if contended:
            self.progress.line(
                "[calibrl] warning: trainer.stream_logprobs runs the engines and the learners at once, and "
                f"their threads (rollout.num_cpus_per_worker, learner.num_cpus_per_learner) outnumber this "
                f"machine's {os.cpu_count()} cores: their thread pools will contend (a step of the tiny "
                "model took 25x longer). Set trainer.stream_logprobs=false, or fewer CPUs per actor.")
        self.stream = RolloutStream(c, sampler=self.sampler, rollout_workers=self.rollout,
                                    verifiers=self.verifiers, experts=self.experts,
                                    pad_token_id=self.tokenizer.pad_token_id, recover=self.recover_engines,
                                    notify=self.progress.line,
                                    score_rows=self.score_rows if c.trainer.stream_logprobs else None)
        self.weight_sync = make_weight_sync(c, self.learners, self.rollout)
        self.logger = MetricsLogger(self.out)
        self.memory = MemoryWatch(lambda: [*self.rollout, *self.learners.actors, *self.verifiers.workers,
                                           self.experts])
        self.engine_recoveries = 0
        self.nonfinite = 0  # updates in a row skipped for a non-finite loss or gradient
        self.stop_requested: str | None = None  # the signal that asked the run to stop
        self.step = 0
        self.sft_step = 0
        self.version = 0  # weights version the learners hold
        self.synced_version = 0  # weights version the rollout engines serve
        self.last_greedy: dict[str, tuple[str, float]] = {}  # last evaluation: id -> (answer, accuracy)
        self.sft_greedy: dict[str, tuple[str, float]] = {}  # the same after the SFT warm-up
        self.pending: PendingRollout | None = None  # a rollout in flight (one-step-off mode)

    # ---- the training loop ---------------------------------------------------------------------

    def fit(self) -> dict:
        c = self.cfg.trainer
        self.memory.poll()  # ask every actor now: the first step's record has their answers
        if self.resume_from:
            self.restore(self.resume_from)
        else:
            self.log_eval(self.evaluate_now(), phase="start")  # the starting point, for the report
        if self.sft_step < c.sft_warmup_steps:
            self.on_learners("set_lr", self.cfg.learner.sft_lr or self.cfg.learner.lr, what="set_lr")
            self.progress.phase("SFT warm-up", c.sft_warmup_steps, initial=self.sft_step)
            while self.sft_step < c.sft_warmup_steps:
                self.sft_step += 1
                self.log_sft(self.sft_update(SFT_WARMUP_METHOD))
                if self.stop_requested:
                    return self.stop_now()
            self.progress.close()
            self.on_learners("set_lr", self.cfg.learner.lr, what="set_lr")
            if self.cfg.learner.reset_optimizer_after_sft:
                self.on_learners("reset_optimizer", what="reset_optimizer")
            self.log_eval(self.evaluate_now(), phase="after SFT warm-up")
            self.sft_greedy = self.last_greedy
        if self.resume_from and self.step >= c.total_steps:
            raise RuntimeError(f"{self.resume_from} is at step {self.step}, and "
                               f"trainer.total_steps={c.total_steps}: "
                               "nothing left to train. Raise trainer.total_steps to continue this run.")
        self.progress.phase(f"{self.cfg.algorithm.name} steps", c.total_steps, initial=self.step)
        while self.step < c.total_steps:
            self.step += 1
            if not self.method.needs_rollouts:  # the SFT baseline: expert trajectories only
                metrics = self.sft_update(self.cfg.algorithm.name)
                self.logger.log(self.step, metrics | self.memory.poll())
                self.progress.advance(loss=metrics.get("loss/total", float("nan")))
            else:
                # synchronous mode samples here; one-step-off mode already started it during the last step
                self.pending = self.train_step(self.pending or self.start_rollout(self.step))
            if c.eval_every_steps and self.step % c.eval_every_steps == 0 and self.step < c.total_steps:
                self.log_eval(self.evaluate_now(), phase="periodic")
            if self.stop_requested and self.step < c.total_steps:
                return self.stop_now()
            if c.save_every_steps and self.step % c.save_every_steps == 0 and self.step < c.total_steps:
                self.save()
        self.progress.close()
        final = self.evaluate_now()
        self.log_eval(final | self.memory.final(), phase="final")
        self.save()
        first = next((r for r in read_metrics(self.out) if r.get("kind") == "eval"), final)
        acc = [r.get("val/accuracy", float("nan")) for r in (first, final)]
        self.progress.line(f"[calibrl] done: {self.step} {self.cfg.algorithm.name} steps; held-out greedy "
                           f"accuracy {acc[0]:.3f} at the start -> {acc[1]:.3f} "
                           f"({time.time() - self.logger.start:.0f} s); metrics, checkpoints and logs in "
                           f"{self.out}")
        return final

    def claim_run_dir(self) -> None:
        """A run directory holds one run. Starting afresh where another run left its files: refused
        under `trainer.resume=never` (nothing is overwritten); under `auto` (no checkpoint to continue
        from: the earlier run stopped before its first one) its logs are cleared."""
        left = [n for n in RUN_FILES if os.path.exists(os.path.join(self.out, n))]
        if not left:
            return
        if self.cfg.trainer.resume == "never":
            raise ConfigError([(f"trainer.output_dir={self.out} already holds a run ({', '.join(left)}); "
                                "continue it with trainer.resume=auto, or choose another "
                                "trainer.output_dir")])
        for name in left:
            path = os.path.join(self.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        print(f"[calibrl] {self.out} held an earlier run without a checkpoint ({', '.join(left)}): "
              "starting afresh", file=sys.stderr, flush=True)

    def request_stop(self, signum: int, _frame=None) -> None:
        """SIGTERM / SIGINT: finish the step, write a checkpoint, return. A second one stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = signal.Signals(signum).name
        self.progress.line(f"[calibrl] {self.stop_requested}: stopping after this step with a checkpoint "
                           "(send it again to stop at once)")

    def stop_now(self) -> dict:
        self.progress.close()
        path = self.save()
        self.progress.line(f"[calibrl] stopped by {self.stop_requested} at step {self.step} (SFT step "
                           f"{self.sft_step}); continue with trainer.resume=auto from {path}")
        return {}

    def train_step(self, pending: PendingRollout) -> PendingRollout | None:
        """One RL step; returns the next step's rollout if one-step-off mode started it before training."""
        c, a = self.cfg, self.cfg.algorithm
        t0 = time.time()
        batch, metrics = self.stream.finish(pending)
        t_rollout = time.time()
        if len(batch) == 0:  # dynamic sampling found no informative group within its rounds
            self.progress.line(f"[calibrl] step {self.step}: no informative group after "
                               f"{metrics['sampling/rounds']} sampling rounds; no update this step")
            self.progress.advance()
            self.logger.log(self.step, metrics | {"sampling/skipped_step": 1.0})
            return None
        self.check_staleness(batch)
        one_step_off = c.trainer.one_step_off and self.step < c.trainer.total_steps
        next_pending = self.start_rollout(self.step + 1) if one_step_off else None

        # old log-probs of every row (experts included) -> each row's expert baseline
        old_logp, entropy, streamed = self.old_logprobs(pending, batch, next_pending)
        attach_expert_logprobs(batch, old_logp)
        t_logp = time.time()

        train = self.on_learners("train_step", ray.put(batch), loss_name=a.name,
                                 loss_kwargs=self.loss_kwargs(),
                                 mini_batches=c.trainer.prompts_per_step // c.learner.mini_batch_prompts,
                                 epochs=c.learner.ppo_epochs, what="the update",
                                 timeout=c.reliability.train_timeout_s, rollout=next_pending)
        t_train = time.time()
        # staleness against the weights that just trained
        metrics |= batch_metrics(batch, entropy, version=self.version)
        self.version += 1
        metrics |= self.sync_weights()  # the next rollout reads them
        metrics["faults/engine_recoveries"] = float(self.engine_recoveries)

        metrics |= reduce_rank_metrics(train)
        self.check_nonfinite(metrics)
        metrics |= gradient_shares(metrics)
        self.log_rollouts(batch)
        metrics |= {"perf/logprobs_streamed": float(streamed), "time/rollout_s": t_rollout - t0,
                    "time/logprobs_s": t_logp - t_rollout, "time/train_s": t_train - t_logp,
                    "time/step_s": time.time() - t0,
                    "perf/tokens_per_s": float(batch.response_length.sum()) / max(time.time() - t0, 1e-9)}
        metrics |= self.memory.poll()
        self.logger.log(self.step, metrics)
        self.progress.advance(**{label: metrics[k] for label, k in PROGRESS_KEYS.items() if k in metrics})
        return next_pending

    def old_logprobs(self, pending: PendingRollout, batch,
                     next_pending: PendingRollout | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(old log-probs, entropy, streamed) of every row of the step's batch: from the chunks scored
        while the step generated when they cover the batch, else one pass over it now. Meanwhile,
        `next_pending`'s finished chunks are taken in."""
        timeout = self.cfg.reliability.logprobs_timeout_s
        shape = tuple(batch.response_ids.shape)
        placed = place_rows(pending.logprob_parts, batch)
        if placed is None:
            results = self.on_learners("compute_logprobs", ray.put(batch), what="old log-probs",
                                       timeout=timeout, rollout=next_pending)
            return (gather_rank_rows(results, "logp", shape), gather_rank_rows(results, "entropy", shape),
                    False)
        results = [self.wait_learners(part.refs, what="old log-probs", timeout=timeout, rollout=next_pending)
                   for part in pending.logprob_parts]
        return (gather_parts(pending.logprob_parts, placed, results, shape, "logp"),
                gather_parts(pending.logprob_parts, placed, results, shape, "entropy"), True)

    def score_rows(self, batch) -> list:
        """Submit old log-probs of a chunk's rows to every learner rank (see `trainer.stream_logprobs`)."""
        return self.learners.run("compute_logprobs", ray.put(batch))

    # ---- SFT warm-up ------------------------------------------------------------------------------

    def sft_update(self, loss_name: str) -> dict:
        """One cross-entropy update on the expert trajectories of `trainer.sft_batch_prompts` prompts."""
        examples = self.sft_sampler.next_batch()
        ids = [e.id for e in examples]
        ref = self.experts.get.remote(ids, self.cfg.algorithm.experts_per_group)
        experts = self.stream.fetch_experts(ref, ids)
        stage = CalibrationStage(pad_token_id=self.tokenizer.pad_token_id, mixup="always",
                                 experts_per_group=self.cfg.algorithm.experts_per_group)
        for ex in examples:
            if experts[ex.id]:
                stage.add(Group(prompt_id=ex.id, prompt_token_ids=self.prompt_ids(ex), answer=ex.answer,
                                responses=[],
                                verdicts=[], experts=experts[ex.id], images=list(ex.images)))
        batch, _ = stage.assemble()
        train = self.on_learners("train_step", ray.put(batch), loss_name=loss_name,
                                 loss_kwargs={"agg": self.cfg.algorithm.loss_agg}, what="an SFT update",
                                 timeout=self.cfg.reliability.train_timeout_s)
        self.version += 1  # pushed to the engines when a rollout or an evaluation next reads them
        return reduce_rank_metrics(train)

    def sync_weights(self) -> dict[str, float]:
        """Push the learners' weights to every rollout engine unless they already serve them. A push
        that fails (an engine died, or the push passed `reliability.sync_timeout_s`) recovers the
        engines, which pushes again; a learner lost meanwhile stops the run."""
        if self.synced_version == self.version:
            return {}
        try:
            sync = self.weight_sync.push(self.version, timeout=self.cfg.reliability.sync_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.check_learners("the weight push")
            self.progress.line(f"[calibrl] step {self.step}: the weight push failed ({type(e).__name__}); "
                               "recovering the rollout engines")
            t0 = time.time()
            self.recover_engines()
            return {"time/sync_s": time.time() - t0}
        self.synced_version = self.version
        return sync

    def recover_engines(self, attempts: int = 3) -> None:
        """Wait until every rollout engine answers (Ray restarts a dead one with the initial weights),
        rebuild the transfer group and push the learners' current weights to all of them; an engine lost
        again meanwhile starts the round over (at most `attempts` rounds)."""
        for attempt in range(1, attempts + 1):
            self.wait_for_engines()
            try:
                self.weight_sync.reconnect(timeout=self.cfg.reliability.sync_timeout_s)
                self.weight_sync.push(self.version, timeout=self.cfg.reliability.sync_timeout_s)
                break
            except (ray.exceptions.RayError, TimeoutError) as e:
                self.check_learners("a weight push")
                if attempt == attempts:
                    raise RunStopped(f"step {self.step}: the rollout engines could not be given the current "
                                     f"weights in {attempts} rounds ({type(e).__name__}); "
                                     f"{self.resume_hint()}") from None
                self.progress.line(f"[calibrl] step {self.step}: the weight push failed again "
                                   f"({type(e).__name__}); recovering once more")
        self.synced_version = self.version
        self.engine_recoveries += 1
        self.progress.line(f"[calibrl] step {self.step}: every rollout engine serves weights version "
                           f"{self.version} again")

    def wait_for_engines(self) -> None:
        r = self.cfg.reliability
        deadline = time.time() + r.restart_timeout_s
        for i, worker in enumerate(self.rollout):
            while True:
                try:
                    ray.get(worker.info.remote(), timeout=max(1.0, deadline - time.time()))
                    break
                except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                    if time.time() > deadline:
                        raise RunStopped(self.lost_engine_message(i, "it is still restarting")) from None
                    time.sleep(1.0)
                except (ray.exceptions.RayError, TimeoutError) as e:
                    raise RunStopped(self.lost_engine_message(i, type(e).__name__)) from None

    def lost_engine_message(self, index: int, why: str) -> str:
        timeout = self.cfg.reliability.restart_timeout_s
        return (f"step {self.step}: rollout-{index} did not come back within {timeout:.0f} s "
                f"(reliability.restart_timeout_s) after it was lost ({why}); {self.resume_hint()}")

    def on_learners(self, method: str, *args, what: str, timeout: float | None = None,
                    rollout: PendingRollout | None = None, **kwargs) -> list:
        """Call `method` on every learner rank and wait, at most `timeout` seconds; a rank that dies or
        a call past its deadline stops the run naming the rank and what it was doing (ZeRO cannot go
        on without a rank: resume from the last checkpoint). Meanwhile, `rollout`'s finished chunks
        are taken in (`RolloutStream.take`)."""
        return self.wait_learners(self.learners.run(method, *args, **kwargs), what=what, timeout=timeout,
                                  rollout=rollout)

    def wait_learners(self, refs: list, *, what: str, timeout: float | None = None,
                      rollout: PendingRollout | None = None) -> list:
        """Wait for one call on every learner rank (`on_learners`' deadline and lost-rank handling),
        taking in `rollout`'s finished chunks meanwhile."""
        timeout = timeout or self.cfg.reliability.train_timeout_s
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        deadline = time.time() + timeout
        waiting = list(refs)
        while waiting:
            left = max(0.0, deadline - time.time())
            streaming = self.stream.in_flight(rollout) if rollout else []
            ready, _ = ray.wait(waiting + streaming, num_returns=1, timeout=left)
            if not ready:
                ranks = ", ".join(f"learner-{rank_of[ref]}" for ref in waiting)
                raise RunStopped(f"step {self.step}: {ranks} did not finish {what} within {timeout:.0f} s "
                                 f"(reliability deadline); {self.resume_hint()}")
            if ready[0] not in rank_of:
                self.stream.take(rollout, ready[0])
                continue
            waiting.remove(ready[0])
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                raise RunStopped(f"step {self.step}: learner-{rank_of[ready[0]]} died during {what} "
                                 f"({type(e).__name__}); {self.resume_hint()}") from None
        return ray.get(refs)

    def check_learners(self, what: str) -> None:
        """Stop the run naming any learner rank that no longer answers."""
        self.on_learners("barrier", what=f"a liveness check after {what}", timeout=60.0)

    def resume_hint(self) -> str:
        last = ckpt.resolve_resume("auto", self.out)
        where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
        return f"{where}; continue with trainer.resume=auto"

    def start_rollout(self, step: int) -> PendingRollout:
        self.sync_weights()
        self.check_engine_versions()
        return self.stream.start(step)

    def check_engine_versions(self) -> None:
        """Every engine must serve the weights last pushed before a step samples from them."""
        try:
            infos = ray.get([w.info.remote() for w in self.rollout],
                            timeout=self.cfg.reliability.sync_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:  # an engine was lost between steps
            self.progress.line(f"[calibrl] step {self.step}: a rollout engine does not answer "
                               f"({type(e).__name__}); recovering the rollout engines")
            self.recover_engines()
            infos = ray.get([w.info.remote() for w in self.rollout])
        versions = [info["weights_version"] for info in infos]
        wrong = {f"rollout-{i}": v for i, v in enumerate(versions) if v != self.synced_version}
        if wrong:
            raise RuntimeError(f"step {self.step}: rollout engines disagree on their weights: "
                               + ", ".join(f"{k} serves version {v}" for k, v in wrong.items())
                               + f", expected version {self.synced_version} everywhere")

    def check_nonfinite(self, metrics: dict) -> None:
        """Non-finite updates (not applied) are reported; `reliability.max_nonfinite_updates` in a row
        stop the run."""
        skipped = int(metrics.get("train/nonfinite_updates", 0))
        if skipped:
            self.progress.line(f"[calibrl] step {self.step}: {skipped} update(s) not applied: "
                               "non-finite loss or gradient")
        self.nonfinite = nonfinite_streak(self.nonfinite, metrics)
        limit = self.cfg.reliability.max_nonfinite_updates
        if self.nonfinite >= limit:
            raise RunStopped(f"step {self.step}: {self.nonfinite} updates in a row had a non-finite loss or "
                             f"gradient (reliability.max_nonfinite_updates={limit}); none was applied. "
                             f"{self.resume_hint()}")

    def check_staleness(self, batch) -> None:
        """No trained sample may come from weights more than `trainer.max_staleness` versions behind
        the learner's."""
        on_policy = batch.weights_version[~batch.is_expert]
        if len(on_policy) == 0:
            return
        oldest = int(on_policy.min())
        if self.version - oldest > self.cfg.trainer.max_staleness:
            raise RuntimeError(f"step {self.step}: a sample came from weights version {oldest}, "
                               f"{self.version - oldest} behind the learner's {self.version}; "
                               f"trainer.max_staleness={self.cfg.trainer.max_staleness}")

    def prompt_ids(self, ex: Example) -> list[int]:
        if ex.id not in self.prompt_ids_cache:
            self.prompt_ids_cache[ex.id] = prompt_token_ids(self.tokenizer, ex.prompt, ex.images,
                                                            **self.image_kwargs)
        return self.prompt_ids_cache[ex.id]

    # ---- metrics, evaluation, checkpoints -----------------------------------------------------------

    def loss_kwargs(self) -> dict:
        a = self.cfg.algorithm
        kw = {"clip_low": a.clip_low, "clip_high": a.clip_high, "clip_ratio_c": a.clip_ratio_c,
              "alpha": a.alpha,
              "lam": a.calibration_coef, "baseline": a.baseline, "calib_weight": a.calib_weight,
              "no_expert_baseline": a.no_expert_baseline, "agg": a.loss_agg, "entropy_coef": a.entropy_coef,
              "kl_coef": a.kl_coef, "diagnostics": True}
        if a.loss_agg == "seq-mean-token-sum-norm":
            kw["norm_length"] = self.cfg.rollout.max_response_length
        return kw

    def log_rollouts(self, batch, per_step: int = 2) -> None:
        """rollouts.jsonl: the step's prompt ids and the first responses, decoded, with their rewards."""
        on_policy = [i for i in range(len(batch)) if not batch.is_expert[i]]
        record = {"step": self.step, "prompt_ids": list(dict.fromkeys(batch.row_prompt_id)),
                  "samples": [{"prompt_id": batch.row_prompt_id[i], "reward": float(batch.rewards[i]),
                               "response": self.tokenizer.decode(
                                   batch.response_ids[i][batch.response_mask[i]])}
                              for i in on_policy[:per_step]]}
        with open(os.path.join(self.out, "rollouts.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate_now(self) -> dict:
        """Held-out metrics of every val file; the fraction of prompts whose greedy answer changed since
        the last evaluation (`val/greedy_changed_frac`); after an SFT warm-up, the paired accuracy gain
        over it on the same prompts with a 95% interval (`val/gain_vs_sft`, `val/gain_vs_sft_ci95`)."""
        t = self.cfg.trainer
        self.sync_weights()
        self.check_engine_versions()
        out, greedy = {}, {}
        sets = {path: examples[: t.eval_max_prompts or None] for path, examples in self.val_sets.items()}
        bar = self.progress.task("eval", sum(map(len, sets.values())) * (2 if t.eval_pass_k else 1), "prompt")
        for path, examples in sets.items():
            name = os.path.splitext(os.path.basename(path))[0]
            kwargs = {"pass_k": t.eval_pass_k, "temperature": self.cfg.rollout.temperature,
                      "max_tokens": self.cfg.rollout.max_response_length,
                      "seed": step_seed(t.seed, self.step), "on_progress": bar.update,
                      "timeout": self.cfg.reliability.rollout_timeout_s}
            try:
                res, texts = evaluate(self.rollout, self.verifiers, examples, **kwargs)
            except (ray.exceptions.RayActorError, TimeoutError) as e:
                # an engine or a verifier lost or hung mid-evaluation: restart them all, evaluate again
                self.progress.line(f"[calibrl] evaluation lost an actor ({type(e).__name__}); restarting "
                                   "the rollout engines and verifiers and evaluating again")
                for actor in [*self.rollout, *self.verifiers.workers]:
                    ray.kill(actor, no_restart=False)
                self.recover_engines()
                res, texts = evaluate(self.rollout, self.verifiers, examples, **kwargs)
            prefix = "val" if len(self.val_sets) == 1 else f"val/{name}"
            out |= {k.replace("val", prefix, 1): v for k, v in res.items()}
            greedy |= {f"{path}:{k}": v for k, v in texts.items()}
        if self.last_greedy:
            out["val/greedy_changed_frac"] = greedy_change_rate(
                {k: v[0] for k, v in self.last_greedy.items()}, {k: v[0] for k, v in greedy.items()})
        if self.sft_greedy:
            gain, half_width = paired_gain({k: v[1] for k, v in self.sft_greedy.items()},
                                           {k: v[1] for k, v in greedy.items()})
            out |= {"val/gain_vs_sft": gain, "val/gain_vs_sft_ci95": half_width}
        bar.close()
        first = next(iter(sets.values()), [])
        out["val/prompt_dependence"] = self.prompt_dependence(first[:PROMPT_DEPENDENCE_PROMPTS])
        self.last_greedy = greedy
        return out

    def prompt_dependence(self, examples: list[Example]) -> float:
        """How much the policy reads its prompt: the log-prob of each held-out expert trajectory under
        its own prompt minus under the next example's prompt, per token (nats). About 0 for a policy
        that answers from the marginal distribution whatever it is asked; then no reward it earns
        can carry over to held-out prompts (docs/results/README.md)."""
        examples = [e for e in examples if e.experts]
        if len(examples) < 2:
            return float("nan")
        texts = [e.experts[0] for e in examples]
        experts = [ExpertTrajectory(ids, text)
                   for ids, text in zip(response_token_ids(self.tokenizer, texts), texts)]
        totals = []
        for shift in (0, 1):
            stage = CalibrationStage(pad_token_id=self.tokenizer.pad_token_id, mixup="always")
            for i, (e, expert) in enumerate(zip(examples, experts)):
                prompt = examples[(i + shift) % len(examples)]
                stage.add(Group(prompt_id=e.id, prompt_token_ids=self.prompt_ids(prompt), answer=e.answer,
                                responses=[], verdicts=[], experts=[expert], images=list(prompt.images)))
            batch, _ = stage.assemble()
            results = self.on_learners("compute_logprobs", ray.put(batch), what="prompt-dependence log-probs",
                                       timeout=self.cfg.reliability.logprobs_timeout_s)
            logp = gather_rank_rows(results, "logp", tuple(batch.response_ids.shape))
            totals.append(float(logp[batch.response_mask].sum()))
        return (totals[0] - totals[1]) / sum(len(x.token_ids) for x in experts)

    def log_eval(self, metrics: dict, *, phase: str) -> None:
        self.logger.log(self.step, metrics | {"phase": phase}, kind="eval")
        shown = {k: v for k, v in metrics.items() if k.count("/") == 1 and k != "val/prompts"}
        self.progress.line(f"[calibrl] eval at step {self.step} ({phase}): "
                           + " ".join(f"{k}={v:.3f}" for k, v in shown.items()))

    def log_sft(self, metrics: dict) -> None:
        self.logger.log(self.sft_step, {f"sft/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}
                        | self.memory.poll(), kind="sft")
        self.progress.advance(loss=metrics.get("loss/total", float("nan")))

    def save(self) -> str:
        tmp = ckpt.begin(self.out, self.step)
        self.on_learners("save_checkpoint", os.path.join(tmp, "learner"), what="a checkpoint")
        state = {"step": self.step, "sft_step": self.sft_step, "version": self.version,
                 "sampler": self.pending.sampler_state if self.pending else self.sampler.state_dict(),
                 "sft_sampler": self.sft_sampler.state_dict(),
                 "rng": ckpt.rng_state(), "expert_rng": ray.get(self.experts.rng_state.remote())}
        path = ckpt.commit(tmp, state=state, config_yaml=to_yaml(self.cfg), experts_dir=self.experts_dir,
                           keep=self.cfg.trainer.keep_checkpoints)
        self.progress.line(f"[calibrl] checkpoint {path}")
        return path

    def restore(self, path: str) -> None:
        state = ckpt.load_state(path)
        self.on_learners("load_checkpoint", os.path.join(path, "learner"), what="loading a checkpoint")
        self.step, self.sft_step, self.version = state["step"], state["sft_step"], state["version"]
        self.sampler.load_state_dict(state["sampler"])
        self.sft_sampler.load_state_dict(state["sft_sampler"])
        ckpt.set_rng_state(state["rng"])
        if "expert_rng" in state:
            ray.get(self.experts.set_rng_state.remote(state["expert_rng"]))
        self.logger.truncate_after(self.step, self.sft_step)
        self.synced_version = -1  # the engines serve the initial weights: push before they next read
        self.progress.line(f"[calibrl] resumed from {path} at step {self.step}")

    def shutdown(self) -> None:
        """Stop every actor of this run (their names become free for the next run in this cluster)."""
        self.weight_sync.close()
        self.logger.close()
        self.learners.shutdown()
        self.verifiers.shutdown()
        for actor in [*self.rollout, self.experts]:
            ray.kill(actor)
        deadline = time.time() + 30
        ours = {f"rollout-{i}" for i in range(len(self.rollout))} | {"expert-store"}
        while time.time() < deadline and ours & {a["name"]
                                                 for a in ray.util.list_named_actors(all_namespaces=True)}:
            time.sleep(0.2)


def oversubscribed(cfg: Config) -> bool:
    """A local run whose engines and learners, working at once (streamed old log-probs), would hold
    more threads than the machine has cores (Ray gives each actor as many threads as its CPUs)."""
    r, ln = cfg.rollout, cfg.learner
    per_engine, per_learner = max(1, int(r.num_cpus_per_worker)), max(1, int(ln.num_cpus_per_learner))
    threads = r.num_workers * per_engine + ln.num_learners * per_learner
    return (cfg.trainer.stream_logprobs and cfg.trainer.ray_address is None and not ray.is_initialized()
            and max(per_engine, per_learner) > 1 and threads > (os.cpu_count() or 1))


def train(cfg: Config) -> dict:
    """Run `cfg` to `trainer.total_steps`; SIGTERM or Ctrl-C stop it at the next step boundary with a
    checkpoint (exit status 0), from which `trainer.resume=auto` continues."""
    trainer = Trainer(cfg)
    previous = {sig: signal.signal(sig, trainer.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return trainer.fit()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.shutdown()
