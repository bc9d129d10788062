# shellcheck shell=bash
# config_1xH100_YOLOV2.sh: YOLOv2 (preset yolov2_darknet19) on one NVIDIA H100/H200 with the
# paper's detection schedule and darknet's yolov2.cfg settings, open division.
#
# Paper (arXiv:1612.08242 section 3, "Training for detection"): 160 epochs, LR 1e-3 divided by
# 10 at epochs 60 and 90, weight decay 5e-4, momentum 0.9, a new input size in 320..608 every
# 10 batches. darknet's yolov2.cfg: batch 64, burn-in 1,000 steps with lr x (step / 1000)^4.
# The region loss is summed over the batch and divided by it, as darknet divides its LR by the
# batch, so the LR is darknet's. Backbone: darknet's ImageNet Darknet-19 at 448
# (darknet19_448.conv.23, put it in BACKBONE_DIR or DATADIR). Stops at the preset's target
# (COCO AP 0.21, the published test-dev 21.6).
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=1xH100_YOLOV2 ./run_with_docker.sh

export DGXSYSTEM="1xH100_YOLOV2"
export DGXNNODES=1
export DGXNGPU=1
export BATCHSIZE=64
export NEXP="${NEXP:-1}"
export WALLTIME="${WALLTIME:-72:00:00}"
# Looked up by scripts/run_and_time.sh in BACKBONE_DIR, then DATADIR (inside the container).
export BACKBONE_FILE=darknet19_448.conv.23

export EXTRA_PARAMS="--preset yolov2_darknet19 --device cuda --batch-size ${BATCHSIZE} --lr 0.001
 --momentum 0.9 --weight-decay 5e-4 --warmup-type power --warmup-power 4 --warmup-steps 1000
 --epochs 160 --lr-decay-epochs 60 90 --multi-scale 320 608 --eval-every 10 --eval-start 60
 --num-workers 16"
