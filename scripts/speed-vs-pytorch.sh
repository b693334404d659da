#!/usr/bin/env bash
# The README's speed table: splitaux's training step against the PyTorch yardstick
# (../shared/bench/torch_step.py), ResNet-20, batch 128, 2 threads, shallow and middle cuts, both
# modes. Each repetition runs PyTorch and then splitaux back to back, so both see the same machine
# state; the table reports the median images/s over the repetitions and the ratio of the medians.
#
# Above the table it prints the machine as splitaux's kernels see it (`splitaux bench --cpu`):
# CPU model, family/model, L1d and L2 per core, the SIMD/AMX features, and the kernel path taken.
#
# usage: scripts/speed-vs-pytorch.sh [repetitions] [extra splitaux bench flags…]
# env:   PYTHON (default /tmp/torchpeer/bin/python, see torch_step.py's header for the set-up),
#        SPLITAUX (default target/release/splitaux), STEPS (timed steps per run, default 20),
#        SPLITAUX_KERNEL_PATH (avx512|avx2|portable|auto: forces the kernel path, see
#        src/kernels/cpu.rs; passed on to splitaux)
set -euo pipefail

reps=${1:-3}
shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-/tmp/torchpeer/bin/python}
splitaux=${SPLITAUX:-$here/target/release/splitaux}
peer=${PEER:-$here/../shared/bench/torch_step.py}
steps=${STEPS:-20}
common=(--depth 20 --batch 128 --threads 2 --steps "$steps")

field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
median() { tr ' ' '\n' | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

"$splitaux" bench --cpu
echo
echo "| ResNet-20, batch 128, 2 threads | PyTorch images/s | splitaux images/s | ratio | splitaux peak step memory |"
echo "| --- | --- | --- | --- | --- |"
for cut in 3 6; do
  for mode in coupled decoupled; do
    torch=() ours=() peak=""
    for _ in $(seq "$reps"); do
      torch+=("$("$python" "$peer" --mode "$mode" --cut "$cut" "${common[@]}" | field images_per_s)")
      json=$("$splitaux" bench --mode "$mode" --cut "$cut" "${common[@]}" --json "$@")
      ours+=("$(echo "$json" | field images_per_s)")
      peak=$(echo "$json" | field peak_memory_bytes)
    done
    t=$(echo "${torch[*]}" | median)
    s=$(echo "${ours[*]}" | median)
    name=$([ "$cut" = 3 ] && echo shallow || echo middle)
    printf "| %s, %s (%s blocks) | %.1f | %.1f | %.2f | %.1f MiB |\n" \
      "$mode" "$name" "$cut" "$t" "$s" "$(echo "$s / $t" | bc -l)" "$(echo "$peak / 1048576" | bc -l)"
    echo "  runs: pytorch ${torch[*]}; splitaux ${ours[*]}" >&2
  done
done
