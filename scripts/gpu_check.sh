#!/bin/bash
# The GPU check (docs/GPU.md): install what the harness needs beyond PyTorch from a local
# wheel folder (no network), then run `python -m single_stage_detector.gpu_check`.
#
#   WHEELHOUSE=wheelhouse scripts/gpu_check.sh [OUT_DIR] [gpu_check flags]
#   WHEELHOUSE=wheelhouse make gpu-check OUT=dir
#
# OUT_DIR (default: $OUT, else output/gpu_check) receives gpu_check.json, gpu_check.md and
# logs/. WHEELHOUSE: a folder made by `make wheelhouse PY=<python version>` (unset: use what is
# installed). The node's own torch (and torchvision, numpy, pillow when present) is used as
# it is: only the modules it lacks are installed, into a scratch folder (GPU_CHECK_SITE,
# default OUT_DIR/site) put on PYTHONPATH. DALI, when its wheel is in WHEELHOUSE and the node
# has none, is installed with its dependencies (optional: failing to install it is a warning).
# PYTHON: the interpreter with torch (default python3). Exit status: the check's (1 when a
# step failed, naming it), or 2 when the installation failed.
set -euo pipefail

# -h: the header above, nothing else done.
case "${1:-}" in
    -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
esac

die() { printf 'gpu_check.sh: error: %s\n' "$*" >&2; exit 2; }

# unpack_wheels NAME...: the wheel of each distribution NAME from WHEELHOUSE, unpacked into
# ${site} (what pip --target --no-deps does for these wheels, which have no scripts).
unpack_wheels() {
    local name wheel
    for name in "$@"; do
        wheel="$(find "${WHEELHOUSE}" -maxdepth 1 -iname "${name//-/_}-*.whl" | sort | tail -n 1)"
        [[ -n "${wheel}" ]] || { printf 'gpu_check.sh: no wheel of %s in %s\n' "${name}" "${WHEELHOUSE}" >&2; return 1; }
        "${PYTHON}" -m zipfile -e "${wheel}" "${site}" || return 1
    done
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-output/gpu_check}"
if [[ $# -gt 0 && "$1" != -* ]]; then
    out="$1"
    shift
fi
PYTHON="${PYTHON:-python3}"
mkdir -p "${out}"
out="$(cd "${out}" && pwd)"

"${PYTHON}" -c 'import torch' 2>/dev/null \
    || die "${PYTHON} cannot import torch: the check uses the node's own PyTorch (set PYTHON=...)"
pythonpath="${REPO_ROOT}"

if [[ -n "${WHEELHOUSE:-}" ]]; then
    [[ -d "${WHEELHOUSE}" ]] || die "WHEELHOUSE=${WHEELHOUSE} is not a folder (make it with: make wheelhouse PY=<version>)"
    site="${GPU_CHECK_SITE:-${out}/site}"
    # Only what this interpreter lacks, each without dependencies (the list is closed under
    # what the check imports), so nothing the node has is shadowed.
    missing=()
    for spec in numpy:numpy PIL:pillow pycocotools:pycocotools faster_coco_eval:faster-coco-eval \
                mlperf_logging:mlperf-logging yaml:pyyaml \
                pytest:pytest iniconfig:iniconfig pluggy:pluggy packaging:packaging pygments:pygments; do
        "${PYTHON}" -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}")
    done
    if "${PYTHON}" -m pip --version > /dev/null 2>&1; then
        pip_with_deps=("${PYTHON}" -m pip install --no-index --find-links "${WHEELHOUSE}" --only-binary=:all:
                       --upgrade --target "${site}" --disable-pip-version-check --no-warn-script-location -q)
        pip=("${pip_with_deps[@]}" --no-deps)
    else
        # No pip on the node: a wheel without dependencies installs by unpacking it.
        pip=(unpack_wheels)
        echo "gpu_check.sh: ${PYTHON} has no pip; unpacking the wheels instead"
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "gpu_check.sh: installing ${missing[*]} from ${WHEELHOUSE} into ${site}"
        "${pip[@]}" "${missing[@]}" || die "installing ${missing[*]} from ${WHEELHOUSE} failed (made for another Python version? see above)"
    fi
    # torchvision imports pillow: checked with what was just installed.
    if ! PYTHONPATH="${site}" "${PYTHON}" -c 'import torchvision' 2>/dev/null; then
        compgen -G "${WHEELHOUSE}/torchvision-*.whl" > /dev/null \
            || die "this PyTorch has no (working) torchvision and ${WHEELHOUSE} holds none (make wheelhouse TORCHVISION=<version>)"
        # Without dependencies: torchvision must not bring a torch of its own.
        "${pip[@]}" torchvision || die "installing torchvision from ${WHEELHOUSE} failed"
    fi
    if ! "${PYTHON}" -c 'import nvidia.dali' 2>/dev/null && compgen -G "${WHEELHOUSE}/nvidia_dali*.whl" > /dev/null; then
        if [[ "${pip[0]}" == unpack_wheels ]]; then
            echo "gpu_check.sh: WARNING: DALI needs pip to install; its step will be skipped" >&2
        else
            "${pip_with_deps[@]}" nvidia-dali-cuda130 \
                || echo "gpu_check.sh: WARNING: installing DALI failed; its step will be skipped" >&2
        fi
    fi
    pythonpath="${REPO_ROOT}:${site}"
fi

export PYTHONPATH="${pythonpath}${PYTHONPATH:+:${PYTHONPATH}}"
cd "${REPO_ROOT}"
exec "${PYTHON}" -m single_stage_detector.gpu_check --out "${out}" "$@"
