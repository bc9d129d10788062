#!/bin/bash
# The GPU check, without a GPU, under the PyTorch and Python of a GPU node rather than ours:
# by default torch 2.11.0 + torchvision 0.26.0 (CUDA 13.0 builds) on Python 3.12, the versions of
# the H200 node the check is written for, which are older than the pinned torch of `make test`.
# It installs the way a node without network does (a wheel folder from make_wheelhouse.sh, then
# scripts/gpu_check.sh with pip --no-index), runs the check's --smoke steps (everything that
# can run on the CPU, at toy sizes: the benchmark modes, torch.compile, inference, a training
# run and the 1.0.0 check of its log) and the CPU tests of the fast path under those versions.
# CI runs it, so that an API the node's torch lacks fails here and not in scarce GPU time.
#
#   scripts/gpu_check_compat.sh [OUT_DIR]        (make gpu-check-compat)
#
# NODE_PY (default 3.12): the node's Python version; an interpreter pythonNODE_PY must be on
# PATH or in pyenv. NODE_TORCH (default "torch==2.11.0 torchvision==0.26.0"): the node's
# PyTorch. NODE_VENV (default .venv-node): the stand-in node's environment, given what such a
# node has (torch, torchvision, numpy, pillow, pytest, pyyaml), and reused when it exists.
# OUT_DIR (default output/gpu_check_compat) receives the check's report and the wheel folder.
# Exit status: 1 when a step or test failed; 2 when the set-up failed; 0, with a line
# starting "gpu_check_compat.sh: SKIPPED", when this machine has no such Python or less than
# 15 GB of free disk (the CUDA build of torch takes about 5 GB).
set -euo pipefail

case "${1:-}" in
    -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
esac

die() { printf 'gpu_check_compat.sh: error: %s\n' "$*" >&2; exit 2; }
skip() { printf 'gpu_check_compat.sh: SKIPPED: %s\n' "$*"; exit 0; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"
py_version="${NODE_PY:-3.12}"
node_torch="${NODE_TORCH:-torch==2.11.0 torchvision==0.26.0}"
venv="${NODE_VENV:-.venv-node}"
out="${1:-output/gpu_check_compat}"

# pythonX.Y on PATH (a pyenv shim counts only if it runs), else pyenv's newest X.Y.
interpreter=""
if python"${py_version}" --version > /dev/null 2>&1; then
    interpreter="$(command -v python"${py_version}")"
elif command -v pyenv > /dev/null 2>&1; then
    interpreter="$(find "$(pyenv root)/versions" -maxdepth 3 -path "*/versions/${py_version}.*/bin/python${py_version}" \
                   2>/dev/null | sort -V | tail -n 1)"
fi
[[ -n "${interpreter}" ]] || skip "no Python ${py_version} on this machine (PATH or pyenv)"

if [[ ! -x "${venv}/bin/python" ]]; then
    free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
    [[ "${free_gb}" -ge 15 ]] || skip "${free_gb} GB of free disk here; the node's torch needs about 15 GB to install"
    echo "gpu_check_compat.sh: ${venv}: Python ${py_version} (${interpreter}) with ${node_torch}"
    "${interpreter}" -m venv "${venv}" || die "could not create ${venv}"
    # What a GPU node brings before the check's wheel folder: torch (+ numpy, pillow), pytest, pyyaml.
    read -r -a torch_specs <<< "${node_torch}"
    "${venv}/bin/python" -m pip install -q --disable-pip-version-check "${torch_specs[@]}" pytest pyyaml \
        2>&1 | grep -v "is ignored: it is neither" || true
    "${venv}/bin/python" -c 'import torch, torchvision, numpy, PIL, pytest, yaml' \
        || { rm -rf "${venv}"; die "installing ${node_torch} for Python ${py_version} failed"; }
fi

mkdir -p "${out}"
PIP="${venv}/bin/python -m pip" scripts/make_wheelhouse.sh "${out}/wheelhouse" "${py_version}" \
    || die "making the wheel folder failed"
status=0
WHEELHOUSE="${out}/wheelhouse" PYTHON="${venv}/bin/python" GPU_CHECK_SITE="${out}/site" \
    scripts/gpu_check.sh "${out}/check" --smoke || status=1
# The fast path's CPU tests (the graph step's own loop with tensor LRs and fused SGD, the
# refusals, the check itself) with the packages the check installed. Their subprocesses start
# with a clean environment: the repository and the check's folder reach them through a .pth
# file in the stand-in's site-packages, removed afterwards.
pth="$("${venv}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu_check_compat.pth"
trap 'rm -f "${pth}"' EXIT
printf '%s\n%s\n' "${REPO_ROOT}" "$(cd "${out}/site" && pwd)" > "${pth}"
"${venv}/bin/python" -m pytest -q -p no:cacheprovider -m "not demo" tests/test_fast_path.py tests/test_gpu_check.py \
    || status=1
echo "gpu_check_compat.sh: $("${venv}/bin/python" -c 'import torch, sys; print(f"torch {torch.__version__}, Python {sys.version.split()[0]}")'): $([[ ${status} == 0 ]] && echo passed || echo FAILED)"
exit "${status}"
