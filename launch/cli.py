"""`calibrl` command line.

    calibrl train CONFIG.yaml [MORE.yaml ...] [key=value ...]   train (joins a running Ray cluster if any)
    calibrl submit CONFIG.yaml [...] [--address URL] [--follow]  the same as a Ray job on a cluster
    calibrl eval CHECKPOINT_OR_MODEL --data FILE.parquet [...]    greedy accuracy, pass@k, format rate, length
    calibrl compare CONFIG.yaml [...] --variants calibrl,grpo --seeds 0,1,2 [--out DIR]
                                                                  methods x seeds from a shared SFT start
    calibrl report RUN_DIR                                        PNG plots + summary.md
    calibrl plan CONFIG.yaml [...] --cluster FILE|ray              placement and memory per GPU, or why not
    calibrl make-demo-data OUT_DIR                                tiny local models + synthetic parquet splits
    calibrl demo [key=value ...]                                  the CPU demo: data, CalibRL training, report

`--verbose` (train, compare, demo) puts every process's output on the console, as
`trainer.log_level=debug` does; by default third-party output goes to RUN_DIR/logs/.

Bad input (a config key, value or file; a model directory; a data file or row) ends in one message
naming it and exit status 2; a run that cannot go on (a lost learner, ...) in one message and exit
status 1. `--debug` (or CALIBRL_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

DEMO_ROOT = "runs/demo"
DEMO_CONFIG = "configs/cpu_demo.yaml"


def make_demo_data(root: str = DEMO_ROOT, *, n_train: int = 2000, n_val: int = 256, n_test: int = 256,
                   seed: int = 0) -> dict[str, str]:
    """Tiny models under ROOT/tiny-models and synthetic splits under ROOT/data (skips what exists)."""
    from transformers.utils import logging as hf_logging

    from calibrl.data.synthetic import write_splits
    from calibrl.tiny_models import make_all

    hf_logging.disable_progress_bar()  # "Writing model shards" bars: not the user's business
    paths = make_all(os.path.join(root, "tiny-models"))
    data_dir = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data_dir, "test.parquet")):
        # single-digit arithmetic: after the SFT warm-up the tiny model is right on ~10% of held-out
        # prompts and samples the right answer on ~30%, a signal RL can use (the image-counting
        # tasks leave the tiny vision tower blind: see docs/results/README.md)
        write_splits(data_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, multimodal=False,
                     difficulty=1)
    paths |= {split: os.path.join(data_dir, f"{split}.parquet") for split in ("train", "val", "test")}
    return paths


def cmd_train(args: list[str]) -> None:
    from calibrl.config import load_config, split_config_args
    from launch.train import train

    configs, overrides = split_config_args(args)
    if not configs:
        raise SystemExit("calibrl train: give a CONFIG.yaml (see configs/)")
    train(load_config(configs, overrides))


def cmd_eval(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="calibrl eval")
    ap.add_argument("checkpoint", help="a checkpoint directory (step_N) or a model directory")
    ap.add_argument("--data", nargs="+", required=True, help="parquet files to evaluate on")
    ap.add_argument("--pass-k", type=int, default=4)
    ap.add_argument("--max-prompts", type=int, default=0, help="0 = all")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = ap.parse_args(argv)

    import ray

    from actors.rollout import RolloutWorker
    from actors.verifier import VerifierPool
    from calibrl.config import load_config
    from calibrl.data import load_examples
    from launch.cluster import connect_ray
    from launch.evaluate import evaluate

    model = os.path.join(args.checkpoint, "learner", "hf")
    model = model if os.path.isdir(model) else args.checkpoint
    cfg = load_config(None, [f"model.path={model}"])
    connect_ray(None, num_cpus=max(os.cpu_count() or 1, 3))
    workers = RolloutWorker.from_config(cfg, name_prefix="rollout-eval")
    verifiers = VerifierPool.from_config(cfg, name_prefix="verifier-eval")
    results = {}
    for path in args.data:
        examples, _ = load_examples([path])
        examples = examples[: args.max_prompts or None]
        results[path], _ = evaluate(workers, verifiers, examples, pass_k=args.pass_k, temperature=1.0,
                                    max_tokens=args.max_tokens)
        print(f"{path}: " + " ".join(f"{k}={v:.3f}" for k, v in results[path].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    ray.shutdown()


def cmd_report(argv: list[str]) -> None:
    from launch.report import write_report

    if len(argv) != 1:
        raise SystemExit("usage: calibrl report RUN_DIR")
    print(write_report(argv[0]))


def cmd_demo(argv: list[str]) -> None:
    """The CPU demo: tiny VL model + synthetic arithmetic task, SFT warm-up then CalibRL, then the report."""
    from calibrl.config import load_config, split_config_args
    from launch.memory import last_memory, peak_line
    from launch.metrics import read_metrics
    from launch.report import write_report
    from launch.train import train

    t0 = time.time()
    print("[demo] building the tiny vision-language model and the synthetic task (local, seeded)", flush=True)
    make_demo_data()
    cfg = load_config([DEMO_CONFIG], split_config_args(argv)[1])
    if cfg.trainer.resume == "never" and os.path.isdir(cfg.trainer.output_dir):
        # the demo is one fixed recipe: each `make demo` is a fresh run in a clean directory
        shutil.rmtree(cfg.trainer.output_dir)
    print(f"[demo] training: {cfg.trainer.sft_warmup_steps} SFT warm-up steps, then "
          f"{cfg.trainer.total_steps} "
          f"CalibRL steps; metrics in {cfg.trainer.output_dir} (TensorBoard: tensorboard --logdir "
          f"{cfg.trainer.output_dir}/tensorboard)", flush=True)
    train(cfg)
    summary = write_report(cfg.trainer.output_dir)
    records = read_metrics(cfg.trainer.output_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    start, end = evals[0], evals[-1]
    sft = next((r for r in evals if r.get("phase") == "after SFT warm-up"), start)
    gain = ""
    if "val/gain_vs_sft" in end:
        gain = f" ({end['val/gain_vs_sft']:+.3f} ± {end['val/gain_vs_sft_ci95']:.3f}, paired 95% interval)"
    print(f"[demo] report: {summary}", flush=True)
    print(f"[demo] held-out greedy accuracy on {int(end.get('val/prompts', 0))} prompts: "
          f"{start.get('val/accuracy', 0.0):.3f} at the start -> "
          f"{sft.get('val/accuracy', 0.0):.3f} after SFT -> "
          f"{end.get('val/accuracy', 0.0):.3f} after RL{gain}; {time.time() - t0:.0f} s", flush=True)
    print(f"[demo] peak resident memory per process, GB: {peak_line(last_memory(records))}", flush=True)


def cmd_submit(argv: list[str]) -> None:
    from launch.submit import main

    main(argv)


def cmd_compare(argv: list[str]) -> None:
    from launch.compare import main

    main(argv)


def cmd_plan(argv: list[str]) -> None:
    from launch.plan import main

    main(argv)


def cmd_make_demo_data(argv: list[str]) -> None:
    print(json.dumps(make_demo_data(*(argv[:1] or [DEMO_ROOT])), indent=2))


COMMANDS = {"train": cmd_train, "submit": cmd_submit, "compare": cmd_compare, "eval": cmd_eval,
            "report": cmd_report, "demo": cmd_demo, "plan": cmd_plan, "make-demo-data": cmd_make_demo_data}


def _demo_hint(err: Exception) -> str:
    """Where a missing input is one of the demo's (configs/cpu_demo.yaml reads them from DEMO_ROOT),
    how to build it."""
    problems = getattr(err, "problems", [])
    if any(f"'{DEMO_ROOT}/" in p and ("no such" in p) for p in problems):
        return (f"\n{DEMO_ROOT}/ holds the demo's local model and data: `calibrl make-demo-data` (or "
                "`make demo`) builds them")
    return ""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(2 if argv and argv[0] not in ("-h", "--help") else 0)
    command, rest = argv[0], argv[1:]
    debug = "--debug" in rest or os.environ.get("CALIBRL_DEBUG") == "1"
    rest = [a for a in rest if a != "--debug"]
    if "--verbose" in rest and command in ("train", "submit", "compare", "demo"):
        rest = [a for a in rest if a != "--verbose"] + ["trainer.log_level=debug"]
    from calibrl.config import ConfigError
    from calibrl.data.errors import DataError
    from launch.errors import PlanError, RunStopped

    try:
        COMMANDS[command](rest)
    except (ConfigError, DataError, PlanError, RunStopped) as e:
        if debug:
            raise
        print(f"calibrl {command}: {e}{_demo_hint(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(e, RunStopped) else 2) from None


if __name__ == "__main__":
    main()
