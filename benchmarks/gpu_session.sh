#!/usr/bin/env bash
# One call on a lent GPU (issue "Pallas kernels"): what the GPU is, the
# kernels' native test twins, then the matmul benchmark at K = N = 4096 and
# 8192 (one JSON file each, so a stage that runs out of time loses only
# itself), each with the entries to paste into MEASURED in
# jqx/ops/dispatch.py (docs/internals/dispatch.md). The tests stage also runs
# the MX route's GPU check (jax.nn.scaled_matmul against the exact emulation,
# docs/guide/mx.md). Every stage has its own time limit; the whole script fits
# one 10-minute device call. Logs and JSON go to $OUT (default gpu_out/). Run
# from the repository root:
#
#     bash benchmarks/gpu_session.sh                  # every stage
#     bash benchmarks/gpu_session.sh matmul_8192      # only the named stages
#
# Stages: env, tests, matmul_4096, matmul_8192, and mx (only the MX check, not
# run by default: tests includes it). A stage that hits its limit (kernel
# compilation dominates the first run) can be rerun alone in a second call.
#
# It uses the machine's own python3 and packages (jax with CUDA, pytest,
# hypothesis); it installs nothing.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
py=${PYTHON:-python3}

want=" ${*:-env tests matmul_4096 matmul_8192} "

stage() {  # stage NAME SECONDS CMD...: runs CMD with a limit, logs to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ $want == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  tail -n 25 "$out/$name.log"
  return 0
}

stage env 30 bash -c "nvidia-smi; $py -c 'import jax; print(jax.__version__, jax.devices())'"
# The kernels' native twins, and the MX route (docs/guide/mx.md): jax.nn.scaled_matmul
# forced on this GPU runs and equals the exact emulation (below compute capability 10.0
# XLA expands the block-scaled dot itself).
stage tests 150 "$py" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_pallas_w4a16.py tests/test_pallas_int8.py tests/test_pallas_fp8.py tests/test_mx.py
stage mx 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_mx.py
stage matmul_4096 200 "$py" benchmarks/matmul.py --kn 4096 --json "$out/matmul_4096.json" \
  --emit-dispatch
stage matmul_8192 200 "$py" benchmarks/matmul.py --kn 8192 --json "$out/matmul_8192.json" \
  --emit-dispatch
