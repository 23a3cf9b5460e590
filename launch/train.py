"""The driver: `calibrl train CONFIG [CONFIG ...] [key=value ...]` (also `python -m launch.train`).

One training step, top to bottom (`Trainer.step`):

    sample prompts -> rollout requests to the vLLM workers -> as each request completes
    (ray.wait), verify its groups and fetch their experts -> calibration stage -> learner old
    log-probs -> train -> sync weights to every rollout worker -> log -> checkpoint

DAPO's dynamic sampling draws more prompts until the batch holds enough informative groups (at
most `algorithm.max_sampling_rounds` rounds). With `trainer.one_step_off`, step t+1's rollouts
are submitted before step t trains, so sampling overlaps learning; every sample carries its
weights version and the staleness (at most 1) is logged. SFT warm-up steps on expert
trajectories run first when `trainer.sft_warmup_steps` > 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from actors.expert_store import create_expert_store
from actors.group import ActorGroup, named_actor
from actors.learner import Learner, gather_rank_rows
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from actors.verifier import VerifierPool
from actors.weight_sync import WEIGHT_SYNCS
from calibrl.algo import CalibrationStage, Group, attach_expert_logprobs
from calibrl.config import Config, load_config, to_yaml, validate
from calibrl.data import PromptSampler, load_examples
from calibrl.data.schema import Example
from calibrl.inputs import prompt_token_ids
from launch import checkpoint as ckpt
from launch.evaluate import evaluate
from launch.metrics import MetricsLogger

# methods whose expert row joins the group baseline / methods that train without expert rows
EXPERT_IN_BASELINE = {"luffy", "rlplus"}
NO_EXPERT_ROWS = {"grpo", "drgrpo", "dapo", "sft_grpo"}


def connect_ray(address: str | None, *, num_cpus: int) -> None:
    """Join `address` (trainer.ray_address) or $RAY_ADDRESS (set by `ray job submit`); otherwise start a
    local cluster. A cluster merely running on the machine is not joined uninvited."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        print(f"[calibrl] joined the Ray cluster at {address}", file=sys.stderr)
        return
    ray.init(num_cpus=num_cpus, runtime_env=env, include_dashboard=os.environ.get("CALIBRL_DASHBOARD", "1") == "1")
    print(f"[calibrl] started a local Ray cluster ({num_cpus} logical CPUs)", file=sys.stderr)


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`: a resumed run draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step) % (2**31)


@dataclass
class PendingRollout:
    """One step's rollout in flight: request chunks submitted, groups streamed into `stage`."""

    step: int
    stage: CalibrationStage
    refs: dict  # ObjectRef -> list[Example]
    rounds: int
    prompts_drawn: int
    sampler_state: dict
    """The prompt sampler's state before this rollout drew: a checkpoint taken while it is in
    flight resumes by drawing these prompts again."""
    verify_s: float = 0.0
    verify_timeouts: int = 0
    verify_errors: int = 0


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = validate(cfg)
        c = cfg
        self.out = c.trainer.output_dir
        os.makedirs(self.out, exist_ok=True)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(c.model.path)
        self.image_kwargs = dict(min_pixels=c.model.image_min_pixels, max_pixels=c.model.image_max_pixels)

        # data: validated at the edge, bad rows named (or skipped and counted)
        def prompt_length(ex: Example) -> int:
            return len(prompt_token_ids(self.tokenizer, ex.prompt, ex.images, **self.image_kwargs))

        read = dict(expert_key=c.data.expert_key, max_images=c.data.max_images_per_prompt,
                    max_prompt_length=c.data.max_prompt_length, on_bad_row=c.data.on_bad_row,
                    batch_rows=c.data.read_batch_rows, prompt_length=prompt_length)
        self.train_examples, report = load_examples(c.data.train_files, **read)
        self.val_sets = {path: load_examples([path], **read)[0] for path in c.data.val_files}
        if report.rows_skipped:
            print(f"[calibrl] data: {report.summary()}", file=sys.stderr)
        self.sampler = PromptSampler(self.train_examples, c.trainer.prompts_per_step, seed=c.trainer.seed,
                                     shuffle=c.data.shuffle)
        self.sft_sampler = PromptSampler(self.train_examples, c.trainer.sft_batch_prompts, seed=c.trainer.seed + 1,
                                         shuffle=c.data.shuffle)
        self.prompt_ids_cache: dict[str, list[int]] = {}

        # resume: restore the expert additions before the store starts
        self.resume_from = ckpt.resolve_resume(c.trainer.resume, self.out)
        self.experts_dir = os.path.join(self.out, "experts")
        if self.resume_from:
            ckpt.restore_expert_additions(self.resume_from, self.experts_dir)

        # actors, named for the Ray dashboard
        r, ln = c.rollout, c.learner
        gpu = torch.cuda.is_available()
        self.rollout = [named_actor(RolloutWorker, f"rollout-{i}", num_cpus=r.num_cpus_per_worker,
                                    num_gpus=r.tensor_parallel_size if gpu else 0, model_path=c.model.path,
                                    dtype=c.model.dtype, max_model_len=c.model.max_model_len,
                                    kv_cache_memory_mib=r.kv_cache_memory_mib,
                                    tensor_parallel_size=r.tensor_parallel_size,
                                    gpu_memory_utilization=r.gpu_memory_utilization,
                                    max_images_per_prompt=c.data.max_images_per_prompt,
                                    image_min_pixels=c.model.image_min_pixels,
                                    image_max_pixels=c.model.image_max_pixels,
                                    weight_sync=r.weight_sync, seed=c.trainer.seed + i)
                        for i in range(r.num_workers)]
        self.verifiers = VerifierPool.from_config(c.verifier, num_cpus_per_worker=0.5)
        self.experts = create_expert_store(c)
        updates_per_step = (c.trainer.prompts_per_step // ln.mini_batch_prompts) * ln.ppo_epochs
        self.learners = ActorGroup(
            Learner, ln.num_learners, name_prefix="learner", num_cpus_per_actor=ln.num_cpus_per_learner,
            num_gpus_per_actor=1 if gpu else 0, model_path=c.model.path, zero_stage=ln.zero_stage, lr=ln.lr,
            weight_decay=ln.weight_decay, grad_clip=ln.grad_clip, lr_warmup_steps=ln.lr_warmup_steps * updates_per_step,
            lr_schedule=ln.lr_schedule, total_updates=c.trainer.total_steps * updates_per_step,
            micro_batch_per_device=ln.micro_batch_per_device, gradient_checkpointing=c.model.gradient_checkpointing,
            optimizer=ln.optimizer, seed=c.trainer.seed)
        self.weight_sync = WEIGHT_SYNCS[r.weight_sync](self.learners, self.rollout)
        self.logger = MetricsLogger(self.out, total_steps=c.trainer.total_steps)
        self.step = 0
        self.sft_step = 0
        self.version = 0
        self.pending: PendingRollout | None = None  # a rollout in flight (one-step-off mode)

    # ---- the training loop ---------------------------------------------------------------------

    def fit(self) -> dict:
        c = self.cfg.trainer
        if self.resume_from:
            self.restore(self.resume_from)
        else:
            self.log_eval(self.evaluate_now(), phase="start")  # the starting point, for the report
        if self.sft_step < c.sft_warmup_steps:
            ray.get(self.learners.run("set_lr", self.cfg.learner.sft_lr or self.cfg.learner.lr))
            while self.sft_step < c.sft_warmup_steps:
                self.sft_step += 1
                self.log_sft(self.sft_update())
            ray.get(self.learners.run("set_lr", self.cfg.learner.lr))
            self.log_eval(self.evaluate_now(), phase="after SFT warm-up")
        if self.resume_from and self.step >= c.total_steps:
            raise RuntimeError(f"{self.resume_from} is at step {self.step}, and trainer.total_steps={c.total_steps}: "
                               "nothing left to train. Raise trainer.total_steps to continue this run.")
        while self.step < c.total_steps:
            self.step += 1
            if self.cfg.algorithm.name == "sft":  # the SFT baseline: expert trajectories only, no rollouts
                self.logger.log(self.step, self.sft_update())
            else:
                # synchronous mode samples here; one-step-off mode already started it during the last step
                self.pending = self.train_step(self.pending or self.start_rollout(self.step))
            if c.eval_every_steps and self.step % c.eval_every_steps == 0 and self.step < c.total_steps:
                self.log_eval(self.evaluate_now(), phase="periodic")
            if c.save_every_steps and self.step % c.save_every_steps == 0 and self.step < c.total_steps:
                self.save()
        final = self.evaluate_now()
        self.log_eval(final, phase="final")
        self.save()
        return final

    def train_step(self, pending: PendingRollout) -> PendingRollout | None:
        """One RL step; returns the next step's rollout if one-step-off mode started it before training."""
        c, a = self.cfg, self.cfg.algorithm
        t0 = time.time()
        batch, metrics = self.finish_rollout(pending)
        t_rollout = time.time()
        if len(batch) == 0:  # dynamic sampling found no informative group within its rounds
            print(f"[calibrl] step {self.step}: no informative group after {metrics['sampling/rounds']} sampling "
                  "rounds; no update this step", file=sys.stderr, flush=True)
            self.logger.log(self.step, metrics | {"sampling/skipped_step": 1.0})
            return None
        one_step_off = c.trainer.one_step_off and self.step < c.trainer.total_steps
        next_pending = self.start_rollout(self.step + 1) if one_step_off else None

        # old log-probs of every row (experts included) -> each row's expert baseline
        batch_ref = ray.put(batch)
        results = ray.get(self.learners.run("compute_logprobs", batch_ref))
        shape = tuple(batch.response_ids.shape)
        attach_expert_logprobs(batch, gather_rank_rows(results, "logp", shape))
        entropy = gather_rank_rows(results, "entropy", shape)
        t_logp = time.time()

        train = ray.get(self.learners.run("train_step", ray.put(batch), loss_name=a.name,
                                          loss_kwargs=self.loss_kwargs(),
                                          mini_batches=c.trainer.prompts_per_step // c.learner.mini_batch_prompts,
                                          epochs=c.learner.ppo_epochs))
        t_train = time.time()
        metrics |= self.batch_metrics(batch, entropy)  # staleness against the weights that just trained
        self.version += 1
        sync = self.weight_sync.push(self.version)

        metrics |= sum_over_ranks(train)
        metrics |= sync
        self.log_rollouts(batch)
        metrics |= {"time/rollout_s": t_rollout - t0 - metrics.get("time/verify_s", 0.0),
                    "time/logprobs_s": t_logp - t_rollout, "time/train_s": t_train - t_logp,
                    "time/step_s": time.time() - t0,
                    "perf/tokens_per_s": float(batch.response_length.sum()) / max(time.time() - t0, 1e-9)}
        self.logger.log(self.step, metrics)
        self.logger.console(self.step, metrics, {"reward": "reward/mean", "acc": "acc/mean", "calib": "loss/calib",
                                                 "entropy": "policy/entropy", "s/step": "time/step_s"})
        return next_pending

    # ---- rollout, streamed into the calibration stage ----------------------------------------------

    def start_rollout(self, step: int) -> PendingRollout:
        a = self.cfg.algorithm
        stage = CalibrationStage(
            pad_token_id=self.tokenizer.pad_token_id,
            mixup="never" if (a.name in NO_EXPERT_ROWS or step <= a.expert_warmup_steps) else a.mixup,
            mix_ratio=a.mix_ratio, pass_low=a.pass_low, pass_high=a.pass_high, experts_per_group=a.experts_per_group,
            expert_in_baseline=a.name in EXPERT_IN_BASELINE, std_normalize=a.std_normalize,
            dynamic_sampling=a.dynamic_sampling, max_response_length=self.cfg.rollout.max_response_length,
            overlong_buffer_tokens=a.overlong_buffer_tokens, overlong_penalty=a.overlong_penalty,
            seed=step_seed(self.cfg.trainer.seed, step))
        pending = PendingRollout(step=step, stage=stage, refs={}, rounds=0, prompts_drawn=0,
                                 sampler_state=self.sampler.state_dict())
        self.submit_round(pending)
        return pending

    def submit_round(self, pending: PendingRollout) -> None:
        """Sample prompts_per_step prompts and send them, in chunks, round-robin to the workers."""
        r = self.cfg.rollout
        examples = self.sampler.next_batch()
        seed0 = step_seed(self.cfg.trainer.seed, pending.step) * 1000 + pending.prompts_drawn
        sampling = SamplingSpec(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                                max_tokens=r.max_response_length)
        chunk = max(1, r.stream_chunk_prompts)
        for k, start in enumerate(range(0, len(examples), chunk)):
            part = examples[start:start + chunk]
            requests = [RolloutRequest(prompt_id=e.id, prompt=e.prompt, images=list(e.images), seed=seed0 + start + j)
                        for j, e in enumerate(part)]
            worker = self.rollout[k % len(self.rollout)]
            pending.refs[worker.generate.remote(requests, sampling)] = part
        pending.rounds += 1
        pending.prompts_drawn += len(examples)

    def finish_rollout(self, pending: PendingRollout) -> tuple:
        """Stream completed requests into the calibration stage; refill under dynamic sampling."""
        a, c = self.cfg.algorithm, self.cfg
        stage = pending.stage
        while pending.refs:
            done, _ = ray.wait(list(pending.refs), num_returns=1)
            examples = pending.refs.pop(done[0])
            results = ray.get(done[0])
            t = time.time()
            texts = [s.text for res in results for s in res.samples]
            answers = [ex.answer for ex, res in zip(examples, results) for _ in res.samples]
            verdict_ref = self.verifiers.workers[len(pending.refs) % len(self.verifiers.workers)].score.remote(
                list(zip(texts, answers)))
            experts_ref = self.experts.get.remote([ex.id for ex in examples], a.experts_per_group)
            verdicts, verify_metrics = ray.get(verdict_ref)
            pending.verify_timeouts += verify_metrics["timeouts"]
            pending.verify_errors += verify_metrics["errors"]
            experts = ray.get(experts_ref)
            pending.verify_s += time.time() - t
            i = 0
            for ex, res in zip(examples, results):
                n = len(res.samples)
                stage.add(Group(prompt_id=ex.id, prompt_token_ids=res.prompt_token_ids, answer=ex.answer,
                                responses=res.samples, verdicts=verdicts[i:i + n], experts=experts[ex.id],
                                images=list(ex.images)))
                i += n
            if (not pending.refs and a.dynamic_sampling and stage.num_informative < c.trainer.prompts_per_step
                    and pending.rounds < a.max_sampling_rounds):
                self.submit_round(pending)
        t = time.time()
        batch, stage_metrics = stage.assemble(max_groups=c.trainer.prompts_per_step)
        metrics = {f"calib/{k}": v for k, v in stage_metrics.items()}
        metrics |= {"reward/mean": stage_metrics["reward_mean"], "acc/mean": stage_metrics["accuracy"],
                    "acc/pass_rate": stage_metrics["pass_rate"],
                    "groups/all_pass_frac": stage_metrics["groups_all_pass"] / max(stage_metrics["groups_added"], 1),
                    "groups/all_fail_frac": stage_metrics["groups_all_fail"] / max(stage_metrics["groups_added"], 1),
                    "sampling/rounds": pending.rounds, "sampling/prompts_drawn": pending.prompts_drawn,
                    "verify/timeouts": pending.verify_timeouts, "verify/errors": pending.verify_errors,
                    "time/verify_s": pending.verify_s, "time/calibrate_s": time.time() - t}
        return batch, metrics

    # ---- SFT warm-up ------------------------------------------------------------------------------

    def sft_update(self) -> dict:
        examples = self.sft_sampler.next_batch()
        experts = ray.get(self.experts.get.remote([e.id for e in examples], self.cfg.algorithm.experts_per_group))
        stage = CalibrationStage(pad_token_id=self.tokenizer.pad_token_id, mixup="always",
                                 experts_per_group=self.cfg.algorithm.experts_per_group)
        for ex in examples:
            if experts[ex.id]:
                stage.add(Group(prompt_id=ex.id, prompt_token_ids=self.prompt_ids(ex), answer=ex.answer, responses=[],
                                verdicts=[], experts=experts[ex.id], images=list(ex.images)))
        batch, _ = stage.assemble()
        train = ray.get(self.learners.run("train_step", ray.put(batch), loss_name="sft",
                                          loss_kwargs={"agg": self.cfg.algorithm.loss_agg}))
        self.version += 1
        return sum_over_ranks(train) | self.weight_sync.push(self.version)

    def prompt_ids(self, ex: Example) -> list[int]:
        if ex.id not in self.prompt_ids_cache:
            self.prompt_ids_cache[ex.id] = prompt_token_ids(self.tokenizer, ex.prompt, ex.images, **self.image_kwargs)
        return self.prompt_ids_cache[ex.id]

    # ---- metrics, evaluation, checkpoints -----------------------------------------------------------

    def loss_kwargs(self) -> dict:
        a = self.cfg.algorithm
        kw = dict(clip_low=a.clip_low, clip_high=a.clip_high, clip_ratio_c=a.clip_ratio_c, alpha=a.alpha,
                  lam=a.calibration_coef, baseline=a.baseline, agg=a.loss_agg, entropy_coef=a.entropy_coef,
                  kl_coef=a.kl_coef)
        if a.loss_agg == "seq-mean-token-sum-norm":
            kw["norm_length"] = self.cfg.rollout.max_response_length
        return kw

    def batch_metrics(self, batch, entropy: torch.Tensor) -> dict:
        on = batch.response_mask & ~batch.is_expert.unsqueeze(-1)
        ex = batch.response_mask & batch.is_expert.unsqueeze(-1)
        staleness = (self.version - batch.weights_version[~batch.is_expert]).float()
        kl = (batch.old_logp - batch.rollout_logp)[on]
        return {"policy/entropy": float(entropy[on].mean()) if on.any() else 0.0,
                "policy/expert_entropy": float(entropy[ex].mean()) if ex.any() else 0.0,
                "policy/rollout_vs_learner_logp_gap": float(kl.abs().mean()) if on.any() else 0.0,
                "policy/expert_minus_policy_logp": float(batch.expert_old_logp[on].mean()
                                                         - batch.old_logp[on].mean()) if on.any() else 0.0,
                "response/length_mean": float(batch.response_length[~batch.is_expert].float().mean()),
                "weights/staleness_max": float(staleness.max()) if staleness.numel() else 0.0,
                "weights/staleness_mean": float(staleness.mean()) if staleness.numel() else 0.0}

    def log_rollouts(self, batch, per_step: int = 2) -> None:
        """rollouts.jsonl: the step's prompt ids and the first responses, decoded, with their rewards."""
        on_policy = [i for i in range(len(batch)) if not batch.is_expert[i]]
        record = {"step": self.step, "prompt_ids": list(dict.fromkeys(batch.row_prompt_id)),
                  "samples": [{"prompt_id": batch.row_prompt_id[i], "reward": float(batch.rewards[i]),
                               "response": self.tokenizer.decode(batch.response_ids[i][batch.response_mask[i]])}
                              for i in on_policy[:per_step]]}
        with open(os.path.join(self.out, "rollouts.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate_now(self) -> dict:
        t = self.cfg.trainer
        out = {}
        for path, examples in self.val_sets.items():
            name = os.path.splitext(os.path.basename(path))[0]
            res = evaluate(self.rollout, self.verifiers, examples[: t.eval_max_prompts or None],
                           pass_k=t.eval_pass_k, temperature=self.cfg.rollout.temperature,
                           max_tokens=self.cfg.rollout.max_response_length, seed=step_seed(t.seed, self.step))
            prefix = "val" if len(self.val_sets) == 1 else f"val/{name}"
            out |= {k.replace("val", prefix, 1): v for k, v in res.items()}
        return out

    def log_eval(self, metrics: dict, *, phase: str) -> None:
        self.logger.log(self.step, metrics | {"phase": phase}, kind="eval")
        shown = {k: v for k, v in metrics.items() if k.count("/") == 1 and k != "val/prompts"}
        print(f"[calibrl] eval at step {self.step} ({phase}): " + " ".join(f"{k}={v:.3f}" for k, v in shown.items()),
              file=sys.stderr, flush=True)

    def log_sft(self, metrics: dict) -> None:
        self.logger.log(self.sft_step, {f"sft/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}, kind="sft")
        if self.sft_step % 10 == 0 or self.sft_step == self.cfg.trainer.sft_warmup_steps:
            print(f"[calibrl] sft warm-up {self.sft_step}/{self.cfg.trainer.sft_warmup_steps} "
                  f"loss={metrics.get('loss/total', float('nan')):.3f}", file=sys.stderr, flush=True)

    def save(self) -> str:
        tmp = ckpt.begin(self.out, self.step)
        ray.get(self.learners.run("save_checkpoint", os.path.join(tmp, "learner")))
        state = {"step": self.step, "sft_step": self.sft_step, "version": self.version,
                 "sampler": self.pending.sampler_state if self.pending else self.sampler.state_dict(),
                 "sft_sampler": self.sft_sampler.state_dict(),
                 "rng": ckpt.rng_state()}
        path = ckpt.commit(tmp, state=state, config_yaml=to_yaml(self.cfg), experts_dir=self.experts_dir,
                           keep=self.cfg.trainer.keep_checkpoints)
        print(f"[calibrl] checkpoint {path}", file=sys.stderr, flush=True)
        return path

    def restore(self, path: str) -> None:
        state = ckpt.load_state(path)
        ray.get(self.learners.run("load_checkpoint", os.path.join(path, "learner")))
        self.step, self.sft_step, self.version = state["step"], state["sft_step"], state["version"]
        self.sampler.load_state_dict(state["sampler"])
        self.sft_sampler.load_state_dict(state["sft_sampler"])
        ckpt.set_rng_state(state["rng"])
        self.logger.truncate_after(self.step, self.sft_step)
        self.weight_sync.push(self.version)
        print(f"[calibrl] resumed from {path} at step {self.step}", file=sys.stderr, flush=True)

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
        while time.time() < deadline and ours & {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
            time.sleep(0.2)


def sum_over_ranks(per_rank: list[dict]) -> dict:
    """Each rank returns its share of the global loss metrics: the sum is the global value;
    timings and learning rate are the slowest / common value."""
    out: dict[str, float] = {}
    for m in per_rank:
        for k, v in m.items():
            if k.startswith("time/") or k in ("train/lr", "train/grad_norm"):
                out[k] = max(out.get(k, v), v)
            else:
                out[k] = out.get(k, 0.0) + v
    renamed = {"train/pg_loss": "loss/pg", "train/calib_loss": "loss/calib", "train/loss": "loss/total"}
    return {renamed.get(k, k): v for k, v in out.items()}


def needed_cpus(cfg: Config) -> int:
    r, ln = cfg.rollout, cfg.learner
    return int(np.ceil(r.num_workers * r.num_cpus_per_worker + ln.num_learners * ln.num_cpus_per_learner
                       + cfg.verifier.num_workers * 0.5 + 0.5)) + 1


def train(cfg: Config) -> dict:
    connect_ray(cfg.trainer.ray_address, num_cpus=max(os.cpu_count() or 1, needed_cpus(cfg)))
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


def main(argv: list[str] | None = None) -> None:
    from launch.cli import split_args

    configs, overrides = split_args(sys.argv[1:] if argv is None else argv)
    train(load_config(configs, overrides))


if __name__ == "__main__":
    main()
