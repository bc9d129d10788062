#!/usr/bin/env bash
# Timed training runs: one process per GPU, then a RESULT line per run.
#
# Runs inside the container (run_with_docker.sh, run.sub: one run each time, named by
# RUN_NAME) or directly on a host, where it runs NEXP trials one after the other:
#
#   set -a; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh [TRAINER FLAGS...]
#   set -a; NEXP=5; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh    # 5 trials
#
# Trials (when RUN_NAME is not set): trial i = 1..NEXP writes LOGDIR/${DATESTAMP}_${i}.log
# (MLPerf log), LOGDIR/${DATESTAMP}_${i}.out (console) and LOGDIR/${DATESTAMP}_${i}/, as
# run_with_docker.sh does. Each trial draws its own seed unless the flags fix one (SEED=N
# for config_CPU.sh). The exit status is 0 when every trial succeeded, else that of the
# last failed one.
#
# Launch mode, first match wins:
#   SLURM   SLURM_PROCID is set and SLURM_NTASKS > 1: srun already started one task per
#           GPU, so this task runs the trainer itself (it reads SLURM_PROCID/NTASKS/LOCALID).
#   torchrun  DGXNGPU > 1: python -m torch.distributed.run --standalone on this node.
#   plain   one process.
# LAUNCHER=slurm|torchrun|python forces one.
#
# Environment (the config file sets the first four):
#   DGXNGPU      processes on this node (GPUs; CPU processes for config_CPU.sh), default 1
#   DGXNNODES    nodes (checked against SLURM), default 1
#   EXTRA_PARAMS trainer flags (split on whitespace)
#   DGXSYSTEM    system name; logged as submission_platform unless MLPERF_SUBMISSION_PLATFORM is set
#   DATADIR      dataset folder: DATADIR/coco2017 if it exists, else DATADIR itself
#                (default: <repo>/data; the container gets /data)
#   LOGDIR       where the MLPerf log and the run's outputs go (default: <repo>/output/results)
#   RUN_NAME     file name stem of one run: writes LOGDIR/RUN_NAME.log (MLPerf log) and
#                LOGDIR/RUN_NAME/ (config, metrics, checkpoint); unset: NEXP trials as above
#   NEXP         trials when RUN_NAME is unset (default 1)
#   DATESTAMP    stem of the trials' names (default: the start time, yymmddHHMMSS)
#   BACKBONE     backbone weights file for --pretrained-backbone; default: the first of
#                BACKBONE_DIR/BACKBONE_FILE, DATADIR/BACKBONE_FILE that exists;
#                BACKBONE=none passes nothing
#   BACKBONE_FILE  the file name looked up there (default resnet34-backbone.npz, optional: none
#                found, nothing passed); a config that names its backbone file (the YOLO ones)
#                sets it, and the run then stops when neither folder holds it. A name, not a
#                path, so that it resolves where this script runs (inside the container)
#   CLEAR_CACHES 1 if the page cache was dropped before this run (logged as cache_clear)
#   PYTHON       interpreter (default: <repo>/.venv/bin/python if present, else python3)
# Arguments are passed to the trainer after EXTRA_PARAMS, so they override it.
#
# Exit status: the trainer's (0 success, 2 bad input, 3 aborted at the epoch limit, 5 stopped by
# SIGTERM/SIGINT with a checkpoint, 6 outputs not writable,
# 4 non-finite loss; other values: crash or launcher error). torchrun reports any failure
# as 1; a stopped (5) or aborted (3) run is still told apart through the run's result.json.
# Under SLURM only rank 0's task exits 3 or 5 (the others 0), so that srun --kill-on-bad-exit
# does not end the step before rank 0 has written result.json and the RESULT line.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { printf 'run_and_time.sh: error: %s\n' "$*" >&2; exit 2; }

