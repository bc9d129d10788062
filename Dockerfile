# syntax=docker/dockerfile:1
# The benchmark image: NGC PyTorch (CUDA, cuDNN, NCCL, PyTorch, DALI, apex) plus what it
# lacks. Build with ./setup.sh (or: docker build -t single_stage_detector .); run with
# run_with_docker.sh. Everything copied comes from this folder (the build context);
# .dockerignore keeps data, logs, outputs, .venv and .git out of it.
#
# 25.05: CUDA 12.9, supports Ampere (A100) and Hopper (H100/H200). A newer NGC release
# works too: docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.05-py3
FROM ${BASE_IMAGE}

# OMP_NUM_THREADS=1: one thread per training process and data-loader worker (the GPU does
# the math; more threads only oversubscribe the cores); config_CPU.sh raises it.
# Caches go to /tmp so that any uid (docker run --user) can write them.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    DATADIR=/data \
    LOGDIR=/results

WORKDIR /workspace/ssd

# Only what the base image lacks; torch, torchvision, numpy, pillow and DALI stay the
# base image's own builds (the package itself goes in with --no-deps below). The checker
# version is pinned; pycocotools, faster-coco-eval and matplotlib (plots of the log tools) take a lower bound
# so that a copy the base image (or its pip constraint file) already has is kept.
RUN pip install --no-cache-dir \
        "mlperf-logging==4.1.68" \
        "pycocotools>=2.0.7" \
        "faster-coco-eval>=1.8" \
        "matplotlib>=3.7"

COPY . /workspace/ssd
RUN pip install --no-cache-dir --no-deps --no-build-isolation /workspace/ssd \
    && chmod -R a+rX /workspace/ssd \
    && mkdir -p /data /results /backbone /tmp/.cache \
    && chmod 1777 /results /tmp/.cache \
    && python -c "import single_stage_detector, mlperf_logging, pycocotools, faster_coco_eval"

CMD ["/bin/bash"]
