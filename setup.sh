#!/usr/bin/env bash
# Build the benchmark image from this folder and print the tag to use as CONT.
#
#   ./setup.sh [-t TAG] [--base-image IMAGE] [-- EXTRA DOCKER BUILD ARGS...]
#
# Options / environment:
#   -t, --tag TAG       image tag (env IMAGE_TAG; default single_stage_detector:<git commit>,
#                       or single_stage_detector:latest outside a git checkout)
#   --base-image IMAGE  NGC PyTorch base image (env BASE_IMAGE; default: the Dockerfile's)
#   DOCKER              client command (default docker)
# Arguments after -- go to docker build as they are (e.g. --no-cache, --pull).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

TAG="${IMAGE_TAG:-}"
BASE="${BASE_IMAGE:-}"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -t | --tag) [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a tag"; TAG="$2"; shift 2 ;;
        --base-image) [[ $# -ge 2 && -n "$2" ]] || die "$1 needs an image"; BASE="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

if [[ -z "${TAG}" ]]; then
    version="$(git -C "${SCRIPT_DIR}" describe --always --dirty 2> /dev/null || true)"
    TAG="single_stage_detector:${version:-latest}"
fi
[[ "${TAG}" =~ ^[A-Za-z0-9][A-Za-z0-9._/:-]*$ ]] || die "'${TAG}' is not a valid image tag"

DOCKER="${DOCKER:-docker}"
command -v "${DOCKER}" > /dev/null || die "'${DOCKER}' not found on PATH (install Docker, or set DOCKER)"

build_args=(build --tag "${TAG}" --file "${SCRIPT_DIR}/Dockerfile")
if [[ -n "${BASE}" ]]; then build_args+=(--build-arg "BASE_IMAGE=${BASE}"); fi
build_args+=("${extra[@]}" "${SCRIPT_DIR}")

echo "building ${TAG} from ${SCRIPT_DIR}${BASE:+ on ${BASE}}"
"${DOCKER}" "${build_args[@]}"
echo
echo "built ${TAG}; run the benchmark with:"
echo "  CONT=${TAG} DATADIR=<data> LOGDIR=<logs> DGXSYSTEM=<system> ./run_with_docker.sh"
echo "CONT=${TAG}"
