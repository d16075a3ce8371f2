#!/usr/bin/env bash
# Wall time of one 12-run sweep at --jobs 1 and at --jobs 2 on this machine, and the CPU threads
# each run was given (runs.tsv's `threads` column).
#
#   scripts/bench_sweep.sh [PATH/TO/trellis]      # default: target/release/trellis
#
# The grid is three pruners x two sparsities x two seeds of a ResNet18 at eighth width on 1,000
# synthetic images for 2 epochs: short runs, where the start of each process (libtorch, plugins,
# data) weighs most. Both sweeps run the same 12 runs from scratch, one after the other; take the
# figures only while nothing else runs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:-$repo/target/release/trellis}")
[ -x "$bin" ] || { echo "no trellis binary at $bin: cargo build --release --workspace" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The example manifest, pointing at the plugins built beside this binary.
sed "s#\.\./target/release/#$(dirname "$bin")/#" "$repo/examples/plugins.toml" > "$work/plugins.toml"
cat > "$work/run.toml" <<'EOF'
plugins = "plugins.toml"

[model]
arch = "resnet18"
width = 0.125

[data]
source = "synthetic"
train_size = 1000
test_size = 500

[train]
epochs = 2
batch_size = 100
device = "cpu"

[optimizer]
use = "sgd"
lr = 0.1
momentum = 0.9

[pruner]
use = "snip"
sparsity = 0.5

[[metrics]]
use = "accuracy"
EOF
cat > "$work/sweep.toml" <<'EOF'
config = "run.toml"

[grid]
"pruner.use" = ["snip", "magnitude", "random"]
"pruner.sparsity" = [0.5, 0.9]
"train.seed" = [0, 1]
EOF

declare -A seconds
for jobs in 1 2; do
    start=$(date +%s.%N)
    "$bin" sweep "$work/sweep.toml" --out "$work/jobs$jobs" --jobs "$jobs" --quiet > "$work/jobs$jobs.log" 2>&1 ||
        { cat "$work/jobs$jobs.log" >&2; exit 1; }
    seconds[$jobs]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    finished=$(grep -c $'\tfinished$' "$work/jobs$jobs/runs.tsv" || true)
    threads=$(awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "threads") c = i } NR > 1 { print $c }' \
        "$work/jobs$jobs/runs.tsv" | sort -u | paste -sd, -)
    printf -- '--jobs %s: %6.1f s for %s finished runs, threads per run: %s\n' \
        "$jobs" "${seconds[$jobs]}" "$finished" "$threads"
done
printf 'jobs 2 / jobs 1 wall time: %.2f (%d cores)\n' \
    "$(awk -v a="${seconds[1]}" -v b="${seconds[2]}" 'BEGIN { print b / a }')" "$(nproc)"
