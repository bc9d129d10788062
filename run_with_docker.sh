#!/usr/bin/env bash
# Run NEXP timed training runs of one system in one container.
#
#   CONT=<image> DATADIR=<data> LOGDIR=<logs> DGXSYSTEM=<name> ./run_with_docker.sh [TRAINER FLAGS...]
#
# Reads configs/config_${DGXSYSTEM}.sh (GPUs, nodes, batch, hyperparameters, NEXP), starts
# one container with the GPUs and DATADIR, LOGDIR (and BACKBONE_DIR) mounted, and runs
# scripts/run_and_time.sh in it NEXP times, each after clearing the page cache. Trainer
# flags given here come after the config's EXTRA_PARAMS, so they override it.
#
# Required environment:
#   CONT          image (./setup.sh prints its tag)
#   DATADIR       host folder mounted at /data: holds coco2017/ (init_datasets.sh) or is a
#                 COCO folder itself; resnet34-backbone.npz found here is used
#   LOGDIR        host folder mounted at /results; gets, per run i = 1..NEXP,
#                 ${DATESTAMP}_${i}.log (MLPerf log), ${DATESTAMP}_${i}.out (console output)
#                 and ${DATESTAMP}_${i}/ (resolved config, metrics, checkpoint)
#   DGXSYSTEM     system name: configs/config_${DGXSYSTEM}.sh
# Optional:
#   BACKBONE_DIR  host folder holding resnet34-backbone.npz, mounted read-only at /backbone
#   NEXP          number of runs (default: the config's)
#   CLEAR_CACHES  1 (default): drop the page cache before each run (privileged helper
#                 container); 0: do not. Logged as cache_clear.
#   GPUS          value of docker run --gpus (default all); none: no GPU flag (CPU hosts)
#   CONT_USER     docker run --user (e.g. "$(id -u):$(id -g)"; LOGDIR must be writable by it)
#   DATESTAMP     log file stem (default: the start time, yymmddHHMMSS)
#   CONT_NAME     container name (default: single_stage_detector_<system>_<pid>_<datestamp>)
#   DOCKER        client command (default docker)
#   MLPERF_SUBMISSION_ORG / _PLATFORM / _STATUS: passed into the container when set
# Exit status: 0 when every run succeeded; otherwise the status of the last failed run
# (2: bad input, 3: aborted at the epoch limit, 4: non-finite loss), or 1 for set-up errors.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG_DIR="${SCRIPT_DIR}/configs"

die() { printf 'run_with_docker.sh: error: %s\n' "$*" >&2; exit 1; }
warn() { printf 'run_with_docker.sh: WARNING: %s\n' "$*" >&2; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
fi

: "${CONT:?CONT must name the container image (./setup.sh prints it), e.g. CONT=single_stage_detector:latest}"
: "${DATADIR:?DATADIR must be the host data folder (holding coco2017/, or empty for config_CPU.sh)}"
: "${LOGDIR:?LOGDIR must be the host folder for the logs}"
: "${DGXSYSTEM:?DGXSYSTEM must name a system: configs/config_\${DGXSYSTEM}.sh}"

available_systems() {
    local f names=()
    for f in "${CONFIG_DIR}"/config_*.sh; do
        [[ -e "${f}" ]] || continue
        f="${f##*/config_}"
        names+=("${f%.sh}")
    done
    printf '%s' "${names[*]:-none}"
}

CONFIG="${CONFIG_DIR}/config_${DGXSYSTEM}.sh"
[[ -f "${CONFIG}" ]] || die "no config for DGXSYSTEM=${DGXSYSTEM}: ${CONFIG} does not exist; available: $(available_systems)"
[[ -d "${DATADIR}" ]] || die "DATADIR=${DATADIR} is not a folder"
if [[ -n "${BACKBONE_DIR:-}" && ! -d "${BACKBONE_DIR}" ]]; then die "BACKBONE_DIR=${BACKBONE_DIR} is not a folder"; fi
mkdir -p "${LOGDIR}" || die "cannot create LOGDIR=${LOGDIR}"
DATADIR="$(cd "${DATADIR}" && pwd)"
LOGDIR="$(cd "${LOGDIR}" && pwd)"
if [[ -n "${BACKBONE_DIR:-}" ]]; then BACKBONE_DIR="$(cd "${BACKBONE_DIR}" && pwd)"; fi

# The config's variables, and any new variable it defines, go into the container.
vars_before="$(compgen -v)"
# shellcheck source=/dev/null
source "${CONFIG}"
vars_after="$(compgen -v)"
config_vars=()
while IFS= read -r name; do
    case "${name}" in vars_before | vars_after | BASH* | _*) continue ;; esac
    config_vars+=("${name}")
done < <(comm -13 <(sort <<< "${vars_before}") <(sort <<< "${vars_after}"))
for name in DGXSYSTEM DGXNNODES DGXNGPU BATCHSIZE EXTRA_PARAMS NEXP WALLTIME \
            MLPERF_SUBMISSION_ORG MLPERF_SUBMISSION_PLATFORM MLPERF_SUBMISSION_STATUS; do
    if [[ -n "${!name+set}" && " ${config_vars[*]} " != *" ${name} "* ]]; then config_vars+=("${name}"); fi
done

