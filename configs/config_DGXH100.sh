# shellcheck shell=bash
# config_DGXH100.sh: one node, 8x NVIDIA H100 (DGX H100 or similar), closed division.
#
# Same recipe as config_DGXA100.sh: 114 per GPU = global batch 912, LR 0.09, warm-up 650
# with factor 1 (NVIDIA v0.7's), weight decay 1.3e-4, decay after epochs 44 and 55, evaluation every 5 epochs.
# Why not a bigger batch on the bigger GPU: 912 is the batch with a known-good recipe
# converging in ~50 epochs; the RCPs say bigger global batches need more epochs (1536: 55,
# 2048: ~65), which would give back much of the gain, and a new batch needs a newly tuned
# LR. 114 images per GPU already keep an H100 busy. Revisit once measured.
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=DGXH100 ./run_with_docker.sh

export DGXSYSTEM="DGXH100"
export DGXNNODES=1
export DGXNGPU=8
export BATCHSIZE=114
export NEXP="${NEXP:-5}"
export WALLTIME="${WALLTIME:-01:30:00}" # all NEXP runs

# Data loading: 12 worker processes per GPU (a DGX H100 has 112 cores); not tuned yet.
export EXTRA_PARAMS="--device cuda --batch-size ${BATCHSIZE} --lr 0.09 --warmup-steps 650 --warmup-factor 1
 --weight-decay 1.3e-4 --lr-decay-epochs 44 55 --eval-every 5 --max-samples 1
 --num-workers 12"
