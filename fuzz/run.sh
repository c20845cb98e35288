#!/usr/bin/env bash
# Bounded fuzzing of the GGUF parser (and the tokenizer builder on what parses).
#   fuzz/run.sh [SECONDS=60]
# Needs a nightly toolchain and cargo-fuzz (installed on first use).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# Seed corpus: the embedded model (a valid file) and a few hand-made cases.
mkdir -p corpus/gguf_parse
cargo run --quiet --manifest-path ../Cargo.toml -- inspect >/dev/null 2>&1 || true
cp "${EMBER_CACHE_DIR:-$HOME/.cache/ember}"/ember-tiny-counter-v*.gguf corpus/gguf_parse/ 2>/dev/null || true
printf 'GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > corpus/gguf_parse/empty-v3
cargo +nightly fuzz run gguf_parse corpus/gguf_parse -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096
