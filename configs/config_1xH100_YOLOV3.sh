# shellcheck shell=bash
# config_1xH100_YOLOV3.sh: YOLOv3 (preset yolov3_darknet53) on one NVIDIA H100/H200 with
# darknet's own schedule (cfg/yolov3.cfg), open division.
#
# darknet: batch 64, LR 1e-3, momentum 0.9, decay 5e-4, burn-in 1,000 steps with
# lr x (step / 1000)^4, 500,200 steps, x0.1 at steps 400,000 and 450,000, a new input size
# in 320..608 every 10 batches. In epochs of COCO train2017 (117,266 images with boxes) at
# batch 64: 500,200 steps = 273 epochs, decays after epochs 218 and 246. The loss is summed
# over the batch and divided by it, as darknet divides its LR by the batch, so the LR is
# darknet's. Backbone: darknet's ImageNet Darknet-53 (darknet53.conv.74, put it in
# BACKBONE_DIR or DATADIR). Stops at the preset's target (COCO AP 0.30 at 416).
# Evaluation every 10 epochs from epoch 103, so that the last one is after epoch 273, the
# fully trained model.
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=1xH100_YOLOV3 ./run_with_docker.sh

export DGXSYSTEM="1xH100_YOLOV3"
export DGXNNODES=1
export DGXNGPU=1
export BATCHSIZE=64
export NEXP="${NEXP:-1}"
export WALLTIME="${WALLTIME:-99:00:00}"
# Looked up by scripts/run_and_time.sh in BACKBONE_DIR, then DATADIR (inside the container).
export BACKBONE_FILE=darknet53.conv.74

export EXTRA_PARAMS="--preset yolov3_darknet53 --device cuda --batch-size ${BATCHSIZE} --lr 0.001
 --momentum 0.9 --weight-decay 5e-4 --warmup-type power --warmup-power 4 --warmup-steps 1000
 --epochs 273 --lr-decay-epochs 218 246 --multi-scale 320 608 --eval-every 10 --eval-start 103
 --num-workers 16"