# Trials on a host: run this script once per trial, named as run_with_docker.sh names them.
if [[ -z "${RUN_NAME:-}" ]]; then
    NEXP="${NEXP:-1}"
    [[ "${NEXP}" =~ ^[1-9][0-9]*$ ]] || die "NEXP must be a positive integer, not '${NEXP}'"
    DATESTAMP="${DATESTAMP:-$(date +%y%m%d%H%M%S)}"
    [[ "${DATESTAMP}" =~ ^[A-Za-z0-9._-]+$ ]] || die "DATESTAMP may hold only letters, digits, '.', '_', '-'"
    LOGDIR="${LOGDIR:-${REPO_ROOT}/output/results}"
    mkdir -p "${LOGDIR}"
    failed=()
    last_failure=0
    for ((trial = 1; trial <= NEXP; trial++)); do
        run_name="${DATESTAMP}_${trial}"
        echo "=== trial ${trial}/${NEXP}: ${LOGDIR}/${run_name}.log (console: ${run_name}.out)"
        set +e
        RUN_NAME="${run_name}" LOGDIR="${LOGDIR}" "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "${LOGDIR}/${run_name}.out"
        status=${PIPESTATUS[0]}
        set -e
        if [[ "${status}" -ne 0 ]]; then failed+=("${trial}"); last_failure=${status}; fi
    done
    if [[ ${#failed[@]} -gt 0 ]]; then
        printf 'run_and_time.sh: %d of %d trial(s) failed: %s\n' "${#failed[@]}" "${NEXP}" "${failed[*]}" >&2
        exit "${last_failure}"
    fi
    if [[ "${NEXP}" -gt 1 ]]; then
        echo "all ${NEXP} trials done; MLPerf logs: ${LOGDIR}/${DATESTAMP}_<1..${NEXP}>.log"
    fi
    exit 0
fi

DGXNGPU="${DGXNGPU:-1}"
DGXNNODES="${DGXNNODES:-1}"
EXTRA_PARAMS="${EXTRA_PARAMS:-}"
DATADIR="${DATADIR:-${REPO_ROOT}/data}"
LOGDIR="${LOGDIR:-${REPO_ROOT}/output/results}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi

[[ "${DGXNGPU}" =~ ^[1-9][0-9]*$ ]] || die "DGXNGPU must be a positive integer, not '${DGXNGPU}'"
[[ "${DGXNNODES}" =~ ^[1-9][0-9]*$ ]] || die "DGXNNODES must be a positive integer, not '${DGXNNODES}'"
[[ "${RUN_NAME}" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME may hold only letters, digits, '.', '_', '-': '${RUN_NAME}'"

# Dataset: the folder init_datasets.sh filled (holds coco2017/) or a COCO folder itself.
# With --synthetic (config_CPU.sh) the trainer generates the dataset here if there is none.
DATASET_DIR="${DATADIR}"
if [[ -d "${DATADIR}/coco2017" ]]; then DATASET_DIR="${DATADIR}/coco2017"; fi

# Flags may span lines in a config file.
read -r -a extra_params <<< "${EXTRA_PARAMS//$'\n'/ }"

backbone_args=()
if [[ -z "${BACKBONE:-}" ]]; then
    backbone_file="${BACKBONE_FILE:-resnet34-backbone.npz}"
    [[ "${backbone_file}" != */* ]] || die "BACKBONE_FILE must be a file name, not a path: '${backbone_file}' (or set BACKBONE)"
    for candidate in ${BACKBONE_DIR:+"${BACKBONE_DIR}/${backbone_file}"} "${DATADIR}/${backbone_file}"; do
        if [[ -f "${candidate}" ]]; then BACKBONE="${candidate}"; break; fi
    done
    if [[ -z "${BACKBONE:-}" && -n "${BACKBONE_FILE:-}" ]]; then
        die "BACKBONE_FILE=${BACKBONE_FILE} is in neither ${BACKBONE_DIR:+BACKBONE_DIR (${BACKBONE_DIR}) nor }DATADIR (${DATADIR})"
    fi
fi
if [[ -n "${BACKBONE:-}" && "${BACKBONE}" != none ]]; then
    [[ -f "${BACKBONE}" ]] || die "BACKBONE=${BACKBONE}: no such file"
    backbone_args=(--pretrained-backbone "${BACKBONE}")
fi

if [[ -n "${DGXSYSTEM:-}" && -z "${MLPERF_SUBMISSION_PLATFORM:-}" ]]; then
    export MLPERF_SUBMISSION_PLATFORM="${DGXSYSTEM}"
fi
export CLEAR_CACHES="${CLEAR_CACHES:-0}"

if [[ -z "${LAUNCHER:-}" ]]; then
    if [[ -n "${SLURM_PROCID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
        LAUNCHER=slurm
    elif [[ "${DGXNGPU}" -gt 1 ]]; then
        LAUNCHER=torchrun
    else
        LAUNCHER=python
    fi
fi

RANK0=1
case "${LAUNCHER}" in
    slurm)
        expected=$((DGXNNODES * DGXNGPU))
        if [[ "${SLURM_NTASKS:-1}" -ne "${expected}" ]]; then
            die "SLURM started ${SLURM_NTASKS:-1} tasks, the config wants DGXNNODES x DGXNGPU = ${expected}"
        fi
        # The rendezvous: MASTER_ADDR / MASTER_PORT when set (run.sub sets them), else the
        # trainer's own choice: the first node of the step (SLURM_STEP_NODELIST) and port
        # 29500 + SLURM_JOB_ID mod 1000, so that jobs sharing a node do not collide.
        [[ "${SLURM_PROCID}" -eq 0 ]] || RANK0=0
        launch=("${PYTHON}" -m single_stage_detector train)
        ;;
    torchrun)
        [[ "${DGXNNODES}" -eq 1 ]] || die "DGXNNODES=${DGXNNODES}: several nodes need SLURM (run.sub); torchrun here is single-node"
        launch=("${PYTHON}" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "${DGXNGPU}"
                -m single_stage_detector train)
        ;;
    python)
        [[ "${DGXNGPU}" -eq 1 ]] || die "LAUNCHER=python runs one process, but DGXNGPU=${DGXNGPU}"
        launch=("${PYTHON}" -m single_stage_detector train)
        ;;
    *) die "LAUNCHER must be slurm, torchrun or python, not '${LAUNCHER}'" ;;
esac

cmd=("${launch[@]}" --data-dir "${DATASET_DIR}" --output-dir "${LOGDIR}/${RUN_NAME}"
     --log-file "${LOGDIR}/${RUN_NAME}.log" "${backbone_args[@]}" "${extra_params[@]}" "$@")

mkdir -p "${LOGDIR}"
start=$(date +%s)
start_fmt=$(date +'%Y-%m-%d %H:%M:%S')
if [[ "${RANK0}" -eq 1 ]]; then
    echo "STARTING TIMING RUN AT ${start_fmt}"
    echo "launcher ${LAUNCHER}: ${DGXNNODES} node(s) x ${DGXNGPU} process(es); MLPerf log ${LOGDIR}/${RUN_NAME}.log"
    printf 'command:'; printf ' %q' "${cmd[@]}"; printf '\n'
fi

# The trainer writes result.json at the end of a run that finished (success or aborted).
result_json="${LOGDIR}/${RUN_NAME}/result.json"
rm -f "${result_json}"

set +e
# The trainer runs in the background so that this script can pass SIGTERM / SIGINT on to it
# (`docker stop` signals only the container's first process) and then wait for its clean
# stop (checkpoint, run_stop, exit status 5). A copy the trainer also gets directly (SLURM
# signals every process of the step; Ctrl-C the whole process group) counts once.
"${cmd[@]}" &
trainer=$!
trap 'kill -TERM "${trainer}" 2> /dev/null' TERM
trap 'kill -INT "${trainer}" 2> /dev/null' INT
wait "${trainer}"
status=$?
while kill -0 "${trainer}" 2> /dev/null; do  # a trapped signal ends `wait` early: wait again
    wait "${trainer}"
    status=$?
done
trap - TERM INT
set -e
# Under srun --kill-on-bad-exit (run.sub) the first task that exits non-zero ends the whole
# step. A run that ended as planned without success (3: aborted, 5: stopped by a signal) ends
# with that status on every rank, but rank 0 still writes result.json and prints the RESULT
# line after the others have left the final barrier: the other ranks exit 0 so that SLURM does
# not kill rank 0 mid-way; the step's status is rank 0's.
if [[ "${LAUNCHER}" == slurm && "${RANK0}" -eq 0 ]] && [[ "${status}" -eq 3 || "${status}" -eq 5 ]]; then
    status=0
fi
# torchrun exits 1 whatever its processes' status was: recover "stopped by a signal" (5) and
# "aborted" (3) from result.json.
if [[ "${LAUNCHER}" == torchrun && "${status}" -ne 0 && -f "${result_json}" ]]; then
    if grep -Eq '"stopped_by": *"SIG' "${result_json}"; then
        status=5
    elif grep -Eq '"status": *"aborted"' "${result_json}"; then
        status=3
    fi
fi

end=$(date +%s)
if [[ "${RANK0}" -eq 1 ]]; then
    echo "ENDING TIMING RUN AT $(date +'%Y-%m-%d %H:%M:%S') (exit status ${status})"
    echo "RESULT,SINGLE_STAGE_DETECTOR,,$((end - start)),${MLPERF_SUBMISSION_ORG:-single_stage_detector},${start_fmt}"
    case "${status}" in
        0) ;;
        2) echo "run_and_time.sh: training refused its input (exit status 2, see the error above)" >&2 ;;
        3) echo "run_and_time.sh: training stopped at the epoch limit without reaching the target (exit status 3: aborted)" >&2 ;;
        4) echo "run_and_time.sh: training stopped on a non-finite loss (exit status 4)" >&2 ;;
        5) echo "run_and_time.sh: training stopped by a signal after writing a checkpoint (exit status 5); rerun with EXTRA_PARAMS=\"--resume auto\" and the same RUN_NAME to continue (the log is then marked resumed)" >&2 ;;
        6) echo "run_and_time.sh: training could not write its outputs (exit status 6: disk full or folder read-only)" >&2 ;;
        *) echo "run_and_time.sh: training failed (exit status ${status})" >&2 ;;
    esac
fi
exit "${status}"
