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
# Stages: env, tests, matmul_4096, matmul_8192, w4a16 (W4A16 only, every M, both
# sizes; not run by default), w8 (the 8-bit kernels fed a transposed weight; not
# run by default), w4_tune (W4A16 tile sweep at decode sizes), llm (decode tokens/s of a Llama-3.2-1B-shaped model,
# benchmarks/llm_gpu.py), and mx (only the MX check, not run by default: tests
# includes it). The benchmarks write their JSON after every row, so a stage that
# hits its limit keeps what it measured; it can be rerun alone in a second call.
#
# It uses the machine's own python3 and packages (jax with CUDA, pytest,
# hypothesis); it installs nothing.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
py=${PYTHON:-python3}

want=" ${*:-env tests matmul_4096 matmul_8192 w4_tune llm} "

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

stage env 20 bash -c "nvidia-smi; $py -c 'import jax; print(jax.__version__, jax.devices())'"
# The kernels' native twins, and the MX route (docs/guide/mx.md): jax.nn.scaled_matmul
# forced on this GPU runs and equals the exact emulation (below compute capability 10.0
# XLA expands the block-scaled dot itself).
stage tests 80 "$py" -m pytest -q -p no:cacheprovider --tb=short -m gpu \
  tests/test_pallas_w4a16.py tests/test_pallas_int8.py tests/test_pallas_fp8.py tests/test_mx.py
stage mx 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_mx.py
stage matmul_4096 170 "$py" benchmarks/matmul.py --kn 4096 --json "$out/matmul_4096.json" \
  --emit-dispatch
stage matmul_8192 170 "$py" benchmarks/matmul.py --kn 8192 --json "$out/matmul_8192.json" \
  --emit-dispatch
# W4A16 alone at every M for both K = N (its dispatch row), then its tiles at decode
# sizes: the default beside wider N tiles, deeper K tiles and split-K (each
# 'block_m,block_n,block_k,split_k,num_warps,num_stages').
stage w4a16 70 "$py" benchmarks/matmul.py --kn 4096 8192 --only xla_w4a16 pallas_w4a16 \
  --json "$out/w4a16.json" --emit-dispatch
stage w4_tune 100 "$py" benchmarks/matmul.py --m 1 16 64 --kn 4096 8192 \
  --only xla_w4a16 pallas_w4a16 --json "$out/w4_tune.json" --w4-blocks \
  16,64,128,1,4,3 16,64,128,2,4,3 16,128,128,1,4,3 16,128,128,2,4,3 16,128,256,1,4,3 \
  16,64,256,2,4,4 16,32,128,2,4,3 16,256,128,1,8,3 16,128,128,4,4,3
# The 8-bit kernels with the (K, N) weight transposed in the call for the (N, K) kernel,
# beside XLA's paths and the (K, N) kernels (the adapters' candidates).
stage w8 80 "$py" benchmarks/matmul.py --kn 4096 8192 --only xla_w8a8_dyn pallas_w8a8_dyn \
  pallas_w8a8_dyn_t xla_fp8 pallas_fp8 pallas_fp8_t
stage llm 140 "$py" benchmarks/llm_gpu.py --config llama-1b --json "$out/llm_gpu.json"
