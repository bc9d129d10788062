# shellcheck shell=bash
# config_1xH100_YOLOV1.sh: YOLOv1 on an ImageNet ResNet-34 (preset yolov1_resnet34) on one
# NVIDIA H100/H200, open division: the paper's schedule with seed 000's frozen-then-fine-tuned
# backbone.
#
# The paper (arXiv:1506.02640 section 2.2): 135 epochs, batch 64, momentum 0.9, decay 5e-4; the
# LR rises from 1e-3 to 1e-2 over the first epochs, stays at 1e-2 until epoch 75, then 1e-3 for
# 30 epochs and 1e-4 for the last 30 (x0.1 after epochs 75 and 105). Warm-up: 2 epochs of COCO
# train2017 (117,266 images with boxes / 64 = 1,833 steps per epoch; the paper gives no length),
# from LR/2 (factor 1). The loss is summed over the batch and divided by it, as darknet divides
# its LR by the batch, so the LR is the paper's. Seed 000: the backbone frozen during the first
# epochs, then fine-tuned at a lower LR; it gives no numbers: frozen 5 epochs, then LR x 0.1
# (ours). Backbone: torchvision's ImageNet ResNet-34, resnet34-333f7ec4.pth (kept by
# scripts/get_resnet34_backbone.sh next to the .npz; put it in BACKBONE_DIR or DATADIR). Stops
# at the preset's target (COCO AP 0.15; no published COCO figure exists for YOLOv1). Seed 000's
# anchor shapes from the dataset: append --anchors kmeans:2 to EXTRA_PARAMS (k-means on the
# training boxes at start; not measured on COCO, +0.04 to +0.11 AP on the synthetic demo).
#
#   CONT=<image> DATADIR=<dir> LOGDIR=<dir> DGXSYSTEM=1xH100_YOLOV1 ./run_with_docker.sh

export DGXSYSTEM="1xH100_YOLOV1"
export DGXNNODES=1
export DGXNGPU=1
export BATCHSIZE=64
export NEXP="${NEXP:-1}"
export WALLTIME="${WALLTIME:-72:00:00}"
# Looked up by scripts/run_and_time.sh in BACKBONE_DIR, then DATADIR (inside the container).
export BACKBONE_FILE=resnet34-333f7ec4.pth

export EXTRA_PARAMS="--preset yolov1_resnet34 --device cuda --batch-size ${BATCHSIZE} --lr 0.01
 --momentum 0.9 --weight-decay 5e-4 --warmup-steps 3666 --warmup-factor 1 --epochs 135
 --lr-decay-epochs 75 105 --freeze-backbone-epochs 5 --backbone-lr-mult 0.1 --eval-every 5
 --eval-start 20 --num-workers 16"
