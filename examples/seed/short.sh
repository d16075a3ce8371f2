#!/usr/bin/env bash
# The seed's experiments at the short scale (examples/seed/short/), one after another, and the
# report of each: Markdown with the command above each table, for docs/RESULTS.md.
#
#   examples/seed/short.sh [EXPERIMENT...]     # pruning tempbalance fc_augment kd linearized
#
# Run from the repository root after `cargo build --release --workspace`, with Fashion-MNIST
# installed (apt-get install dataset-fashion-mnist). Runs go to runs/seed-short/<experiment>; a
# second call skips finished runs, so an interrupted call resumes. The Markdown is written to
# runs/seed-short/RESULTS.md (each experiment's part to runs/seed-short/<experiment>.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
trellis=./target/release/trellis
out=runs/seed-short
jobs=${JOBS:-2}
[ -x "$trellis" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ||
    { echo "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist" >&2; exit 1; }
mkdir -p "$out"

# The command as one would type it: arguments with characters the shell reads, in quotes.
shown() {
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./=,:-]+$ ]]; then words+=("$arg"); else words+=("\"$arg\""); fi
    done
    echo "${words[*]}"
}

# Runs one command, printing it, and appends it and its output (a report table) to $part.
report() {
    echo "+ $(shown "$@")" >&2
    { printf '```sh\n%s\n```\n\n' "$(shown "$@")"; "$@"; echo; } >> "$part"
}

sweep() {
    echo "+ $trellis sweep $*" >&2
    "$trellis" sweep "$@"
}

experiment() {
    local name=$1
    part=$out/$name.md
    : > "$part"
    case $name in
    pruning)
        sweep examples/seed/short/pruning_after_100_sweep.toml --out "$out/pruning" --jobs "$jobs"
        report "$trellis" report "$out/pruning" --group-by pruner.sparsity,pruner.use \
            --metric top1 --out "$out/pruning/report"
        ;;
    tempbalance)
        sweep examples/seed/short/tempbalance_sweep.toml --out "$out/tempbalance" --jobs "$jobs"
        report "$trellis" report "$out/tempbalance" --group-by scheduler.use \
            --baseline "scheduler.use=(none)" --metric top1 --metric loss --out "$out/tempbalance/report"
        ;;
    fc_augment)
        sweep examples/seed/short/fc_augment_sweep.toml --out "$out/fc_augment" --jobs "$jobs"
        report "$trellis" report "$out/fc_augment" --group-by distillers.0.use \
            --baseline "distillers.0.use=(none)" --metric top1 --metric refiner_top1 \
            --out "$out/fc_augment/report"
        ;;
    kd)
        if [ ! -e "$out/kd_teacher/model.safetensors" ]; then
            resume=$([ -e "$out/kd_teacher/state.json" ] && echo --resume || true)
            "$trellis" run examples/seed/short/kd_teacher.toml --out "$out/kd_teacher" --quiet $resume
        fi
        # One at a time: the distilled runs compare with the independent student of seed 0.
        sweep examples/seed/short/kd_sweep.toml --out "$out/kd" --jobs 1
        report "$trellis" report "$out/kd" --group-by distillers.0.use \
            --baseline "distillers.0.use=(none)" --metric top1 --metric teacher_agreement \
            --metric adversarial_transfer --metric jitter_invariance --metric localization \
            --out "$out/kd/report"
        ;;
    linearized)
        sweep examples/seed/short/linearized_sweep.toml --out "$out/linearized" --jobs "$jobs"
        report "$trellis" report "$out/linearized" --group-by model.use \
            --baseline "model.use=(none)" --metric top1 --metric ntk_alignment \
            --out "$out/linearized/report"
        ;;
    *)
        echo "unknown experiment $name: pruning, tempbalance, fc_augment, kd or linearized" >&2
        exit 2
        ;;
    esac
}

if [ $# -eq 0 ]; then
    set -- pruning tempbalance fc_augment kd linearized
fi
for name in "$@"; do
    experiment "$name"
done
cat "$out"/{pruning,tempbalance,fc_augment,kd,linearized}.md 2>/dev/null > "$out/RESULTS.md" || true
echo "reports: $out/RESULTS.md" >&2
