#!/usr/bin/env bash
# Download, verify and unpack COCO 2017, then write the bbox-only annotation files the
# SSD benchmark trains and evaluates on.  See docs/DATA.md for the whole procedure.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: DATADIR=/path/to/data ./init_datasets.sh [-h]

Downloads train2017.zip, val2017.zip and annotations_trainval2017.zip (about 20.4 GB),
verifies each against scripts/coco2017.md5, unpacks them into
    $DATADIR/coco2017/{train2017,val2017,annotations}
and writes
    $DATADIR/coco2017/annotations/bbox_only_instances_{train,val}2017.json
with scripts/prepare-json.py.  Archives are kept in $DATADIR/downloads.

Safe to re-run: finished steps are skipped (markers in $DATADIR/.init_datasets) and an
interrupted download resumes from its .part file.  Needs about 43 GB free.

Environment:
  DATADIR            (required) where the data goes
  COCO_MIRROR        base URL holding zips/ and annotations/
                     (default http://images.cocodataset.org)
  COCO_CHECKSUMS     checksum file, "<md5 or sha256>  <file name>" lines
                     (default scripts/coco2017.md5 next to this script)
  COCO_NEEDED_BYTES  free space required before downloading (default 43000000000;
                     bytes already downloaded are subtracted)
  COCO_RETRIES       download retries on transient errors (default 5)
  COCO_DOWNLOADER    curl or wget (default: curl if installed, else wget)
  COCO_UNPACKER      unzip or python (default: unzip if installed, else python)
  PYTHON             Python interpreter for scripts/prepare-json.py (default python3)
EOF
}

if [[ $# -gt 0 ]]; then
    case "$1" in
        -h | --help) usage; exit 0 ;;
        *) usage >&2; echo "init_datasets.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
fi

: "${DATADIR:?set DATADIR to the folder that will hold coco2017/ (see ./init_datasets.sh -h)}"

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
COCO_MIRROR="${COCO_MIRROR:-http://images.cocodataset.org}"
COCO_MIRROR="${COCO_MIRROR%/}"
COCO_CHECKSUMS="${COCO_CHECKSUMS:-$REPO_DIR/scripts/coco2017.md5}"
COCO_NEEDED_BYTES="${COCO_NEEDED_BYTES:-43000000000}"
COCO_RETRIES="${COCO_RETRIES:-5}"

COCO_DIR="$DATADIR/coco2017"
DOWNLOAD_DIR="$DATADIR/downloads"
STATE_DIR="$DATADIR/.init_datasets"
ANN_DIR="$COCO_DIR/annotations"

# Archive name -> path under the mirror; annotations first: smallest, and a bad mirror or
# checksum file shows up before 19 GB have been fetched.
ARCHIVES=(annotations_trainval2017.zip val2017.zip train2017.zip)
declare -A REMOTE_PATH=(
    [annotations_trainval2017.zip]="annotations/annotations_trainval2017.zip"
    [val2017.zip]="zips/val2017.zip"
    [train2017.zip]="zips/train2017.zip"
)
# What each archive must have produced under $COCO_DIR once unpacked.
declare -A UNPACKED_CHECK=(
    [annotations_trainval2017.zip]="annotations/instances_train2017.json annotations/instances_val2017.json"
    [val2017.zip]="val2017"
    [train2017.zip]="train2017"
)

WORK_DONE=0

log() { printf 'init_datasets: %s\n' "$*"; }
die() { printf 'init_datasets: ERROR: %s\n' "$*" >&2; exit 1; }

# Checksum recorded for archive $1 in $COCO_CHECKSUMS.
expected_sum() {
    local name="$1" sum
    sum="$(awk -v f="$name" '$1 !~ /^#/ && ($2 == f || $2 == "*" f) { print tolower($1); exit }' \
        "$COCO_CHECKSUMS")"
    [[ -n "$sum" ]] || die "no checksum for $name in $COCO_CHECKSUMS"
    [[ "$sum" =~ ^([0-9a-f]{32}|[0-9a-f]{64})$ ]] ||
        die "checksum '$sum' for $name in $COCO_CHECKSUMS is neither MD5 (32 hex digits) nor SHA-256 (64)"
    printf '%s\n' "$sum"
}

