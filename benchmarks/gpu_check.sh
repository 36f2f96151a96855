#!/usr/bin/env bash
# Wrapper of benchmarks/gpu_check.py for the lent GPU machine (issue 18).
#
# Once, on the CPU machine, in the repository root (downloads three pure-Python wheels, ~1 MB, into
# the git-ignored .whl/; the GPU image has torch, onnx and onnxruntime but not brevitas):
#
#     bash benchmarks/gpu_check.sh --prepare
#
# Then, through the device tool (one call; the script keeps itself to ~450 s):
#
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# It uses $PYTHON or the machine's python3, installs .whl/*.whl with pip --no-index into
# /tmp/gpu_check_site only if brevitas is missing, puts the repository on PYTHONPATH (the project is
# not installed) and writes gpu_check.json, gpu_check.md and gpu_check.log to $OUT (or ./gpu_check_out).
# Extra arguments go to gpu_check.py, e.g. `bash benchmarks/gpu_check.sh --budget 300 --skip compile`.
#
# `bash benchmarks/gpu_check.sh --grid [ARGS]` runs benchmarks/gpu_grid.py instead (the scratch
# evidence grid of issue 13 on the GPU; carry=[".whl", ".fmnist"], timeout_s=590), writing gpu_grid.*.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.fmnist/' .git/info/exclude 2>/dev/null || echo '/.fmnist/' >> .git/info/exclude
    mkdir -p .whl .fmnist
    # Fashion-MNIST for the --grid mode (Debian's dataset-fashion-mnist; ~31 MB of .gz)
    cp -n /usr/share/datasets/fashion-mnist/*.gz .fmnist/ 2>/dev/null ||
        echo "[gpu_check.sh] no /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist for --grid"
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3
fi
# --grid: the scratch evidence grid (benchmarks/gpu_grid.py, issue 13) instead of gpu_check.py; carry .fmnist too
SCRIPT=benchmarks/gpu_check.py
NAME=gpu_check
if [ "${1:-}" = "--grid" ]; then
    shift
    SCRIPT=benchmarks/gpu_grid.py
    NAME=gpu_grid
fi

OUTDIR="${OUT:-gpu_check_out}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/$NAME.log"
{
    echo "[gpu_check.sh] $(date -u '+%F %T UTC') python: $(command -v "$PY") ($("$PY" --version 2>&1))"
    if ! "$PY" -c 'import brevitas' 2>/dev/null; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "[gpu_check.sh] brevitas missing: installing $(ls .whl | tr '\n' ' ')into /tmp/gpu_check_site"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/gpu_check_site .whl/*.whl
            export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
        else
            echo "[gpu_check.sh] brevitas is missing and there is no .whl/: run 'bash benchmarks/gpu_check.sh --prepare' here and carry .whl"
        fi
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    "$PY" "$SCRIPT" --out "$OUTDIR" "$@"
    echo "[gpu_check.sh] exit $?"
} 2>&1 | tee "$LOG"