: "${DGXNGPU:?${CONFIG} must set DGXNGPU}"
: "${DGXNNODES:?${CONFIG} must set DGXNNODES}"
[[ "${DGXNNODES}" -eq 1 ]] || die "${CONFIG} is for ${DGXNNODES} nodes; multi-node runs go through SLURM: sbatch -N ${DGXNNODES} run.sub"
NEXP="${NEXP:-1}"
[[ "${NEXP}" =~ ^[1-9][0-9]*$ ]] || die "NEXP must be a positive integer, not '${NEXP}'"
CLEAR_CACHES="${CLEAR_CACHES:-1}"
GPUS="${GPUS:-all}"
DOCKER="${DOCKER:-docker}"
DATESTAMP="${DATESTAMP:-$(date +%y%m%d%H%M%S)}"
CONT_NAME="${CONT_NAME:-single_stage_detector_${DGXSYSTEM}_$$_${DATESTAMP}}"
CONT_NAME="${CONT_NAME//[^A-Za-z0-9_.-]/_}"
command -v "${DOCKER}" > /dev/null || die "'${DOCKER}' not found on PATH (install Docker, or set DOCKER)"

# Paths inside the container.
CONT_DATADIR=/data
CONT_LOGDIR=/results
CONT_BACKBONE_DIR=/backbone

docker_args=(run --rm --detach --name "${CONT_NAME}" --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
             --volume "${DATADIR}:${CONT_DATADIR}" --volume "${LOGDIR}:${CONT_LOGDIR}")
if [[ "${GPUS}" != none ]]; then docker_args+=(--gpus "${GPUS}"); fi
if [[ -n "${CONT_USER:-}" ]]; then docker_args+=(--user "${CONT_USER}"); fi
if [[ -n "${BACKBONE_DIR:-}" ]]; then
    docker_args+=(--volume "${BACKBONE_DIR}:${CONT_BACKBONE_DIR}:ro" --env "BACKBONE_DIR=${CONT_BACKBONE_DIR}")
fi
for name in "${config_vars[@]}"; do docker_args+=(--env "${name}=${!name}"); done
docker_args+=(--env "DATADIR=${CONT_DATADIR}" --env "LOGDIR=${CONT_LOGDIR}")

CONTAINER_STARTED=0
cleanup() {
    if [[ "${CONTAINER_STARTED}" -eq 1 ]]; then
        CONTAINER_STARTED=0
        "${DOCKER}" rm --force "${CONT_NAME}" > /dev/null 2>&1 || warn "could not remove container ${CONT_NAME}"
    fi
}
trap cleanup EXIT
trap 'echo "run_with_docker.sh: interrupted" >&2; exit 130' INT
trap 'echo "run_with_docker.sh: terminated" >&2; exit 143' TERM

echo "system ${DGXSYSTEM} (${CONFIG}): ${DGXNGPU} process(es), ${NEXP} run(s), image ${CONT}"
echo "data ${DATADIR} -> ${CONT_DATADIR}, logs ${LOGDIR} -> ${CONT_LOGDIR}${BACKBONE_DIR:+, backbone ${BACKBONE_DIR} -> ${CONT_BACKBONE_DIR}}"
CONTAINER_STARTED=1
"${DOCKER}" "${docker_args[@]}" "${CONT}" sleep infinity > /dev/null || { CONTAINER_STARTED=0; die "docker run failed (image ${CONT}; on a host without NVIDIA GPUs set GPUS=none)"; }

# Drops the page cache of the host kernel from a short-lived privileged container (the
# training container itself stays unprivileged). Succeeds or returns 1.
clear_caches() {
    sync || true
    "${DOCKER}" run --rm --privileged --entrypoint /bin/sh "${CONT}" -c 'sync && echo 3 > /proc/sys/vm/drop_caches'
}

failed=()
last_failure=0
for ((i = 1; i <= NEXP; i++)); do
    run_name="${DATESTAMP}_${i}"
    cache_cleared=0
    if [[ "${CLEAR_CACHES}" == 1 ]]; then
        if clear_caches > /dev/null 2>&1; then
            cache_cleared=1
        else
            warn "could not drop the page cache (needs privileged containers); run ${i} logs cache_clear false"
        fi
    fi
    echo "=== run ${i}/${NEXP}: ${LOGDIR}/${run_name}.log (console: ${run_name}.out), cache cleared: ${cache_cleared}"
    set +e
    "${DOCKER}" exec --env "RUN_NAME=${run_name}" --env "CLEAR_CACHES=${cache_cleared}" "${CONT_NAME}" \
        /workspace/ssd/scripts/run_and_time.sh "$@" 2>&1 | tee "${LOGDIR}/${run_name}.out"
    status=${PIPESTATUS[0]}
    set -e
    if [[ "${status}" -ne 0 ]]; then
        failed+=("${i}")
        last_failure=${status}
        warn "run ${i} exited with status ${status}"
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    warn "${#failed[@]} of ${NEXP} run(s) failed: ${failed[*]} (console output in ${LOGDIR}/${DATESTAMP}_<i>.out)"
    exit "${last_failure}"
fi
echo "all ${NEXP} run(s) done; MLPerf logs: ${LOGDIR}/${DATESTAMP}_<1..${NEXP}>.log"
