#!/bin/sh
# Rebuild the tiny synthetic models of tests/arch_reference.rs and llama.cpp's reference
# fixtures for them (tests/fixtures/arch-{qwen3,phi3,llama-rope-freqs}.json), then show how far
# llama.cpp's own logits move without the piece each model is about (the controls: a model
# that ignored it would be that far off).
#
#   tools/llama-ref/make_arch_fixtures.sh [--no-controls] [ARCH...]
#
# ARCH: qwen3, phi3, llama-rope-freqs (default: all three). Environment:
#   REFDUMP  refdump built as tools/llama-ref/README.md says (default /work/llamacpp/refdump)
#   EMBER    the ember binary (default target/release/ember; `cargo build --release` first)
#   WORK     where the .gguf files go (default: a temporary directory, removed at the end)
#
# The models come from `ember synth --arch ARCH --tokenizer-from MODEL --seed 0`, so the same
# ember always writes the same bytes: each fixture records the file's sha256, and the test
# rebuilds the file and refuses a fixture made from other bytes. Rerun this script when a
# change to `ember synth` (runtime/src/gguf/synth.rs) changes them.
set -eu
cd "$(dirname "$0")/../.."

REFDUMP=${REFDUMP:-/work/llamacpp/refdump}
EMBER=${EMBER:-target/release/ember}
controls=1
if [ "${1:-}" = "--no-controls" ]; then
    controls=0
    shift
fi
archs=${*:-qwen3 phi3 llama-rope-freqs}
if [ -n "${WORK:-}" ]; then
    work=$WORK
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

P=tools/llama-ref/prompts
SMOL=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN=models/cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
SEED=0
# 16 generated tokens per case: three cases stay under ~250 KB and reach 300-450 positions.
NGEN=16

synth() { # ARCH TOKENIZER OUT [--without NAME...]
    a=$1 tok=$2 out=$3
    shift 3
    "$EMBER" synth --arch "$a" --tokenizer-from "$tok" --seed $SEED --force "$@" "$out"
}

control() { # PROMPT A B [--b-arg ...]
    p=$1
    shift
    python3 tools/llama-ref/arch_controls.py --refdump "$REFDUMP" --prompt "$p" "$@"
}

for arch in $archs; do
    case $arch in
    qwen3)
        tok=$QWEN
        prompts="$P/long-prose.txt $P/long-code.txt $P/unicode.txt"
        ;;
    phi3)
        # llama.cpp takes phi3's long RoPE factors when the context is over the original one
        # (512 in this model), the short ones otherwise: the prose case runs in a 512-token
        # context (short factors), the other two in 1024 (long factors).
        tok=$SMOL
        prompts="$P/long-prose.txt@512 $P/long-code.txt@1024 $P/unicode.txt@1024"
        ;;
    llama-rope-freqs)
        tok=$SMOL
        prompts="$P/long-prose.txt $P/long-code.txt $P/unicode.txt"
        ;;
    *)
        echo "unknown architecture $arch (qwen3, phi3, llama-rope-freqs)" >&2
        exit 2
        ;;
    esac
    m=$work/$arch.gguf
    synth "$arch" "$tok" "$m"
    python3 tools/llama-ref/make_fixture.py --refdump "$REFDUMP" --model "$m" --n-gen $NGEN \
        --source "ember synth --arch $arch --tokenizer-from $tok --seed $SEED (a random-weight model; the test rebuilds it)" \
        --regenerate "tools/llama-ref/make_arch_fixtures.sh $arch" \
        --out "tests/fixtures/arch-$arch.json" $prompts
    echo "tests/fixtures/arch-$arch.json: model sha256 $(sha256sum "$m" | cut -d' ' -f1)"

    [ $controls = 1 ] || continue
    echo "controls for $arch (A = the fixture's model as llama.cpp runs it):"
    echo "- llama.cpp against itself, flash attention on in B (its own noise):"
    case $arch in
    phi3) control $P/long-code.txt "$m@1024" "$m@1024" --b-arg=--fa ;;
    *) control $P/long-code.txt "$m" "$m" --b-arg=--fa ;;
    esac
    case $arch in
    phi3)
        echo "- phi3, long factors (context 1024) against short (context 512):"
        control $P/long-code.txt "$m@1024" "$m@512"
        echo "- phi3 without phi3.rope.scaling.attn_factor (context 1024):"
        synth phi3 "$tok" "$work/phi3-no-attn-factor.gguf" --without phi3.rope.scaling.attn_factor
        control $P/long-code.txt "$m@1024" "$work/phi3-no-attn-factor.gguf@1024"
        ;;
    llama-rope-freqs)
        echo "- llama without rope_freqs.weight:"
        synth llama-rope-freqs "$tok" "$work/llama-no-rope-freqs.gguf" --without rope_freqs.weight
        control $P/long-code.txt "$m" "$work/llama-no-rope-freqs.gguf"
        ;;
    esac
done
