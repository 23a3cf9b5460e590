"""Benchmark: the calibration stage against a per-sample Python loop, and calibrl_loss against GRPO's loss.

    .venv/bin/python benchmarks/calibration.py          # 512 groups x (15 on-policy + 1 expert) x 1024 tokens
    .venv/bin/python benchmarks/calibration.py --small  # 32 groups x (15 + 1) x 256 tokens, a few seconds

1. Calibration stage: `CalibrationStage.add` for every group + `assemble` (mixup, padding, rewards,
   group advantages, expert pointers) + `attach_expert_logprobs` (section 4's b_t for every row), against
   `benchmarks/reference_loop.py`, the same spec written as a straightforward per-sample loop. Both
   get the same groups (fastest of `--stage-repeats` alternating runs); their outputs are asserted
   equal. Run twice: token ids and log-probs as Python lists, then as numpy arrays (what a rollout
   worker can send through Ray without a copy; with lists, converting them is most of the stage's
   time).
2. Loss: forward + backward of `calibrl_loss` against `ppo_loss` (the GRPO loss, same dual clip)
   on the assembled batch's first 16 rows (one group: a learner's micro-batch), 64, 512 and all of
   them, median of alternating runs (`--repeats` for the whole batch, more for fewer rows), metrics
   included in both: first run eagerly, then fused by `compile_loss_kernels()` (what a learner does
   with `learner.compile_loss`), with the seconds the first compiled calls take.
3. The loss inside a micro-batch update at the demo's shape (16 rows x 48 response tokens after a
   64-token prompt, the tiny Qwen2 of `calibrl.tiny_models`, eager): the model's forward
   (`response_logprobs`) + each loss + backward, median of alternating runs; what the calibration
   term costs a learner, next to what it costs the loss alone at that shape.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_loop import reference_assemble, reference_attach

from calibrl.algo import (
    CalibrationStage,
    ExpertTrajectory,
    Group,
    Response,
    Verdict,
    attach_expert_logprobs,
    calibrl_loss,
    compile_loss_kernels,
    ppo_loss,
)

FIELDS = ["prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_logp", "old_logp",
          "expert_old_logp", "expert_mean_logp", "rewards", "advantages", "accuracy", "format_ok", "passed",
          "is_expert", "group_index", "has_expert", "expert_row", "response_length", "weights_version"]


def make_groups(num_groups: int, n: int, max_len: int, max_prompt: int, *, arrays: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = num_groups * (n + 1)
    lengths = rng.integers(max_len // 8, max_len + 1, size=rows)
    lengths[0] = max_len  # the padded width is max_len
    ids = rng.integers(3, 150_000, size=int(lengths.sum()))
    logp = (-3 * rng.random(int(lengths.sum()))).astype(np.float32)
    cuts = np.cumsum(lengths)[:-1]
    ids_rows, logp_rows = np.split(ids, cuts), np.split(logp, cuts)
    if not arrays:
        ids_rows = [r.tolist() for r in ids_rows]
        logp_rows = [r.tolist() for r in logp_rows]
    groups = []
    for g in range(num_groups):
        base = g * (n + 1)
        acc = rng.random(n) < rng.random()
        fmt = rng.random(n) < 0.9
        verdicts = [Verdict(reward=float(a) + 0.1 * float(f), accuracy=float(a), format_ok=bool(f),
                            passed=float(a) + 0.1 * float(f) > 0.1) for a, f in zip(acc, fmt)]
        responses = [Response(token_ids=ids_rows[base + i], logprobs=logp_rows[base + i], text="",
                              finish_reason="length" if lengths[base + i] == max_len else "stop")
                     for i in range(n)]
        prompt = rng.integers(3, 150_000, size=int(rng.integers(max_prompt // 4, max_prompt + 1)))
        groups.append(Group(prompt_id=f"p{g}", prompt_token_ids=prompt.tolist() if not arrays else prompt,
                            answer="1", responses=responses, verdicts=verdicts,
                            experts=[ExpertTrajectory(token_ids=ids_rows[base + n], text="")]))
    return groups


STAGE_KW = {"pad_token_id": 0, "mixup": "random", "mix_ratio": 1.0, "std_normalize": False, "seed": 0}


def run_stage(groups, old_logp):
    stage = CalibrationStage(**STAGE_KW)
    for g in groups:
        stage.add(g)
    batch, _ = stage.assemble()
    return attach_expert_logprobs(batch, old_logp)


def run_reference(groups, old_logp):
    return reference_attach(reference_assemble(groups, **STAGE_KW), old_logp)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def alternating_times(fns, repeats: int, pick=min) -> list[float]:
    """`pick` (fastest by default) of `repeats` runs of each fn, run alternately (other processes
    share the cores), after a warm-up round."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [pick(ts) for ts in times]


