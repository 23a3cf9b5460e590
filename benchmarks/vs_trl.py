"""Benchmark: calibrl against TRL's GRPOTrainer end to end, same model, data, batch and lengths.

    .venv/bin/python benchmarks/vs_trl.py                 # tiny and ~56M models, 5 timed steps each
    .venv/bin/python benchmarks/vs_trl.py --models tiny   # the tiny model only

GRPO on both sides: 8 prompts x 8 completions of up to 64 tokens per step, one optimizer update per
step, lr 1e-6, no KL, the prompts of the demo's synthetic task scored by
benchmarks/rewards.py:odd_length, which a random model earns half the time, so both sides train on
every step (with the task's own reward a random model earns nothing, and calibrl would skip its
updates). calibrl runs its own pipeline (vLLM CPU engine, DeepSpeed learner, verifier actor, weight
transfer); TRL runs GRPOTrainer as it comes (transformers generation, no vLLM) on the same cores.
Both sides use the whole machine. TRL's one process runs torch on every core. calibrl runs as one
would configure it for each size: the tiny model with the defaults (one thread each for the engine
and the learner, old log-probs streamed during generation: threads cost more than they give at that
size); the ~56M model with every core for the engine and for the learner (`rollout.num_cpus_per_worker`
= `learner.num_cpus_per_learner` = the core count; Ray sets each actor's OMP threads to its CPUs)
and phases that take turns (`trainer.stream_logprobs=false`: streamed old log-probs would run two
busy OpenMP teams on the same cores, which made a tiny-model step 25x slower, 68 s against 2.8 s).
Each side runs one warm-up step and then `--steps` timed steps; the table gives the median step time
and completions per second and their ratio, measured in this one run. It also prints the peak
resident memory of every calibrl actor process.

TRL is installed only in the benchmark's own environment, benchmarks/.venv-trl, made on first use
(`pip install trl==1.16.0 accelerate datasets`; it reuses this venv's torch and transformers through
a .pth file): it is never a dependency of calibrl. Models are built locally with random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRL_ENV = ROOT / "benchmarks" / ".venv-trl"
TRL_PACKAGES = ["trl==1.16.0", "accelerate", "datasets"]
PROMPTS, COMPLETIONS, MAX_TOKENS = 8, 8, 64
MODELS = {"tiny": None, "~56M": {"hidden_size": 512, "num_layers": 8, "intermediate_size": 1408}}
ALL_CORES = [f"rollout.num_cpus_per_worker={os.cpu_count()}",
             f"learner.num_cpus_per_learner={os.cpu_count()}", "trainer.stream_logprobs=false"]
CALIBRL_SETTINGS = {"tiny": [], "~56M": ALL_CORES}
"""calibrl's thread settings per model (see the module docstring)."""


def trl_python() -> str:
    """The benchmark environment's python, created with TRL on first use."""
    py = TRL_ENV / "bin" / "python"
    if not py.exists():
        print(f"[vs_trl] creating {TRL_ENV} with {' '.join(TRL_PACKAGES)} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(TRL_ENV)], check=True)
        subprocess.run([str(py), "-m", "ensurepip", "-q"], check=True)
        site = next((TRL_ENV / "lib").glob("python3*/site-packages"))
        import torch

        (site / "calibrl-main.pth").write_text(str(pathlib.Path(torch.__file__).parents[1]) + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return str(py)


def make_models(root: str, names: list[str]) -> dict[str, str]:
    from benchmarks.weight_sync import make_random_qwen2
    from calibrl.tiny_models import make_tiny_qwen2

    paths = {}
    for name in names:
        path = os.path.join(root, name.replace("~", ""))
        if MODELS[name] is None:
            make_tiny_qwen2(path)
        else:
            make_random_qwen2(path, **MODELS[name])
        paths[name] = path
    return paths


def parameter_count(path: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


# ---- calibrl ----------------------------------------------------------------------------------------------


def run_calibrl(model: str, data: dict[str, str], out: str, steps: int, settings: list[str]) -> dict:
    import ray

    from calibrl.config import load_config
    from launch.memory import last_memory
    from launch.metrics import read_metrics
    from launch.train import Trainer

    cfg = load_config(None, [
        f"model.path={model}", "model.max_model_len=512", f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['val']}]", "data.max_prompt_length=400", "algorithm.name=grpo",
        "algorithm.std_normalize=true", "algorithm.mixup=never",
        f"rollout.samples_per_prompt={COMPLETIONS}", f"rollout.max_response_length={MAX_TOKENS}",
        "rollout.temperature=1.0", "rollout.kv_cache_memory_mib=128",
        f"rollout.stream_chunk_prompts={PROMPTS // 2}", f"trainer.prompts_per_step={PROMPTS}",
        f"learner.mini_batch_prompts={PROMPTS}", "learner.micro_batch_per_device=16", "learner.lr=1e-6",
        f"trainer.total_steps={steps + 1}", "trainer.eval_max_prompts=1", "trainer.eval_pass_k=0",
        "trainer.eval_every_steps=0", "trainer.save_every_steps=0", f"trainer.output_dir={out}",
        "trainer.resume=never", "verifier.reward_function=benchmarks.rewards:odd_length", *settings])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
        ray.shutdown()
    records = read_metrics(out)
    rows = [r for r in records if r["kind"] == "train"][1:]  # the first step warms up
    # each process's peak resident memory, as the run logged it at its end (launch/memory.py)
    memory = {name: m["peak_rss_gb"] for name, m in last_memory(records).items()}
    return {"step_s": [r["time/step_s"] for r in rows], "memory": memory,
            "phases": {k: statistics.median(r[k] for r in rows)
                       for k in ("time/rollout_s", "time/logprobs_s", "time/train_s", "time/sync_s")
                       if k in rows[0]}}


# ---- TRL (runs in benchmarks/.venv-trl) ------------------------------------------------------------


def trl_worker(spec_path: str) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.rewards import odd_length

    spec = json.loads(pathlib.Path(spec_path).read_text())
    answers = dict(zip(spec["prompts"], spec["answers"]))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "answer": a}
                                 for p, a in answers.items()])

    def reward(completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [odd_length(text, a) for text, a in zip(texts, answer)]

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir=spec["out"], per_device_train_batch_size=PROMPTS * COMPLETIONS,
                      num_generations=COMPLETIONS, max_completion_length=MAX_TOKENS, learning_rate=1e-6,
                      beta=0.0, max_steps=spec["steps"] + 1, logging_steps=1, save_strategy="no",
                      report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                      temperature=1.0, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=args, train_dataset=dataset,
                          callbacks=[StepTimes()])
    trainer.train()
    print("RESULT " + json.dumps({"step_s": times[1:]}), flush=True)


