#!/usr/bin/env bash
# Two builds of the library on a GPU, the checks a kernel change needs before it is kept:
#  1. outputs bit for bit: the last call of benchmarks/gpu_one_call.py under each build, byte
#     for byte (a change meant to keep the arithmetic must keep every bit);
#  2. Nsight Compute at locked clocks: duration, DRAM bytes read and L2 hit rate of the wgmma
#     kernels of one call, side by side (benchmarks/ncu_kernels.py);
#  3. benchmarks/gpu_moe.py with NEW as the default and BASE beside it (--paths lib=BASE).
#
#   benchmarks/gpu_compare_builds.sh BASE.so NEW.so OUTDIR [POINTS]
#
# POINTS: "shape:T:dtype ..." (default: the prefill points Qwen:4096, GPT:4096, Qwen:512 in
# bfloat16, and Qwen:4096:float16, GPT:512:float16 for the bit-for-bit check). Needs what
# gpu_moe.py needs (onnxruntime-gpu, torch with CUDA) and ncu on PATH for step 2 (skipped
# without); PYTHON picks the interpreter (python3). Run by hand on an H100 with these points,
# steps like these took 98 s (the script itself has not yet run on a GPU).
set -u
if [ $# -lt 3 ]; then
  sed -n 2,15p "$0"
  exit 2
fi
base=$(realpath "$1") new=$(realpath "$2") out=$3
points=${4:-"Qwen:4096:bfloat16 GPT:4096:bfloat16 Qwen:512:bfloat16 Qwen:4096:float16 GPT:512:float16"}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}  # the interpreter with onnxruntime-gpu and torch
for lib in "$base" "$new"; do
  [ -f "$lib" ] || { echo "no such library: $lib" >&2; exit 2; }
done
mkdir -p "$out"
status=0
metrics=gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct

echo "== outputs, bit for bit"
for p in $points; do
  IFS=: read -r shape tokens dtype <<< "$p"
  for side in base new; do
    lib=$base; [ $side = new ] && lib=$new
    MOEFUSE_LIBRARY=$lib "$py" "$here/gpu_one_call.py" "$shape" "$tokens" "$dtype" 1 \
      --save "$out/y_${side}_${shape}_${tokens}_${dtype}.npy" > "$out/call_${side}_${shape}_${tokens}_${dtype}.log" 2>&1 \
      || { echo "FAILED: $side $p (see $out/call_${side}_${shape}_${tokens}_${dtype}.log)"; status=1; }
  done
  if cmp -s "$out/y_base_${shape}_${tokens}_${dtype}.npy" "$out/y_new_${shape}_${tokens}_${dtype}.npy"; then
    echo "identical   $p"
  else
    echo "DIFFERENT   $p"
    status=1
  fi
done

if command -v ncu > /dev/null; then
  echo "== Nsight Compute (bfloat16 points)"
  for p in $points; do
    IFS=: read -r shape tokens dtype <<< "$p"
    [ "$dtype" = bfloat16 ] || continue
    for side in base new; do
      lib=$base; [ $side = new ] && lib=$new
      MOEFUSE_LIBRARY=$lib ncu --nvtx --nvtx-include "last/" --kernel-name regex:Wg --metrics $metrics \
        "$py" "$here/gpu_one_call.py" "$shape" "$tokens" "$dtype" 2 > "$out/ncu_${side}_${shape}_${tokens}.txt" 2>&1 \
        || { echo "ncu FAILED: $side $p"; status=1; }
    done
    echo "-- $p"
    "$py" "$here/ncu_kernels.py" base="$out/ncu_base_${shape}_${tokens}.txt" new="$out/ncu_new_${shape}_${tokens}.txt" \
      --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct
  done
else
  echo "== Nsight Compute: ncu not on PATH, skipped"
fi

echo "== gpu_moe.py: NEW as the default, BASE beside it"
tokens=$(for p in $points; do IFS=: read -r _ t _ <<< "$p"; echo "$t"; done | sort -un | paste -sd,)
MOEFUSE_LIBRARY=$new "$py" "$here/gpu_moe.py" --tokens "$tokens" --dtypes bfloat16 --paths "lib=$base" \
  --out "$out/ab" > "$out/ab.log" 2>&1 || { echo "gpu_moe.py FAILED (see $out/ab.log)"; status=1; }
sed -n '/^MoEFFN variants/,/^Against/p' "$out/ab/gpu_moe.md" 2>/dev/null
exit $status
