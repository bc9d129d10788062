#!/bin/bash
# Download, into a folder, the wheels the harness needs beyond PyTorch, for Linux x86-64 and
# one Python version, so that a GPU node without network can install them
# (scripts/gpu_check.sh, docs/GPU.md). Run anywhere with access to the package index.
#
#   scripts/make_wheelhouse.sh DEST PY_VERSION        (make wheelhouse PY=3.12)
#
# DEST gets: numpy, pillow, pycocotools, faster-coco-eval, mlperf-logging (+ pyyaml, all its compliance checker
# imports), pytest (+ iniconfig, pluggy, packaging, pygments): about 20 MB. Each without its
# dependencies (the list is complete for what the check imports; mlperf-logging's pandas and
# scipy serve tools the check does not run).
# Optional: TORCHVISION=<version> adds torchvision (no dependencies) for nodes whose PyTorch
# comes without it (the version must match theirs: torch 2.11 <-> torchvision 0.26.0);
# TORCHVISION_INDEX=<url> takes it from another index (e.g. https://download.pytorch.org/whl/cu130).
# DALI=1 adds nvidia-dali-cuda130 and its dependencies (about 200 MB more).
# PIP: the pip command (default: .venv/bin/python -m pip if present, else python3 -m pip).
set -euo pipefail

# -h: the header above, nothing else done.
case "${1:-}" in
    -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
esac

die() { printf 'make_wheelhouse.sh: error: %s\n' "$*" >&2; exit 2; }

dest="${1:?usage: make_wheelhouse.sh DEST PY_VERSION}"
py_version="${2:?usage: make_wheelhouse.sh DEST PY_VERSION (e.g. 3.12)}"
[[ "${py_version}" =~ ^3\.[0-9]+$ ]] || die "PY_VERSION must look like 3.12, not ${py_version}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PIP:-}" ]]; then
    read -r -a pip <<< "${PIP}"
elif [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
    pip=("${REPO_ROOT}/.venv/bin/python" -m pip)
else
    pip=(python3 -m pip)
fi
abi="cp${py_version/./}"
target=(--only-binary=:all: --python-version "${py_version}" --implementation cp --abi "${abi}" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
        --disable-pip-version-check --dest "${dest}")
mkdir -p "${dest}"
"${pip[@]}" download "${target[@]}" --no-deps \
    numpy pillow pycocotools faster-coco-eval mlperf-logging pyyaml pytest iniconfig pluggy packaging pygments
if [[ -n "${TORCHVISION:-}" ]]; then
    index=()
    [[ -n "${TORCHVISION_INDEX:-}" ]] && index=(--index-url "${TORCHVISION_INDEX}")
    "${pip[@]}" download "${target[@]}" --no-deps "${index[@]}" "torchvision==${TORCHVISION}"
fi
if [[ "${DALI:-0}" == 1 ]]; then
    "${pip[@]}" download "${target[@]}" nvidia-dali-cuda130
fi
echo "wheelhouse ${dest} (Python ${py_version}, Linux x86-64): $(find "${dest}" -name '*.whl' | wc -l) wheels, $(du -sh "${dest}" | cut -f1)"