def loss_times(batch, logp0, adv, rows: int, repeats: int) -> tuple[float, float]:
    """Median seconds of calibrl_loss and ppo_loss forward + backward over the batch's first `rows`
    rows, metrics included in both, given the normalisers as a learner gives them, run alternately."""
    old, mask, expert = batch.old_logp[:rows], batch.response_mask[:rows], batch.is_expert[:rows]
    # the whole (mini-)batch's counts, as a learner passes them (both losses average over on-policy rows)
    on_policy = mask & ~expert.unsqueeze(-1)
    norms = {"global_tokens": float(on_policy.sum()), "global_seqs": float(on_policy.any(-1).sum())}

    def calib():
        logp = logp0[:rows].clone().requires_grad_()
        loss, _ = calibrl_loss(logp, old, adv[:rows], mask, expert, batch.passed[:rows],
                               batch.expert_old_logp[:rows], has_expert=batch.has_expert[:rows], **norms)
        loss.backward()

    def grpo():
        logp = logp0[:rows].clone().requires_grad_()
        loss, _ = ppo_loss(logp, old, adv[:rows], mask, expert, **norms)
        loss.backward()

    calib_s, grpo_s = alternating_times([calib, grpo], repeats, statistics.median)
    return calib_s, grpo_s


def micro_batch_update(rows: int = 16, prompt_len: int = 64, response_len: int = 48, repeats: int = 100):
    """Seconds of (loss alone, model forward + loss + backward) for calibrl_loss and the GRPO loss at one
    micro-batch of the demo's shape: {"calibrl": (loss, update), "grpo": (loss, update)}."""
    from transformers import AutoModelForCausalLM

    from calibrl.modeling import response_logprobs
    from calibrl.tiny_models import make_tiny_qwen2

    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(make_tiny_qwen2(tmp), dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab - 1, (rows, prompt_len), generator=gen)
    response = torch.randint(3, vocab - 1, (rows, response_len), generator=gen)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    response_mask = torch.arange(response_len) < torch.randint(8, response_len + 1, (rows, 1), generator=gen)
    with torch.no_grad():
        old_logp, _ = response_logprobs(model, prompt, prompt_mask, response, response_mask)
    adv = torch.randn(rows, generator=gen)
    is_expert = torch.zeros(rows, dtype=torch.bool)
    is_expert[::4] = True  # a group of 3 samples + its expert
    expert_logp = old_logp - torch.rand(old_logp.shape, generator=gen)
    has_expert = torch.ones(rows, dtype=torch.bool)

    def loss_of(kind, logp):
        if kind == "calibrl":
            return calibrl_loss(logp, old_logp, adv, response_mask, is_expert, adv > 0, expert_logp,
                                has_expert=has_expert)[0]
        return ppo_loss(logp, old_logp, adv, response_mask, is_expert)[0]

    def loss_alone(kind):
        logp = old_logp.clone().requires_grad_()
        return lambda: loss_of(kind, logp).backward()

    def update(kind):
        def step():
            model.zero_grad(set_to_none=True)
            logp, _ = response_logprobs(model, prompt, prompt_mask, response, response_mask)
            loss_of(kind, logp).backward()
        return step

    median = statistics.median
    calib_loss, grpo_loss = alternating_times([loss_alone("calibrl"), loss_alone("grpo")], repeats, median)
    calib_update, grpo_update = alternating_times([update("calibrl"), update("grpo")], max(10, repeats // 5),
                                                  median)
    return {"calibrl": (calib_loss, calib_update), "grpo": (grpo_loss, grpo_update)}


def compare_stage(num_groups: int, n: int, max_len: int, max_prompt: int, *, arrays: bool, repeats: int):
    """Time the stage and the loop on the same groups; assert equal outputs.

    Returns (batch, t_stage, t_loop).
    """
    warm = make_groups(2, n, 16, 8, arrays=arrays, seed=1)  # first-call costs out of the timings
    run_stage(warm, torch.zeros(2 * (n + 1), 16))
    run_reference(warm, torch.zeros(2 * (n + 1), 16))
    groups = make_groups(num_groups, n, max_len, max_prompt, arrays=arrays)
    old_logp = -3 * torch.rand(num_groups * (n + 1), max_len, generator=torch.Generator().manual_seed(0))
    t_stage = t_loop = float("inf")
    for _ in range(repeats):  # fastest of alternating runs: other processes share the cores
        batch, t = timed(run_stage, groups, old_logp)
        t_stage = min(t_stage, t)
        ref, t = timed(run_reference, groups, old_logp)
        t_loop = min(t_loop, t)
    for name in FIELDS:
        got, want = getattr(batch, name), ref[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if got.dtype.is_floating_point:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(got, want), name
    return batch, t_stage, t_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="32 groups x 256 tokens: a quick check")
    parser.add_argument("--repeats", type=int, default=15,
                        help="loss timing repeats over the whole batch (median counts)")
    parser.add_argument("--stage-repeats", type=int, default=3,
                        help="stage / loop timing repeats (fastest counts)")
    args = parser.parse_args()
    num_groups, max_len, max_prompt = (32, 256, 64) if args.small else (512, 1024, 256)
    n = 15
    rows = num_groups * (n + 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{num_groups} groups x ({n} on-policy + 1 expert) x {max_len} tokens = {rows} rows")

    _, t_stage_lists, t_loop_lists = compare_stage(num_groups, n, max_len, max_prompt, arrays=False,
                                                 repeats=args.stage_repeats)
    batch, t_stage_arrays, t_loop_arrays = compare_stage(num_groups, n, max_len, max_prompt, arrays=True,
                                                      repeats=args.stage_repeats)

    # loss forward + backward at the batch's shapes (mixed pass/fail, experts present): its first
    # rows (16 = one group, a learner's micro-batch) up to the whole batch
    gen = torch.Generator().manual_seed(1)
    logp0 = (batch.old_logp + 0.3 * torch.randn(batch.old_logp.shape, generator=gen)).clamp(max=-1e-4)
    adv = torch.randn(rows, generator=gen)
    sizes = [(r, k * args.repeats) for r, k in ((16, 20), (64, 10), (512, 2)) if r < rows]
    sizes.append((rows, args.repeats))
    eager = {r: loss_times(batch, logp0, adv, r, n) for r, n in sizes}
    compile_loss_kernels()
    # the first compiled calls pay for compiling both losses (less where inductor's on-disk cache
    # already holds them, as after an earlier run on this machine)
    _, compile_s = timed(loss_times, batch, logp0, adv, sizes[0][0], 1)
    fused = {r: loss_times(batch, logp0, adv, r, n) for r, n in sizes}
    compile_loss_kernels(False)
    micro = micro_batch_update()

    def row(name, seconds, ratio="", target=""):
        print(f"| {name:66s} | {seconds:9.3f} | {ratio:>8s} | {target:8s} |" if seconds >= 0.01 else
              f"| {name:66s} | {seconds * 1e3:6.3f} ms | {ratio:>8s} | {target:8s} |")

    print()
    print(f"| {'measurement':66s} | {'seconds':>9s} | {'ratio':>8s} | target   |")
    print(f"|{'-' * 68}|{'-' * 11}|{'-' * 10}|----------|")
    row("ids/log-probs as Python lists: per-sample loop", t_loop_lists)
    row("ids/log-probs as Python lists: CalibrationStage + attach", t_stage_lists,
        f"{t_loop_lists / t_stage_lists:.1f}x", ">= 30x")
    row("ids/log-probs as numpy arrays: per-sample loop", t_loop_arrays)
    row("ids/log-probs as numpy arrays: CalibrationStage + attach", t_stage_arrays,
        f"{t_loop_arrays / t_stage_arrays:.1f}x", ">= 30x")
    width = batch.response_ids.shape[1]
    for kind, times in (("eager", eager), ("compiled", fused)):
        for r, _ in sizes:
            calib_s, grpo_s = times[r]
            row(f"{r} x {width} tokens, {kind}: ppo_loss (GRPO) forward+backward", grpo_s)
            row(f"{r} x {width} tokens, {kind}: calibrl_loss forward+backward", calib_s,
                f"{calib_s / grpo_s:.2f}x", "<= 1.10x")
    row("compiling both losses: their first calls after compile_loss_kernels()", compile_s)
    (calib_loss, calib_update), (grpo_loss, grpo_update) = micro["calibrl"], micro["grpo"]
    row("micro-batch (16 x 48 tokens): ppo_loss alone, eager", grpo_loss)
    row("micro-batch: calibrl_loss alone, eager", calib_loss, f"{calib_loss / grpo_loss:.2f}x")
    row("micro-batch: model forward + ppo_loss + backward", grpo_update)
    row("micro-batch: model forward + calibrl_loss + backward", calib_update,
        f"{calib_update / grpo_update:.2f}x")
    print(f"\noutputs equal ({len(FIELDS)} fields, {rows} rows x {batch.response_ids.shape[1]} tokens, "
          f"both input kinds); stage speed-up {t_loop_lists / t_stage_lists:.1f}x (lists) / "
          f"{t_loop_arrays / t_stage_arrays:.1f}x (arrays); calibrl_loss / GRPO loss at "
          f"{', '.join(str(r) for r, _ in sizes)} rows: "
          f"{', '.join(f'{eager[r][0] / eager[r][1]:.2f}x' for r, _ in sizes)} (eager), "
          f"{', '.join(f'{fused[r][0] / fused[r][1]:.2f}x' for r, _ in sizes)} (compiled); "
          f"a demo-shaped micro-batch update with calibrl_loss {calib_update / grpo_update:.2f}x "
          f"the one with GRPO's (the loss alone "
          f"{calib_loss / grpo_loss:.2f}x, {(calib_loss - grpo_loss) / grpo_update:.1%} of the update)")


if __name__ == "__main__":
    main()
