# shellcheck shell=bash
# config_DGXH100_8x8.sh: 8 nodes x 8 NVIDIA H100 = 64 GPUs, closed division (SLURM: run.sub).
#
# Global batch 1536 = 24 per GPU, the batch of the v1.1 reference convergence point
# (mean 55 epochs to 0.23). LR 0.15 = 0.09 x 1536/912: linear scaling of the tuned 912
# recipe. Warm-up 650 iterations with factor 1, as in the 912 recipe: ~8.5 epochs of 76 iterations at
# this batch instead of ~5, a longer warm-up for the larger LR. Decay after epochs 44 and 55, weight decay 1.3e-4,
# evaluation every 5 epochs. A starting point, not yet run: check a set of runs with the
# RCP checker (rcp_checker --rcp_version 1.1.0) before submitting.
#
#   source configs/config_DGXH100_8x8.sh
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> sbatch -N "${DGXNNODES}" -t "${WALLTIME}" run.sub

export DGXSYSTEM="DGXH100_8x8"
export DGXNNODES=8
export DGXNGPU=8
export BATCHSIZE=24
export NEXP="${NEXP:-5}"
export WALLTIME="${WALLTIME:-01:00:00}" # all NEXP runs (a few minutes each, plus start-up)

export EXTRA_PARAMS="--device cuda --batch-size ${BATCHSIZE} --lr 0.15 --warmup-steps 650 --warmup-factor 1
 --weight-decay 1.3e-4 --lr-decay-epochs 44 55 --eval-every 5 --max-samples 1
 --num-workers 8"
