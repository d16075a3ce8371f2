#!/usr/bin/env bash
# kill -9 at random points of a run (any instant, and inside the checkpoint switch), resumed as
# its state.json says: every run must finish bit-identical to the uninterrupted one (weights byte
# for byte, metrics.jsonl lines equal as text less their timings).
#
#   scripts/kill_test.sh [N] [SEED]     # N trials (default 20); SEED repeats a sequence
#
# It runs the ignored test `kill_9_at_random_points` of tests/tests/run_dir.rs, which prints one
# line per trial and "kill -9: K of N resumed runs finished bit-identical ...".
set -euo pipefail
cd "$(dirname "$0")/.."
export TRELLIS_KILL_N="${1:-20}"
if [ -n "${2:-}" ]; then
    export TRELLIS_KILL_SEED="$2"
fi
exec cargo test -p trellis-tests --test run_dir -- --ignored --exact kill_9_at_random_points --nocapture
