#!/usr/bin/env bash
# One lent-GPU command: install the checkout, then run the named steps, logging
# each under $OUT. Usage (on the device machine, from the repository root):
#   WSBCN_COMMIT=<sha> perf/gpu_session.sh test bench autotune e2e
# Steps:
#   test       the whole suite natively (gpu- and slow-marked tests included), with
#              pytest-xdist and pytest-timeout, which the lent machines' image has
#   host       `wsbcn bench --host` with the real driver (host time of eager calls)
#   autotune   `wsbcn autotune` on $BATCHES / $DTYPES (cache: $OUT/cache/<device>.json,
#              which later steps of the same command then use)
#   bench      `wsbcn bench` on $BATCHES / $DTYPES
#   e2e        `wsbcn bench --e2e-only`
#   compile    torch.compile on the Triton path: inductor's generated launches of the
#              wsbcn kernels (TORCH_LOGS=output_code), AOTInductor packages of a
#              WS+BCN ResNet-50 (fp32, bf16) checked against eager, then the compiled
#              e2e steps (`wsbcn bench --e2e-only --e2e-compile`)
#   pack       tar perf/results (bench.csv, autotune.csv) into $OUT
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:=/tmp/out}" "${BATCHES:=2 32}" "${DTYPES:=bfloat16}" "${MINUTES:=4}"
mkdir -p "$OUT"
export WSBCN_CACHE_DIR="$OUT/cache"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; wsbcn info; } >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
for step in "$@"; do
  start=$SECONDS
  case $step in
    test) python3 -m pytest -q -p no:cacheprovider -m "" -n 8 --timeout 240 -rfEs 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
    autotune) wsbcn autotune --batch-sizes $BATCHES --dtypes $DTYPES --max-minutes "$MINUTES" 2>&1 | tee "$OUT/autotune.log" | tail -15 ;;
    bench) wsbcn bench --batch-sizes $BATCHES --dtypes $DTYPES --max-minutes "$MINUTES" 2>&1 | tee "$OUT/bench.log" | tail -15 ;;
    e2e) wsbcn bench --e2e-only 2>&1 | tee "$OUT/e2e.log" | tail -15 ;;
    host) wsbcn bench --host --batch-sizes $BATCHES --dtypes $DTYPES 2>&1 | tee "$OUT/host.log" | tail -15 ;;
    compile) { TORCH_LOGS=output_code python3 -m pytest -q -s -p no:cacheprovider tests/test_compile.py -k "triton and inductor" 2>&1 | grep -E "kernel_[0-9]+\.run\(|passed|failed|Error" | sort | uniq -c | sort -rn | head -30
               python3 perf/tools/aoti_package.py; python3 perf/tools/aoti_package.py --dtype bfloat16
               wsbcn bench --e2e-only --e2e-compile; } 2>&1 | tee "$OUT/compile.log" | tail -40 ;;
    pack) tar czf "$OUT/results.tgz" perf/results ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step: $((SECONDS - start)) s"
done
