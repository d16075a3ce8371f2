#!/usr/bin/env bash
# The whole check: formatting, lints, and every test (unit, plugin, end to end). CI runs this
# through .ci/run; run scripts/setup.sh once before it on a new machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
