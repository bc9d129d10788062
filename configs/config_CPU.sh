# shellcheck shell=bash
# config_CPU.sh: the CPU demo; needs no GPU and no COCO.
#
# The small ssd_tiny preset on the embedded synthetic dataset, with the hyperparameters of
# `python -m single_stage_detector demo` (DEMO_DEFAULTS in single_stage_detector/__main__.py).
# The trainer generates the synthetic dataset (2,000 train / 250 val images) into DATADIR
# when it holds none; it reaches the 0.23 target after 2 or 3 epochs, depending on the CPU
# (float results differ between CPUs), in about 1.5-2.5 min on 2 idle cores.
# Division: open (not the benchmark model).
#
#   DGXNGPU   CPU processes (gloo; torchrun when > 1), default 1. The global batch stays 32
#             (32 / DGXNGPU per process) and --lr is the LR of the global batch, so the
#             recipe is the same for any process count. DGXNGPU should divide 32.
#   SEED      fixes the seed of every trial (e.g. SEED=1, the demo's); default: none, each
#             trial draws its own, so NEXP trials are independent runs.
#   DATADIR   default (on a host): <repo>/data/synthetic, the folder `make demo` uses, so
#             the dataset is generated once for both.
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=CPU GPUS=none ./run_with_docker.sh
#   set -a; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh
#   set -a; NEXP=5; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh     # 5 trials

export DGXSYSTEM="CPU"
export DGXNNODES=1
export DGXNGPU="${DGXNGPU:-1}"
export BATCHSIZE=$((32 / DGXNGPU))
export NEXP="${NEXP:-1}"
export DATADIR="${DATADIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/data/synthetic}"
export WALLTIME="${WALLTIME:-00:30:00}"
# Threads per process: the cores shared among the processes. One data-loader worker per
# process when several share the cores, two (the demo's) otherwise.
_cpu_cores="$(nproc)"
export OMP_NUM_THREADS=$(( _cpu_cores / DGXNGPU > 0 ? _cpu_cores / DGXNGPU : 1 ))
_cpu_workers=$(( DGXNGPU > 1 || _cpu_cores < 2 ? 1 : 2 ))

export EXTRA_PARAMS="--preset ssd_tiny --synthetic --device cpu --data-backend torch
 --batch-size ${BATCHSIZE} --eval-batch-size 64 --lr 0.05 --warmup-steps 100 --weight-decay 5e-4
 --lr-decay-epochs 8 10 --epochs 12 --eval-every 1 --eval-start 2 --max-samples 1
 --num-workers ${_cpu_workers} --log-every 20${SEED:+ --seed ${SEED}}"
unset _cpu_cores _cpu_workers
