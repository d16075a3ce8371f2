#!/usr/bin/env bash
# Training step time of a ResNet18 at width 16 (width = 0.25) and at full width on this
# machine's CPU: one process with 2 threads, one process with 1 thread (a single rank), and two
# Gloo ranks of 1 thread each (`trellis run --nproc 2`), with the global batch of 128 each time.
#
#   scripts/bench_ddp.sh [PATH/TO/trellis]      # default: target/release/trellis
#
# Each case trains 2 epochs on synthetic CIFAR-size images; the step time is the second epoch's
# training time (metrics.jsonl's train_seconds) over its steps, so start-up and the first
# epoch's warm-up do not count. Ratios are against one process with 2 threads, in the same run.
# Take the figures only while nothing else runs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:-$repo/target/release/trellis}")
[ -x "$bin" ] || { echo "no trellis binary at $bin: cargo build --release --workspace" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s#\.\./target/release/#$(dirname "$bin")/#" "$repo/examples/plugins.toml" > "$work/plugins.toml"

config() { # width, steps per epoch
    cat <<EOF
plugins = "plugins.toml"

[model]
arch = "resnet18"
width = $1

[data]
source = "synthetic"
train_size = $((128 * $2))
test_size = 128

[train]
epochs = 2
batch_size = 128
device = "cpu"

[optimizer]
use = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
EOF
}

step_seconds() { # run directory, steps per epoch
    tail -n 1 "$1/metrics.jsonl" | sed 's/.*"train_seconds":\([0-9.e-]*\).*/\1/' |
        awk -v steps="$2" '{ printf "%.4f", $1 / steps }'
}

printf '%-12s %-28s %10s %8s\n' model case "s/step" ratio
for spec in "0.25 24 width-16" "1.0 6 full-width"; do
    read -r width steps name <<<"$spec"
    config "$width" "$steps" > "$work/$name.toml"
    base=""
    for case in "2-threads" "1-rank-1-thread" "2-ranks-1-thread"; do
        out="$work/$name-$case"
        case $case in
            2-threads) args=(--set train.threads=2) ;;
            1-rank-1-thread) args=(--set train.threads=1) ;;
            2-ranks-1-thread) args=(--nproc 2 --set train.threads=1) ;;
        esac
        (cd "$work" && "$bin" run "$name.toml" --out "$out" --quiet "${args[@]}" > "$out.log" 2>&1) ||
            { cat "$out.log" >&2; exit 1; }
        seconds=$(step_seconds "$out" "$steps")
        [ -n "$base" ] || base=$seconds
        printf '%-12s %-28s %10s %8s\n' "$name" "$case" "$seconds" \
            "$(awk -v s="$seconds" -v b="$base" 'BEGIN { printf "%.2f", s / b }')"
    done
done
