#!/usr/bin/env bash
# ember's GPU path against llama.cpp's GPU backend on the same GGUF and adapter, in one run:
# `ember bench --backend wgpu --pp PP --tg TG -r REPS` and `llama-bench -ngl 99 -p PP -n TG
# -r REPS`, then tokens/s per test and the ratio ember / llama.cpp.
#
#   bench/gpu-vs-llama.sh MODEL.gguf LLAMA_BENCH [PP=128] [TG=64] [REPS=3]
#
# LLAMA_BENCH: a llama-bench built with a GPU backend, outside this repository, from the
# llama-cpp-python source archive (vendor/llama.cpp):
#   Vulkan: apt-get install glslc libvulkan-dev spirv-headers;
#           cmake -B build-vk -DGGML_VULKAN=ON -DLLAMA_CURL=OFF; cmake --build build-vk --target llama-bench
#           (Debian 12's Vulkan headers lack VK_EXT_layer_settings, which ggml-vulkan.cpp's
#           ggml_vk_instance_init uses only to configure the validation layer: pass no layer
#           settings there, a local patch, and it builds);
#   CUDA:   cmake -B build-cuda -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 ...
# EMBER=/path/to/ember picks ember's binary (default target/release/ember, built if missing);
# EMBER_BACKEND (default wgpu) its backend. Both programs see the same adapter: on a machine
# with several, set EMBER_WGPU_BACKENDS / GGML_VK_VISIBLE_DEVICES to pick one for both.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
model="${1:?usage: $0 MODEL.gguf LLAMA_BENCH [PP] [TG] [REPS]}"
llama="${2:?usage: $0 MODEL.gguf LLAMA_BENCH [PP] [TG] [REPS]}"
pp="${3:-128}"
tg="${4:-64}"
reps="${5:-3}"
EMBER="${EMBER:-$root/target/release/ember}"
if [ ! -x "$EMBER" ]; then
  (cd "$root" && cargo build --release --locked >&2)
fi
[ -x "$llama" ] || { echo "gpu-vs-llama: $llama is not an executable llama-bench" >&2; exit 1; }
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
echo "gpu-vs-llama: ember bench --backend ${EMBER_BACKEND:-wgpu}" >&2
"$EMBER" bench -m "$model" --backend "${EMBER_BACKEND:-wgpu}" --pp "$pp" --tg "$tg" -r "$reps" \
  --json > "$out/ember.json"
echo "gpu-vs-llama: llama-bench -ngl 99" >&2
"$llama" -m "$model" -ngl 99 -p "$pp" -n "$tg" -r "$reps" -o json > "$out/llama.json" 2> "$out/llama.err" \
  || { cat "$out/llama.err" >&2; exit 1; }
python3 - "$out/ember.json" "$out/llama.json" "$pp" "$tg" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
l = json.load(open(sys.argv[2]))
pp, tg = int(sys.argv[3]), int(sys.argv[4])
if e.get("backend") == "cpu":
    sys.exit("gpu-vs-llama: ember fell back to the CPU; no adapter?")
lrow = {}
for r in l:
    key = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
    lrow[key] = r
first = l[0] if l else {}
print(f"model: {e['model']}")
print(f"ember: {e.get('backend')} on {e.get('adapter')}")
print(f"llama.cpp: {first.get('backends', '?')} on {first.get('gpu_info', '?')} (build {first.get('build_commit', '?')})")
print("| test | ember t/s | llama.cpp t/s | ember / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for r in e["results"]:
    o = lrow.get(r["test"])
    if o is None:
        continue
    print(f"| {r['test']} | {r['mean_tps']:.2f} ± {r['sd_tps']:.2f} | {o['avg_ts']:.2f} ± {o['stddev_ts']:.2f} | {r['mean_tps'] / o['avg_ts']:.3f}x |")
PY
