#!/usr/bin/env bash
# Fetch torchvision's ImageNet ResNet-34, check its SHA-256 and convert it into the
# backbone file the trainer loads (scripts/torch_to_numpy.py; format in docs/DATA.md).
set -euo pipefail

OFFICIAL_URL="https://download.pytorch.org/models/resnet34-333f7ec4.pth"
# Full SHA-256 of resnet34-333f7ec4.pth (87,306,240 bytes); torchvision names its files
# after the first 8 hex digits of this hash.
OFFICIAL_SHA256="333f7ec4c6338da2cbed37f1fc0445f9624f1355633fa1d7eab79a91084c6cef"

usage() {
    cat <<'EOF'
usage: scripts/get_resnet34_backbone.sh [--from FILE.pth] [-o OUT.npz] [-h]

Downloads https://download.pytorch.org/models/resnet34-333f7ec4.pth into $OUTDIR (resuming
a partial download), checks its SHA-256, and writes $OUTDIR/resnet34-backbone.npz with
scripts/torch_to_numpy.py.  A .pth already in $OUTDIR that passes the check is reused.

Options:
  --from FILE   convert a checkpoint you already have instead of downloading
  -o OUT.npz    output file (default $OUTDIR/resnet34-backbone.npz)
  -h, --help    this text

Environment:
  OUTDIR          output folder (default: current folder)
  BACKBONE_URL    download from here instead of the official URL
  BACKBONE_SHA256 expected SHA-256 of the .pth (default: the official file's hash)
  PYTHON          interpreter with torch and numpy (default: the repository's .venv/bin/python
                  when it exists, else python3); checked before anything is downloaded
EOF
}

log() { printf 'get_resnet34_backbone: %s\n' "$*"; }
die() { printf 'get_resnet34_backbone: ERROR: %s\n' "$*" >&2; exit 1; }

FROM=""
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --from) [[ $# -ge 2 ]] || die "--from needs a file"; FROM="$2"; shift 2 ;;
        -o | --output) [[ $# -ge 2 ]] || die "$1 needs a file"; OUT="$2"; shift 2 ;;
        *) usage >&2; echo "get_resnet34_backbone.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$SCRIPT_DIR/../.venv/bin/python" ]]; then PYTHON="$SCRIPT_DIR/../.venv/bin/python"; else PYTHON=python3; fi
fi
# The conversion needs torch and numpy: find out now, not after an 87 MB download.
command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter '$PYTHON' not found (set PYTHON, or run 'make venv')"
"$PYTHON" -c 'import numpy, torch' >/dev/null 2>&1 ||
    die "'$PYTHON' cannot import torch and numpy, which the conversion needs: run 'make venv' (the script then uses .venv/bin/python) or set PYTHON to an interpreter that has them"
OUTDIR="${OUTDIR:-.}"
OUT="${OUT:-$OUTDIR/resnet34-backbone.npz}"
URL="${BACKBONE_URL:-$OFFICIAL_URL}"
SHA256="$(printf '%s' "${BACKBONE_SHA256:-$OFFICIAL_SHA256}" | tr 'A-F' 'a-f')"
[[ "$SHA256" =~ ^[0-9a-f]{64}$ ]] || die "BACKBONE_SHA256 must be 64 hex digits, not '$SHA256'"

# Succeeds when file $1 has the expected SHA-256; sets GOT_SHA256.
GOT_SHA256=""
check_sha256() {
    GOT_SHA256="$(sha256sum "$1" | awk '{ print $1 }')"
    [[ "$GOT_SHA256" == "$SHA256" ]]
}

# Download URL $1 into $2 (continuing a partial $2); dies with a sentence naming the URL.
fetch() {
    local url="$1" out="$2" rc=0 code=""
    if command -v curl >/dev/null 2>&1; then
        log "downloading $url with curl"
        code="$(curl --silent --show-error --fail --location --connect-timeout 30 --retry 3 \
            --continue-at - --output "$out" --write-out '%{http_code}' "$url")" || rc=$?
        if [[ "$rc" -eq 22 && "$code" == 416 ]]; then
            return 0  # the partial file was already complete
        fi
        case "$rc" in
            0) return 0 ;;
            6) die "could not download $url: the host name could not be resolved (curl exit 6)" ;;
            7) die "could not download $url: could not connect to the server (curl exit 7)" ;;
            22) die "could not download $url: the server answered HTTP $code (curl exit 22)" ;;
            28) die "could not download $url: the connection timed out (curl exit 28)" ;;
            *) die "could not download $url: curl failed with exit status $rc" ;;
        esac
    elif command -v wget >/dev/null 2>&1; then
        log "downloading $url with wget"
        wget --quiet --continue --tries=4 --timeout=60 --output-document="$out" "$url" ||
            die "could not download $url: wget failed with exit status $? (4 = network failure, 8 = HTTP error)"
    else
        die "neither curl nor wget is installed; install one, or download $url yourself and use --from"
    fi
}

if [[ -n "$FROM" ]]; then
    [[ -f "$FROM" ]] || die "--from $FROM: no such file"
    PTH="$FROM"
    check_sha256 "$PTH" || die "SHA-256 mismatch for $PTH: expected $SHA256, got $GOT_SHA256.
    This is not torchvision's resnet34-333f7ec4.pth (set BACKBONE_SHA256 to accept another file)."
    log "$PTH: SHA-256 ok"
else
    mkdir -p "$OUTDIR"
    PTH="$OUTDIR/$(basename "${URL%%\?*}")"
    if [[ -f "$PTH" ]] && check_sha256 "$PTH"; then
        log "$PTH already present, SHA-256 ok"
    else
        if [[ -f "$PTH" ]]; then
            mv -f "$PTH" "$PTH.part"  # wrong or incomplete: try to complete it
        fi
        fetch "$URL" "$PTH.part"
        if ! check_sha256 "$PTH.part"; then
            mv -f "$PTH.part" "$PTH.bad"
            die "SHA-256 mismatch for $URL: expected $SHA256, got $GOT_SHA256.
    Moved the file to $PTH.bad for inspection; delete it and re-run to download again."
        fi
        mv -f "$PTH.part" "$PTH"
        log "$PTH: SHA-256 ok"
    fi
fi

mkdir -p "$(dirname "$OUT")"
"$PYTHON" "$SCRIPT_DIR/torch_to_numpy.py" "$PTH" "$OUT" || die "scripts/torch_to_numpy.py failed on $PTH"
log "backbone ready: $OUT"
