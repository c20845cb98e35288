#!/usr/bin/env bash
# Prepare what travels to a lent GPU machine (at most 64 MiB in all; see the device tool's
# `carry`): a stripped, xz-compressed release ember, xz-compressed synthetic copies of the test
# models (`ember synth --like`), and bench/gpu-machine.sh, in OUT_DIR (default
# target/gpu-carry, ignored by git, so it can be carried).
#
#   bench/gpu-carry.sh [OUT_DIR] [MODEL.gguf...]
#
# MODEL: real GGUFs to imitate (default: the two test models in models/cache). FEATURES: cargo
# features for the binary (default none; `cuda` needs network access for cubecl-cuda's LLVM
# download at build time). On the machine:
#   xz -d OUT_DIR/ember.xz && chmod +x OUT_DIR/ember
#   bench/gpu-machine.sh OUT_DIR/ember "$OUT"/run OUT_DIR/*.gguf.xz
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${1:-$root/target/gpu-carry}"
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=("$root/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf" \
  "$root/models/cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
mkdir -p "$out"
feat=()
[ -n "${FEATURES:-}" ] && feat=(--features "$FEATURES")
(cd "$root" && cargo build --release --locked "${feat[@]}" >&2)
strip -o "$out/ember" "$root/target/release/ember"
xz -9 -T0 -f "$out/ember"
for m in "${models[@]}"; do
  s="$out/$(basename "${m%.gguf}").synth.gguf"
  "$root/target/release/ember" synth --like "$m" "$s" --force >&2
  xz -9 -T0 -f "$s"
done
cp "$here/gpu-machine.sh" "$out/"
du -b "$out"/* | awk '{printf "%10.2f MiB  %s\n", $1 / 1048576, $2}'
du -sb "$out" | awk '{printf "total %.2f MiB (the limit is 64 MiB)\n", $1 / 1048576}'
