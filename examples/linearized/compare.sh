#!/usr/bin/env bash
# f against f_lin on the embedded data over several seeds: test accuracy and NTK-label alignment
# per epoch, mean ± std over the seeds, printed as a Markdown table. Runs that finished are kept,
# so re-running only prints. Needs `cargo build --release --workspace`.
#
#   examples/linearized/compare.sh [OUT_DIR] [SEED...]      (default: runs/linearized 42 43 44)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
trellis=$here/../../target/release/trellis
out=${1:-runs/linearized}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(42 43 44)

for seed in "${seeds[@]}"; do
  for net in f f_lin; do
    dir=$out/$net-seed$seed
    [ -f "$dir/model.safetensors" ] && continue
    rm -rf "$dir"
    echo "training $net, seed $seed -> $dir" >&2
    "$trellis" run "$here/synthetic_$net.toml" --out "$dir" --set "train.seed=$seed" --quiet >&2
  done
done

python3 - "$out" "${seeds[@]}" <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
def curve(net, key):
    runs = []
    for seed in seeds:
        with open(f"{out}/{net}-seed{seed}/metrics.jsonl") as f:
            runs.append([json.loads(line)["test"][key] for line in f])
    return [[r[e] for r in runs] for e in range(len(runs[0]))]
def cell(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"
acc = {net: curve(net, "top1") for net in ("f", "f_lin")}
align = {net: curve(net, "ntk_alignment") for net in ("f", "f_lin")}
print(f"n = {len(seeds)} seeds ({', '.join(seeds)}), mean ± std\n")
print("| epoch | f top-1 % | f_lin top-1 % | f alignment | f_lin alignment |")
print("| --- | --- | --- | --- | --- |")
for e in range(len(acc["f"])):
    print(f"| {e + 1} | {cell(acc['f'][e])} | {cell(acc['f_lin'][e])} | "
          f"{cell(align['f'][e])} | {cell(align['f_lin'][e])} |")
PY
