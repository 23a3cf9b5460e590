"""`calibrl submit CONFIG [MORE.yaml] [key=value ...] [--address URL] [--follow]`

Submits `calibrl train` with that config to a Ray cluster as a Ray job (Ray's job submission API,
the one behind `ray job submit`):

- the config is loaded and validated here first, so a bad key fails before anything is uploaded;
- the working directory goes up as the job's `working_dir`, minus the bulk (`runs`, caches, weights,
  parquet files; Ray itself leaves out `.venv` and `.git`); relative model, data and output paths
  that exist on this machine are made absolute, so a job on this box (or on a cluster sharing the
  filesystem) finds them and leaves its run directory where you expect it;
- Ray's token authentication is used when a token is at hand: `$RAY_AUTH_TOKEN`,
  `$RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (`ray get-auth-token --generate` writes it, and a
  head started with it, or with RAY_AUTH_MODE=token, requires it);
- it prints the job id, the command that follows its logs and the dashboard URL; `--follow` streams
  the logs and exits 0 only if the job SUCCEEDED.

The address is `--address`, else `$RAY_ADDRESS` if it is an http(s) URL, else http://127.0.0.1:8265.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

EXCLUDES = ["runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.safetensors",
            "*.pt", "*.parquet", "docs/results"]
"""Kept out of the uploaded working directory (Ray caps it at 500 MiB, and none of it is code)."""
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 60.0


def use_token_auth() -> bool:
    """Turn on Ray's token authentication for this process's requests when a token is available and
    nothing says otherwise (RAY_AUTH_MODE set by the user wins)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"] == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(path):
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def absolute_path_overrides(cfg) -> list[str]:
    """key=value overrides making the config's relative paths absolute where they exist here."""
    out = []

    def fix(path: str) -> str:
        return os.path.abspath(path) if path and not os.path.isabs(path) and os.path.exists(path) else path

    if fix(cfg.model.path) != cfg.model.path:
        out.append(f"model.path={fix(cfg.model.path)}")
    for key in ("train_files", "val_files"):
        files = list(getattr(cfg.data, key))
        if [fix(f) for f in files] != files:
            out.append(f"data.{key}=[{','.join(fix(f) for f in files)}]")
    if not os.path.isabs(cfg.trainer.output_dir):
        out.append(f"trainer.output_dir={os.path.abspath(cfg.trainer.output_dir)}")
    return out


def entrypoint(python: str, configs: list[str], overrides: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [python, "-m", "launch.cli", "train", *configs, *overrides])


def main(argv: list[str]) -> None:
    from calibrl.config import ConfigError, load_config, split_config_args, validate

    ap = argparse.ArgumentParser(prog="calibrl submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=None,
                    help=f"the cluster's dashboard URL (default {DEFAULT_ADDRESS})")
    ap.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    ap.add_argument("--python", default="python", help="the cluster's Python with calibrl's dependencies")
    ap.add_argument("--job-id", default=None, help="a submission id of your choice (default: Ray's)")
    ap.add_argument("--wait-s", type=float, default=0.0,
                    help="keep trying to reach the cluster this long (a head still starting)")
    args, rest = ap.parse_known_args(argv)
    configs, overrides = split_config_args(rest)
    if not configs:
        raise SystemExit("calibrl submit: give a CONFIG.yaml (see configs/)")
    try:
        cfg = validate(load_config(configs, overrides))
    except ConfigError as e:
        raise SystemExit(f"calibrl submit: {e}") from None
    overrides = [*overrides, *absolute_path_overrides(cfg)]

    env_address = os.environ.get("RAY_ADDRESS", "")
    address = args.address or (env_address if env_address.startswith("http") else DEFAULT_ADDRESS)
    token = use_token_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.ERROR)  # not the packaging chatter

    client, deadline = None, time.time() + args.wait_s
    while client is None:  # a head that is still starting (compose starts both at once) is waited for
        try:
            client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError) as e:
            if time.time() >= deadline:
                raise SystemExit(f"calibrl submit: cannot reach the Ray cluster at {address} (waited "
                                 f"{args.wait_s:.0f} s, --wait-s): {str(e).splitlines()[0]}") from None
            time.sleep(3)
    job_id = None
    deadline = time.time() + AGENT_WAIT_S
    while job_id is None:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(args.python, configs, overrides), submission_id=args.job_id,
                runtime_env={"working_dir": ".", "excludes": EXCLUDES, "env_vars": JOB_ENV},
                metadata={"calibrl_config": ",".join(configs)})
        except RuntimeError as e:  # a head just started has no job agent for a few seconds
            if "No available agent" in str(e) and time.time() < deadline:
                time.sleep(2)
                continue
            raise SystemExit(f"calibrl submit: the cluster at {address} refused the job: "
                             f"{str(e).splitlines()[0]}") from None
    auth = "RAY_AUTH_MODE=token " if token else ""
    print(f"[calibrl] submitted job {job_id} to {address}{' (token authentication)' if token else ''}\n"
          f"[calibrl] follow its logs: {auth}ray job logs --address {address} --follow {job_id}\n"
          f"[calibrl] status:          {auth}ray job status --address {address} {job_id}\n"
          f"[calibrl] dashboard:       {address} (Jobs -> {job_id}; Actors: rollout-*, learner-*, ...)",
          flush=True)
    if not args.follow:
        return
    seen = 0
    while True:  # poll rather than the websocket tail: works the same through proxies and tunnels
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[seen:])
        sys.stdout.flush()
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    print(f"[calibrl] job {job_id}: {status.value}", flush=True)
    if status != JobStatus.SUCCEEDED:
        raise SystemExit(1)
