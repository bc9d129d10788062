# shellcheck shell=bash
# config_1xA100.sh: a single NVIDIA A100 (workstation or one GPU of a server), closed division.
#
# 114 images per step (the per-GPU batch of config_DGXA100.sh, known to fit in 40 GB).
# LR 0.01125 = 0.09 x 114/912: linear scaling of the 8-GPU recipe (the reference rule,
# 2.5e-3 x 114/32 = 0.0089, is close). Warm-up 1,000 iterations = about one epoch of the
# 1,029 at this batch (small batches need little), warm-up factor 1 as in the 8-GPU recipe
# (NVIDIA v0.7's default). Weight decay 1.3e-4, decay after epochs
# 44 and 55, evaluation every 5 epochs as in the 8-GPU recipe.
# Time: ~50 epochs at ~1,200 img/s is about 1.5 h per run.
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=1xA100 ./run_with_docker.sh

export DGXSYSTEM="1xA100"
export DGXNNODES=1
export DGXNGPU=1
export BATCHSIZE=114
export NEXP="${NEXP:-5}"
export WALLTIME="${WALLTIME:-10:00:00}" # all NEXP runs

export EXTRA_PARAMS="--device cuda --batch-size ${BATCHSIZE} --lr 0.01125 --warmup-steps 1000 --warmup-factor 1
 --weight-decay 1.3e-4 --lr-decay-epochs 44 55 --eval-every 5 --max-samples 1
 --num-workers 16"
