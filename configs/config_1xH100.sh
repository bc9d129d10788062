# shellcheck shell=bash
# config_1xH100.sh: a single NVIDIA H100, closed division.
#
# The recipe of config_1xA100.sh (batch 114, LR 0.01125 = 0.09 x 114/912, warm-up 1,000 with
# factor 1, weight decay 1.3e-4, decay after epochs 44 and 55, evaluation every 5 epochs); only the
# wall time differs (an H100 is expected to be about twice as fast; not measured yet).
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=1xH100 ./run_with_docker.sh

export DGXSYSTEM="1xH100"
export DGXNNODES=1
export DGXNGPU=1
export BATCHSIZE=114
export NEXP="${NEXP:-5}"
export WALLTIME="${WALLTIME:-06:00:00}" # all NEXP runs

export EXTRA_PARAMS="--device cuda --batch-size ${BATCHSIZE} --lr 0.01125 --warmup-steps 1000 --warmup-factor 1
 --weight-decay 1.3e-4 --lr-decay-epochs 44 55 --eval-every 5 --max-samples 1
 --num-workers 16"
