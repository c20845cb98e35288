#!/usr/bin/env bash
# Side-by-side throughput: llama.cpp's llama-bench and `ember bench` on the same
# GGUF, same threads, in one run. Prints tokens/s for pp128, pp512, tg128 and
# peak RSS for both, and the ratio ember / llama.cpp.
#
#   bench/llama-bench-compare.sh MODEL.gguf [THREADS=2] [REPS=3]
#
# llama-bench is built from the llama-cpp-python source archive (pip package
# llama-cpp-python==0.3.36) under $LLAMA_DIR (default ~/.cache/ember/llama.cpp),
# outside the repository. Set LLAMA_BENCH=/path/to/llama-bench to use your own.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
model="${1:?usage: $0 MODEL.gguf [THREADS] [REPS]}"
threads="${2:-2}"
reps="${3:-3}"
LLAMA_DIR="${LLAMA_DIR:-$HOME/.cache/ember/llama.cpp}"

if [ -z "${LLAMA_BENCH:-}" ]; then
  LLAMA_BENCH="$LLAMA_DIR/src/build/bin/llama-bench"
  if [ ! -x "$LLAMA_BENCH" ]; then
    echo "compare: building llama-bench under $LLAMA_DIR (once)" >&2
    mkdir -p "$LLAMA_DIR/dl"
    python3 -m pip install --quiet cmake ninja scikit-build-core
    python3 -m pip download --quiet --no-deps --no-build-isolation --no-binary llama-cpp-python -d "$LLAMA_DIR/dl" llama-cpp-python==0.3.36
    rm -rf "$LLAMA_DIR/src"; mkdir -p "$LLAMA_DIR/src"
    tar -xzf "$LLAMA_DIR"/dl/llama_cpp_python-0.3.36.tar.gz -C "$LLAMA_DIR/src" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
    (cd "$LLAMA_DIR/src" && cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null && cmake --build build --target llama-bench -j"$(nproc)" >/dev/null)
  fi
fi
EMBER="${EMBER:-$root/target/release/ember}"
if [ ! -x "$EMBER" ]; then
  (cd "$root" && cargo build --release --locked >&2)
fi

# Peak RSS of a child process, in KiB, from the kernel's accounting.
peak() { python3 -c 'import resource,subprocess,sys
r=subprocess.run(sys.argv[2:],stdout=open(sys.argv[1],"w"),stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)' "$@"; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "compare: $(basename "$model"), $threads threads, $reps reps" >&2
l_rss=$(peak "$tmp/llama.json" "$LLAMA_BENCH" -m "$model" -t "$threads" -p 128,512 -n 128 -r "$reps" -o json)
e_rss=$(peak "$tmp/ember.json" "$EMBER" bench -m "$model" -t "$threads" --pp 128,512 --tg 128 -r "$reps" --json)

python3 - "$tmp/llama.json" "$tmp/ember.json" "$l_rss" "$e_rss" "$model" "$threads" <<'PY'
import json, sys
llama = json.load(open(sys.argv[1])); ember = json.load(open(sys.argv[2]))
l_rss, e_rss = int(sys.argv[3]) / 1024, int(sys.argv[4]) / 1024
lt = {}
for r in llama:
    name = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
    lt[name] = (r["avg_ts"], r["stddev_ts"])
print(f"model: {sys.argv[5]}  threads: {sys.argv[6]}")
print("| test | llama.cpp t/s | ember t/s | ember / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for r in ember["results"]:
    l = lt.get(r["test"])
    if l:
        print(f"| {r['test']} | {l[0]:.1f} ± {l[1]:.1f} | {r['mean_tps']:.1f} ± {r['sd_tps']:.1f} | {r['mean_tps']/l[0]:.2f}x |")
print(f"| peak RSS (MiB) | {l_rss:.0f} | {e_rss:.0f} | {e_rss/l_rss:.2f}x |")
PY
