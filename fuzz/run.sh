#!/usr/bin/env bash
# Bounded fuzzing of the GGUF parser (and the tokenizer builder on what parses).
#   fuzz/run.sh [SECONDS=60]
# Needs a nightly toolchain and cargo-fuzz (installed on first use).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# Seed corpus: the embedded model (a valid file, every block format) and a hand-made case.
# Without the valid seed the fuzzer would only explore the header: fail rather than run on less.
mkdir -p corpus/gguf_parse
seed_dir="$(mktemp -d)"
trap 'rm -rf "$seed_dir"' EXIT
if ! EMBER_CACHE_DIR="$seed_dir" cargo run --quiet --manifest-path ../Cargo.toml -- inspect >/dev/null; then
  echo "fuzz: 'ember inspect' failed, so there is no embedded model to seed the corpus with" >&2
  exit 1
fi
seeds=("$seed_dir"/ember-tiny-counter-v*.gguf)
if [ ! -f "${seeds[0]}" ]; then
  echo "fuzz: the embedded model was not written to $seed_dir; no valid seed for the corpus" >&2
  exit 1
fi
cp "${seeds[@]}" corpus/gguf_parse/
printf 'GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' > corpus/gguf_parse/empty-v3
cargo +nightly fuzz run gguf_parse corpus/gguf_parse -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096