# MD5 (32 hex digits) or SHA-256 (64) of file $1, whichever expected sum $2 is.
actual_sum() {
    local file="$1" expected="$2"
    case "${#expected}" in
        32) md5sum "$file" | awk '{ print $1 }' ;;
        *) sha256sum "$file" | awk '{ print $1 }' ;;
    esac
}

# Succeeds when file $1 matches the checksum of archive $2; sets GOT_SUM.
GOT_SUM=""
verify() {
    local file="$1" name="$2" expected
    expected="$(expected_sum "$name")"
    log "verifying $name ($(du -h "$file" | cut -f1), checksum from $COCO_CHECKSUMS)"
    GOT_SUM="$(actual_sum "$file" "$expected")"
    [[ "$GOT_SUM" == "$expected" ]]
}

# A sentence for curl's exit status $1 (HTTP status $2).
curl_reason() {
    case "$1" in
        6) echo "the host name could not be resolved (curl exit 6)" ;;
        7) echo "could not connect to the server: connection refused or host unreachable (curl exit 7)" ;;
        18) echo "the server closed the connection before the file was complete (curl exit 18)" ;;
        22) echo "the server answered HTTP $2$([[ "$2" == 404 ]] && echo ': no such file on this mirror') (curl exit 22)" ;;
        23) echo "the file could not be written: disk full or no permission? (curl exit 23)" ;;
        28) echo "the connection timed out (curl exit 28)" ;;
        35 | 60) echo "the TLS/SSL connection failed (curl exit $1)" ;;
        52) echo "the server sent an empty reply (curl exit 52)" ;;
        56) echo "the connection was reset while receiving data (curl exit 56)" ;;
        *) echo "curl failed with exit status $1 (see 'man curl', EXIT CODES)" ;;
    esac
}

# A sentence for wget's exit status $1.
wget_reason() {
    case "$1" in
        3) echo "the file could not be written: disk full or no permission? (wget exit 3)" ;;
        4) echo "network failure: could not connect, resolve the host or finish the transfer (wget exit 4)" ;;
        5) echo "the TLS/SSL connection failed (wget exit 5)" ;;
        8) echo "the server answered with an HTTP error, e.g. 404 no such file on this mirror (wget exit 8)" ;;
        *) echo "wget failed with exit status $1 (see 'man wget', EXIT STATUS)" ;;
    esac
}

pick_downloader() {
    local tool="${COCO_DOWNLOADER:-}"
    if [[ -z "$tool" ]]; then
        if command -v curl >/dev/null 2>&1; then tool=curl
        elif command -v wget >/dev/null 2>&1; then tool=wget
        else die "neither curl nor wget is installed; install one of them (apt-get install curl)"
        fi
    fi
    case "$tool" in
        curl | wget) command -v "$tool" >/dev/null 2>&1 || die "COCO_DOWNLOADER=$tool but $tool is not installed" ;;
        *) die "COCO_DOWNLOADER must be curl or wget, not '$tool'" ;;
    esac
    printf '%s\n' "$tool"
}