def run_trl(model: str, prompts: list[str], answers: list[str], out: str, steps: int) -> dict:
    spec = pathlib.Path(out) / "trl.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"model": model, "prompts": prompts, "answers": answers, "steps": steps,
                                "out": out}))
    log = pathlib.Path(out) / "trl.log"
    with open(log, "w") as f:
        proc = subprocess.run([trl_python(), __file__, "--trl-worker", str(spec)], stdout=subprocess.PIPE,
                              stderr=f, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
                              check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"TRL run failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")


# ---- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,~56M")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return

    from calibrl.data import load_examples
    from calibrl.data.synthetic import write_splits

    trl_python()
    names = args.models.split(",")
    tmp = tempfile.mkdtemp(prefix="calibrl-vs-trl-")
    models = make_models(tmp, names)
    data = write_splits(os.path.join(tmp, "data"), n_train=256, n_val=8, n_test=8, seed=0,
                        multimodal=False, difficulty=1)
    examples, _ = load_examples([data["train"]])
    # TRL walks its dataset in its own shuffled order; the same prompts and answers on both sides
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    print(f"[vs_trl] {PROMPTS} prompts x {COMPLETIONS} completions x up to {MAX_TOKENS} tokens per step, "
          f"{args.steps} timed steps after a warm-up step; {os.cpu_count()} cores", flush=True)
    results = {}
    for name in names:
        params = parameter_count(models[name])
        print(f"[vs_trl] {name} ({params / 1e6:.1f}M parameters): calibrl ...", flush=True)
        c = run_calibrl(models[name], data, os.path.join(tmp, f"calibrl-{name}"), args.steps,
                        CALIBRL_SETTINGS[name])
        print(f"[vs_trl] {name}: TRL ...", flush=True)
        t = run_trl(models[name], prompts, answers, os.path.join(tmp, f"trl-{name}"), args.steps)
        results[name] = (params, c, t)

    print("\n| model | params | calibrl step s | TRL step s | calibrl completions/s | TRL completions/s "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    per_step = PROMPTS * COMPLETIONS
    lines = []
    for name, (params, c, t) in results.items():
        cs, ts = statistics.median(c["step_s"]), statistics.median(t["step_s"])
        print(f"| {name} | {params / 1e6:.1f}M | {cs:.2f} | {ts:.2f} | {per_step / cs:.1f} | "
              f"{per_step / ts:.1f} | {ts / cs:.2f}x |")
        phases = ", ".join(f"{k.split('/')[1][:-2]} {v:.2f}" for k, v in c["phases"].items())
        lines.append(f"{name}: calibrl {per_step / cs:.1f} completions/s vs TRL {per_step / ts:.1f}: "
                     f"{ts / cs:.2f}x (step {cs:.2f} s vs {ts:.2f} s; calibrl phases {phases})")
    print("\nPeak resident memory per calibrl actor process, GB:")
    for name, (_, c, _) in results.items():
        print(f"  {name}: " + ", ".join(f"{a} {gb:.2f}" for a, gb in c["memory"].items()))
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
