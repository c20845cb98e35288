#!/usr/bin/env bash
# CI: prove the ARM path for real. Cross-builds ember for aarch64-unknown-linux-gnu
# with plain cargo and Debian's cross gcc, then under qemu-aarch64-static runs
# `ember selftest` (NEON kernel parity against the portable kernel and an f64
# reference, golden decode, ...) and a short greedy generation, and fails unless
# the aarch64 tokens equal the x86 ones.
#
#   targets/ci-aarch64.sh            # dev profile (what CI uses)
#   EMBER_CI_RELEASE=1 targets/ci-aarch64.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TRIPLE=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
fail() { echo "ci-aarch64: FAIL: $*" >&2; exit 1; }
say() { echo "ci-aarch64: $*" >&2; }

# ---- tools: Debian's cross gcc + libc, qemu user-mode, the Rust target
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null || [ ! -d "$SYSROOT/lib" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    say "installing gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static
fi
rustup target add "$TRIPLE" >/dev/null 2>&1 || rustup target add "$TRIPLE"

# ---- build (the linker and CC come from .cargo/config.toml)
if [ -n "${EMBER_CI_RELEASE:-}" ]; then PROF=(--release); DIR=release; else PROF=(); DIR=debug; fi
t0=$(date +%s)
# CPU-only for the ARM check (--no-default-features drops wgpu): the NEON kernels are what
# qemu can exercise, and a second wgpu stack for aarch64 would cost CI ~20 more minutes.
nice cargo build --locked "${PROF[@]}" --target "$TRIPLE" --no-default-features --bin ember
t1=$(date +%s)
nice cargo build --locked "${PROF[@]}" --bin ember
say "cross-build $TRIPLE ($DIR): $((t1 - t0)) s"
ARM="target/$TRIPLE/$DIR/ember"
X86="target/$DIR/ember"
file "$ARM" 2>/dev/null | grep -q "ARM aarch64" || [ ! -x "$(command -v file)" ] || fail "$ARM is not an aarch64 binary"
QEMU=(qemu-aarch64-static -L "$SYSROOT")

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export EMBER_CACHE_DIR="$WORK/cache"
unset EMBER_SELFTEST_FAULT

# ---- 1. the self-test under qemu: every check must pass, on the NEON kernels
say "ember selftest under qemu"
"${QEMU[@]}" "$ARM" selftest --target raspberry-pi-5 --db "$WORK/selftest.db" > "$WORK/selftest.txt" \
    || { cat "$WORK/selftest.txt"; fail "ember selftest failed under qemu-aarch64"; }
cat "$WORK/selftest.txt"
grep -q "kernels use neon" "$WORK/selftest.txt" || fail "the NEON kernels were not selected"
n_neon=$(grep -c '^parity\.[A-Z0-9_]*\.neon  *ok ' "$WORK/selftest.txt" || true)
[ "$n_neon" -eq 11 ] || fail "expected 11 passing parity.*.neon rows, got $n_neon"
grep -q '^golden.hello  *ok ' "$WORK/selftest.txt" || fail "golden decode failed under qemu"

# ---- 2. a broken NEON kernel must be caught (the self-test is not a rubber stamp)
set +e
EMBER_SELFTEST_FAULT=q4_k:neon "${QEMU[@]}" "$ARM" selftest --no-db > /dev/null 2> "$WORK/fault.err"
rc=$?
set -e
[ "$rc" -ne 0 ] || fail "selftest passed with a corrupted Q4_K NEON kernel"
grep -q "FAILED parity.Q4_K.neon" "$WORK/fault.err" || { cat "$WORK/fault.err"; fail "the fault was not reported as parity.Q4_K.neon"; }

# ---- 3. a short greedy generation: aarch64 tokens == x86 tokens == the golden ones
tokens() { grep -o '"generated_tokens":\[[0-9,]*\]'; }
arm_text=$("${QEMU[@]}" "$ARM" run -p hello -n 10 --temp 0 2>/dev/null)
x86_text=$("$X86" run -p hello -n 10 --temp 0 2>/dev/null)
arm_tok=$("${QEMU[@]}" "$ARM" run -p "Route 66 to 7" -n 24 --temp 0 --json 2>/dev/null | tokens)
x86_tok=$("$X86" run -p "Route 66 to 7" -n 24 --temp 0 --json 2>/dev/null | tokens)
say "aarch64: '$arm_text' $arm_tok"
say "x86-64:  '$x86_text' $x86_tok"
[ "$arm_text" = "pqrstuvwxy" ] || fail "aarch64 greedy decode '$arm_text' != golden 'pqrstuvwxy'"
[ "$arm_text" = "$x86_text" ] || fail "aarch64 and x86 greedy decodes differ"
[ -n "$arm_tok" ] && [ "$arm_tok" = "$x86_tok" ] || fail "aarch64 and x86 token ids differ: $arm_tok vs $x86_tok"
say "ok: selftest passes under qemu-aarch64 on NEON; decode equals x86"