# Download URL $1 into $2, continuing a partial $2 (HTTP Range).  Dies with a sentence
# naming the URL when the transfer fails; the partial file is kept for the next run.
fetch() {
    local url="$1" out="$2" tool rc=0 code=""
    tool="$(pick_downloader)"
    if [[ -s "$out" ]]; then
        log "resuming $url at byte $(stat -c %s "$out") with $tool"
    else
        log "downloading $url with $tool"
    fi
    if [[ "$tool" == curl ]]; then
        local progress=(--silent --show-error)
        [[ -t 2 ]] && progress=(--progress-bar)
        code="$(curl "${progress[@]}" --fail --location --connect-timeout 30 \
            --retry "$COCO_RETRIES" --retry-delay 10 \
            --continue-at - --output "$out" --write-out '%{http_code}' "$url")" || rc=$?
        if [[ "$rc" -eq 22 && "$code" == 416 ]]; then
            # Range starts at the end of the file: an earlier run got all of it.
            log "server reports $(basename "$out") already complete"
            return 0
        fi
        if [[ "$rc" -eq 33 ]]; then
            log "the server does not support resuming; starting $(basename "$out") again"
            rm -f "$out"
            rc=0
            code="$(curl "${progress[@]}" --fail --location --connect-timeout 30 \
                --retry "$COCO_RETRIES" --retry-delay 10 \
                --output "$out" --write-out '%{http_code}' "$url")" || rc=$?
        fi
        [[ "$rc" -eq 0 ]] || die "could not download $url: $(curl_reason "$rc" "$code").
    Check the network, or set COCO_MIRROR to a reachable mirror. Re-run to resume."
    else
        local progress=(--quiet)
        [[ -t 2 ]] && progress=(--progress=bar)
        wget "${progress[@]}" --continue --tries="$((COCO_RETRIES + 1))" --waitretry=10 \
            --timeout=60 --output-document="$out" "$url" || rc=$?
        [[ "$rc" -eq 0 ]] || die "could not download $url: $(wget_reason "$rc").
    Check the network, or set COCO_MIRROR to a reachable mirror. Re-run to resume."
    fi
}

