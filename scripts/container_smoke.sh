#!/usr/bin/env bash
# Container smoke run (not part of CI; slow): builds the CPU image and runs the compose stack for real
# on a machine without a Docker engine, with podman (runc) and podman-compose, from Debian's packages:
#   1. a Debian bookworm base image made with debootstrap (no image registry needed);
#   2. the CPU image from docker/Dockerfile (the install script the README uses, DEVICE=cpu);
#   3. docker/compose.cpu.yaml up: a token-authenticated Ray head (dashboard on 127.0.0.1 only) and a
#      job that trains the tiny demo model for 2 steps;
#   4. checks through the jobs API that the job SUCCEEDED with the token, and that a request without
#      the token is refused (401);
#   5. tears everything down.
# Run as root from the repository root: bash scripts/container_smoke.sh   (WORK=/var/tmp/calibrl-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/calibrl-smoke}
PORT=${DASHBOARD_PORT:-18265}
mkdir -p "$WORK"
say() { echo "[container_smoke] $*"; }

say "1/5 podman, runc, debootstrap and podman-compose"
command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null ||
  apt-get install -y -q podman runc debootstrap uidmap slirp4netns fuse-overlayfs > "$WORK/apt.log" 2>&1
[ -x "$WORK/venv/bin/podman-compose" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" -q install podman-compose; }
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
mkdir -p /etc/containers
[ -f /etc/containers/containers.conf ] || printf '[engine]\nruntime = "runc"\n[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n' > /etc/containers/containers.conf

if ! "${PODMAN[@]}" image exists localhost/debian-bookworm:base; then
  say "2/5 debootstrap a Debian bookworm base image"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1
  tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - localhost/debian-bookworm:base > /dev/null
fi
say "3/5 build calibrl:cpu from docker/Dockerfile (install log: $WORK/build.log)"
# PyPI has no torch==2.13.0+cpu; this machine's pip cache has it: hand it to the build
for wheel in ${PIP_FIND_LINKS:-/opt/wheels}/torch-2.13.0+cpu*.whl; do [ -f "$wheel" ] && cp -n "$wheel" docker/wheels/; done
# a network that inspects TLS: the build's pip trusts what this machine's pip trusts
[ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ] && cp "$PIP_CERT" docker/certs/ca-bundle.crt
t0=$(date +%s)
"${PODMAN[@]}" build "${LIMITS[@]}" -f docker/Dockerfile --build-arg BASE=localhost/debian-bookworm:base \
  --build-arg DEVICE=cpu -t localhost/calibrl:cpu . > "$WORK/build.log" 2>&1
say "    built in $(( $(date +%s) - t0 )) s"

say "4/5 compose up (token from docker/secrets/ray_token, dashboard on 127.0.0.1:$PORT)"
mkdir -p docker/secrets
[ -s docker/secrets/ray_token ] || python3 -c "import secrets; print(secrets.token_hex(32))" > docker/secrets/ray_token
TOKEN=$(cat docker/secrets/ray_token)
export CALIBRL_IMAGE=localhost/calibrl:cpu DASHBOARD_PORT=$PORT
COMPOSE=("$WORK/venv/bin/podman-compose" --podman-args="--runtime runc" -f docker/compose.cpu.yaml)
cleanup() { "${COMPOSE[@]}" down > /dev/null 2>&1 || true; }
trap cleanup EXIT
t0=$(date +%s)
"${COMPOSE[@]}" up -d > "$WORK/compose.log" 2>&1
for _ in $(seq 120); do
  curl -fs -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/api/jobs/" > "$WORK/jobs.json" 2>/dev/null &&
    python3 -c "import json,sys; jobs=json.load(open('$WORK/jobs.json')); sys.exit(0 if jobs and all(j['status'] in ('SUCCEEDED','FAILED','STOPPED') for j in jobs) else 1)" &&
    break
  sleep 10
done
STATUS=$(python3 -c "import json; print(' '.join(j['status'] for j in json.load(open('$WORK/jobs.json'))))")
say "    job status with the token: $STATUS ($(( $(date +%s) - t0 )) s)"
UNAUTH=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/api/jobs/")
say "    the same request without the token: HTTP $UNAUTH"
"${COMPOSE[@]}" logs train > "$WORK/train.log" 2>&1 || true

say "5/5 tear down"
cleanup
trap - EXIT
if [ "$STATUS" = SUCCEEDED ] && [ "$UNAUTH" = 401 ]; then say "ok"; else say "FAILED (logs in $WORK)"; exit 1; fi
