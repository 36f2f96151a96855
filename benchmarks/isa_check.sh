#!/usr/bin/env bash
# Every latency measurement of the native kernels (issue 14), in one prepared run on whatever x86 CPU
# this session has: the CIFAR ResNet-18 export, the kernels' floor and per-layer fractions of it, the
# per-node profile in the network, and the teacher / standard / native students interleaved at 1 and
# 2 threads with both thread pools. On an AVX-512 CPU it adds the AVX2 kernel forced on the same
# machine (BNN_DISTILL_NATIVE_ISA=avx2: an approximation of an AVX2 machine, not one) and the native
# library's ISA in every file name, so results of Zen 3 and Zen 4 sessions sit side by side.
#
#   bash benchmarks/isa_check.sh [--quick] [--peers] [--out DIR]
#
#   --quick   a few rounds of everything (checks the script; its numbers mean nothing)
#   --peers   then run ../shared/peers/run.sh on the export (OpenVINO and Larq Compute Engine)
#   --out     results folder (default benchmarks/results; --quick defaults to a temporary one)
#
# Timing on a shared machine is worthless: pause training first (kill -STOP the grid's process
# group). The script refuses to start while another process is using a core, unless
# BNN_DISTILL_ISA_CHECK_BUSY_OK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

QUICK=0 PEERS=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --peers) PEERS=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    *) echo "isa_check.sh: unknown argument '$1' (valid: --quick, --peers, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if grep -qw avx512_vpopcntdq /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo; then
  ISA=avx512
elif grep -qw avx2 /proc/cpuinfo; then
  ISA=avx2
else
  echo "isa_check.sh: this CPU has neither AVX-512 VPOPCNTDQ nor AVX2; the portable kernel is not benchmarked" >&2
  exit 2
fi
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')

if [ "$QUICK" = 1 ]; then
  OUT=${OUT:-$(mktemp -d /tmp/isa_check.XXXXXX)}
  BUDGET=0.3 ROUNDS=6 REPS=3 REPEATS=1 RUNS=3
else
  OUT=${OUT:-benchmarks/results}
  BUDGET=3 ROUNDS=250 REPS=300 REPEATS=3 RUNS=100
  # a core busy with something else (>= 50% of a core over 3 s) makes every ratio below meaningless
  busy=""
  if command -v top > /dev/null; then
    busy=$(top -b -n 2 -d 3 | awk '/^top -/{n++} n==2 && $1 ~ /^[0-9]+$/ && $9+0 >= 50 {print $1 " " $12}' | head -3)
  else
    echo "isa_check: no 'top' here (procps), so other processes' load is not checked; make sure the machine is idle" >&2
  fi
  if [ -n "$busy" ] && [ "${BNN_DISTILL_ISA_CHECK_BUSY_OK:-0}" != 1 ]; then
    echo "isa_check.sh: other processes are using the CPU ($(echo "$busy" | tr '\n' ' ')); pause them first, or set BNN_DISTILL_ISA_CHECK_BUSY_OK=1" >&2
    exit 2
  fi
fi
mkdir -p "$OUT"
EXP=$(mktemp -d /tmp/isa_check_r18.XXXXXX)
LIB=$("$PY" -c 'from bnn_distill import native; print(native.library_path())')
echo "isa_check: $CPU, kernels $ISA, results in $OUT, export in $EXP" >&2
SUF=${ISA}
[ "$QUICK" = 1 ] && SUF=${ISA}_quick

# 1. the export (random weights: latency does not depend on them) and bnn-distill bench's own table
"$PY" benchmarks/onnx_resnet18.py --out "$EXP" --batch 1 --threads 1 2 --budget "$BUDGET" --force --runtime native
cp "$EXP/bench.md" "$OUT/isa_check_bench_$SUF.md"
cp "$EXP/bench.json" "$OUT/isa_check_bench_$SUF.json"

# 2. the floor and each layer shape alone, float input and packed-sign input alternated
"$PY" benchmarks/native_layers.py --reps "$REPS" --forms float signs --repeats "$REPEATS" \
  --out "$OUT/native_layers_signs_$SUF"

# 3. where the time goes in the network
"$PY" benchmarks/native_profile.py "$EXP" --batch 1 --threads 1 2 --runs "$RUNS" --out "$OUT/native_profile_$SUF"

# 4. end to end, interleaved: teacher, standard, native with onnxruntime's pool and with the own pool
VARIANTS=(--variant "teacher=$EXP/teacher_fp32.onnx" --variant "standard=$EXP/student_binary.onnx"
  --variant "native=$EXP/student_binary_native.onnx,lib=$LIB"
  --variant "native_own_pool=$EXP/student_binary_native.onnx,lib=$LIB,env:BNN_DISTILL_NATIVE_POOL=own")
if [ "$ISA" = avx512 ]; then
  VARIANTS+=(--variant "native_forced_avx2=$EXP/student_binary_native.onnx,lib=$LIB,env:BNN_DISTILL_NATIVE_ISA=avx2")
fi
"$PY" benchmarks/native_ab.py --threads 1 2 --rounds "$ROUNDS" "${VARIANTS[@]}" --json "$OUT/native_ab_check_$SUF.json" \
  | tee "$OUT/native_ab_check_$SUF.txt"

# 5. the peers kit, when asked and present
if [ "$PEERS" = 1 ]; then
  if [ -x ../shared/peers/run.sh ] || [ -f ../shared/peers/run.sh ]; then
    (cd ../shared/peers && bash run.sh "$EXP" "$LIB") | tee "$OUT/peers_$SUF.md"
  else
    echo "isa_check: ../shared/peers/run.sh not found; peers skipped" >&2
  fi
fi
echo "isa_check: done ($CPU, $ISA); files in $OUT" >&2
