#!/usr/bin/env bash
# One short script for a lent GPU machine: what it has, then ember on every GPU backend it can
# use there, decode as a fraction of the memory-bandwidth roofline, and (time allowing)
# llama.cpp's llama-bench on the same files. Rehearsed on lavapipe (see README).
#
#   bench/gpu-machine.sh EMBER OUT_DIR MODEL.gguf[.xz]... 
#
# EMBER: an ember binary (on the lent machine: a stripped release build with --features cuda,
# carried xz-compressed: ~10 MiB). MODEL: GGUFs, or `.xz` files to unpack first; on a machine
# that accepts 64 MiB, synthetic ones (`ember synth --like REAL.gguf OUT.gguf`, then `xz -9`:
# SmolLM2 0.6 MiB, Qwen2.5-0.5B 1.7 MiB), whose speed is the real file's.
# Env: PP (128), TG (64), REPS (3); BW_GBS: the card's memory bandwidth in GB/s (default: from
# its name: H100 SXM 3350, H100 PCIe 2000, H200 4800, A100 80GB 2039, L4 300; else unset, no
# roofline); LLAMA_SRC: a llama.cpp source tree to build llama-bench from with CUDA (sm_90
# only, GGML_NATIVE off), skipped if unset or if nvcc is missing; BUILD_LLAMA_S: give up on
# that build after this many seconds (default 240).
set -uo pipefail
ember="${1:?usage: $0 EMBER OUT_DIR MODEL.gguf[.xz]...}"
out="${2:?usage: $0 EMBER OUT_DIR MODEL.gguf[.xz]...}"
shift 2
pp="${PP:-128}"; tg="${TG:-64}"; reps="${REPS:-3}"
mkdir -p "$out"
log="$out/gpu-machine.md"
say() { echo "$*" | tee -a "$log"; }
: > "$log"

say "# GPU machine run, $(date -u +%FT%TZ)"
say "CPU: $(lscpu | sed -n 's/^Model name: *//p') · $(nproc) cores"
gpu_name=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 | tee -a "$log"
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
else
  say "nvidia-smi: not found"
fi
if command -v vulkaninfo >/dev/null; then
  vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName|apiVersion" | tee -a "$log"
else
  say "vulkaninfo: not found (ember probes Vulkan through wgpu itself)"
fi
say "NVRTC: $(ldconfig -p 2>/dev/null | grep -o 'libnvrtc.so[.0-9]*' | head -1 || true)"
say "nvcc: $(command -v nvcc || echo none)"
"$ember" selftest 2>&1 | tail -5 | tee -a "$log"

bw="${BW_GBS:-}"
if [ -z "$bw" ]; then
  case "$gpu_name" in
    *H200*) bw=4800 ;; *H100*PCIe*) bw=2000 ;; *H100*) bw=3350 ;;
    *A100*80GB*) bw=2039 ;; *A100*) bw=1555 ;; *L4*) bw=300 ;;
  esac
fi
say "memory bandwidth for the roofline: ${bw:-unknown} GB/s"

models=()
for m in "$@"; do
  case "$m" in
    *.xz) u="$out/$(basename "${m%.xz}")"; xz -dc "$m" > "$u" && models+=("$u") ;;
    *) models+=("$m") ;;
  esac
done

say ""
say "| model | backend | device | pp$pp t/s | tg$tg t/s | tg roofline t/s | tg / roofline |"
say "| --- | --- | --- | ---: | ---: | ---: | ---: |"
for m in "${models[@]}"; do
  for be in cuda vulkan wgpu; do
    j="$out/$(basename "$m").$be.json"
    if ! timeout 300 "$ember" bench -m "$m" --backend "$be" --pp "$pp" --tg "$tg" -r "$reps" --json \
        > "$j" 2> "$j.err"; then
      say "| $(basename "$m") | $be | failed: $(tail -1 "$j.err") | | | | |"
      continue
    fi
    python3 - "$j" "$bw" "$(basename "$m")" "$be" <<'PY' | tee -a "$log"
import json, sys
j = json.load(open(sys.argv[1])); bw = sys.argv[2]; name, be = sys.argv[3], sys.argv[4]
if j.get("backend") == "cpu":
    print(f"| {name} | {be} | fell back to the CPU | | | | |"); sys.exit()
r = {x["kind"]: x for x in j["results"]}
pp = r.get("pp", {}).get("mean_tps", float("nan")); tg = r.get("tg", {}).get("mean_tps", float("nan"))
roof = float(bw) * 1e9 / j["weights_bytes"] if bw else None
frac = f"{tg / roof:.3f}" if roof else "-"
print(f"| {name} | {j['backend']} | {j.get('adapter')} | {pp:.1f} | {tg:.1f} | {roof:.0f} | {frac} |" if roof
      else f"| {name} | {j['backend']} | {j.get('adapter')} | {pp:.1f} | {tg:.1f} | - | - |")
PY
  done
done

if [ -n "${LLAMA_SRC:-}" ] && command -v nvcc >/dev/null; then
  say ""
  say "llama.cpp (CUDA, sm_90) from $LLAMA_SRC"
  if timeout "${BUILD_LLAMA_S:-240}" bash -c "cmake -S '$LLAMA_SRC' -B '$out/llama-cuda' -G Ninja \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
      -DCMAKE_BUILD_TYPE=Release > '$out/llama-cfg.log' 2>&1 && \
      cmake --build '$out/llama-cuda' --target llama-bench -j '$(nproc)' > '$out/llama-build.log' 2>&1"; then
    for m in "${models[@]}"; do
      "$out/llama-cuda/bin/llama-bench" -m "$m" -ngl 99 -p "$pp" -n "$tg" -r "$reps" 2>&1 | tee -a "$log"
    done
  else
    say "llama.cpp build did not finish in ${BUILD_LLAMA_S:-240} s (see llama-build.log)"
  fi
fi
say ""
say "done: $log"
