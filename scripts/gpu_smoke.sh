#!/usr/bin/env bash
# GPU smoke run (not part of CI): a few CalibRL steps of the tiny VL model on the local GPUs through
# the NCCL weight-transfer path; prints the sync time and the rollout-vs-learner log-prob gap.
# Needs `make install` with CALIBRL_DEVICE=gpu (or .venv with the `gpu` extra). See scripts/gpu_smoke.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/gpu_smoke.py "$@"