# Bytes already on disk in $DOWNLOAD_DIR (finished or partial archives).
downloaded_bytes() {
    local total=0 f
    for f in "$DOWNLOAD_DIR"/*.zip "$DOWNLOAD_DIR"/*.zip.part; do
        [[ -f "$f" ]] && total=$((total + $(stat -c %s "$f")))
    done
    printf '%s\n' "$total"
}

check_free_space() {
    local needed available
    [[ "$COCO_NEEDED_BYTES" =~ ^[0-9]+$ ]] || die "COCO_NEEDED_BYTES must be a number of bytes, not '$COCO_NEEDED_BYTES'"
    needed=$((COCO_NEEDED_BYTES - $(downloaded_bytes)))
    ((needed > 0)) || return 0
    available=$(($(df -Pk "$DATADIR" | awk 'NR == 2 { print $4 }') * 1024))
    if ((available < needed)); then
        die "not enough free disk space in $DATADIR: need $((needed / 1000000)) MB more, $((available / 1000000)) MB available.
    The COCO 2017 archives are 20.4 GB and unpack to about 21 GB. Free some space, pick
    another DATADIR, or set COCO_NEEDED_BYTES (now $COCO_NEEDED_BYTES) if you know better."
    fi
    log "free space in $DATADIR: $((available / 1000000)) MB (need $((needed / 1000000)) MB)"
}

# Step 1 for archive $1: $DOWNLOAD_DIR/$1, verified.
download_archive() {
    local name="$1" zip="$DOWNLOAD_DIR/$1" part="$DOWNLOAD_DIR/$1.part" expected
    if [[ -f "$STATE_DIR/downloaded.$name" && -f "$zip" ]]; then
        log "[done] download $name (verified earlier)"
        return 0
    fi
    WORK_DONE=1
    expected="$(expected_sum "$name")"
    if [[ -f "$zip" ]]; then
        # Put there by hand (or by an older run): use it if it is the right file.
        if ! verify "$zip" "$name"; then
            mv -f "$zip" "$zip.bad"
            die "checksum mismatch for $zip: expected $expected, got $GOT_SUM.
    Moved it to $zip.bad for inspection. If it is an interrupted download, rename it to
    $part and re-run to resume; otherwise delete it and re-run to download it again."
        fi
    else
        fetch "$COCO_MIRROR/${REMOTE_PATH[$name]}" "$part"
        if ! verify "$part" "$name"; then
            mv -f "$part" "$zip.bad"
            die "checksum mismatch for $name downloaded from $COCO_MIRROR/${REMOTE_PATH[$name]}:
    expected $expected, got $GOT_SUM (checksums from $COCO_CHECKSUMS).
    Moved the file to $zip.bad for inspection. Re-run to download it again; if that fails
    too, check COCO_MIRROR and COCO_CHECKSUMS."
        fi
        mv -f "$part" "$zip"
    fi
    printf '%s  %s\n' "$expected" "$name" >"$STATE_DIR/downloaded.$name"
    log "$name verified"
}

# Step 2 for archive $1: its contents under $COCO_DIR.
unpack_archive() {
    local name="$1" zip="$DOWNLOAD_DIR/$1" unpacker="${COCO_UNPACKER:-}" want
    if [[ -f "$STATE_DIR/unpacked.$name" ]]; then
        log "[done] unpack $name"
        return 0
    fi
    WORK_DONE=1
    if [[ -z "$unpacker" ]]; then
        if command -v unzip >/dev/null 2>&1; then unpacker=unzip; else unpacker=python; fi
    fi
    log "unpacking $name into $COCO_DIR with $unpacker"
    case "$unpacker" in
        unzip) unzip -q -o "$zip" -d "$COCO_DIR" || die "unzip failed on $zip (exit $?)" ;;
        python) "$PYTHON" -m zipfile -e "$zip" "$COCO_DIR" || die "'$PYTHON -m zipfile' failed on $zip" ;;
        *) die "COCO_UNPACKER must be unzip or python, not '$unpacker'" ;;
    esac
    for want in ${UNPACKED_CHECK[$name]}; do
        [[ -e "$COCO_DIR/$want" ]] || die "$zip did not contain $want: is it the COCO 2017 archive?"
    done
    if [[ "$name" == annotations_trainval2017.zip ]]; then
        rm -f "$STATE_DIR"/prepared.*  # new annotation files: redo the bbox-only copies
    fi
    date -u +%Y-%m-%dT%H:%M:%SZ >"$STATE_DIR/unpacked.$name"
}

# Step 3 for split $1 (train or val): the bbox-only annotation file.
prepare_split() {
    local split="$1" input output args=()
    input="$ANN_DIR/instances_${split}2017.json"
    output="$ANN_DIR/bbox_only_instances_${split}2017.json"
    if [[ -f "$STATE_DIR/prepared.$split" && -f "$output" ]]; then
        log "[done] prepare $(basename "$output")"
        return 0
    fi
    WORK_DONE=1
    [[ "$split" == val ]] && args=(--keep-keys)
    log "writing $output"
    "$PYTHON" "$REPO_DIR/scripts/prepare-json.py" "${args[@]}" "$input" "$output" ||
        die "scripts/prepare-json.py failed on $input"
    date -u +%Y-%m-%dT%H:%M:%SZ >"$STATE_DIR/prepared.$split"
}

main() {
    [[ -f "$COCO_CHECKSUMS" ]] || die "checksum file $COCO_CHECKSUMS not found (COCO_CHECKSUMS)"
    mkdir -p "$COCO_DIR" "$DOWNLOAD_DIR" "$STATE_DIR"
    if command -v flock >/dev/null 2>&1; then
        # Two runs on one DATADIR would write the same .part files.
        exec 9>>"$STATE_DIR/lock"
        flock -n 9 || die "another init_datasets.sh is already working in $DATADIR"
    fi

    local name pending=0
    for name in "${ARCHIVES[@]}"; do
        [[ -f "$STATE_DIR/unpacked.$name" ]] || pending=1
    done
    ((pending == 0)) || check_free_space

    for name in "${ARCHIVES[@]}"; do
        if [[ -f "$STATE_DIR/unpacked.$name" ]]; then
            log "[done] download and unpack $name"
            continue
        fi
        download_archive "$name"
        unpack_archive "$name"
    done
    prepare_split val
    prepare_split train

    if ((WORK_DONE == 0)); then
        log "nothing to do: all steps were already complete in $DATADIR"
    else
        log "COCO 2017 is ready in $COCO_DIR"
    fi
    log "check it with: $PYTHON $REPO_DIR/scripts/verify_dataset.py $COCO_DIR --expect coco2017"
}

main
