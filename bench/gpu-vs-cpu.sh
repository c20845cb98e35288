#!/usr/bin/env bash
# wgpu against the CPU on the same GGUF, in one run: `ember bench` llama-bench mode with
# --backend cpu and --backend wgpu (or $GPU_BACKEND), then tokens/s per test and the ratio
# wgpu / cpu. On lavapipe (software Vulkan) this only shows that the path works; run it on a
# real GPU for figures.
#
#   bench/gpu-vs-cpu.sh [MODEL.gguf] [THREADS=all] [REPS=3] [PP=128] [TG=64]
#
# With no model, the embedded default is used. EMBER=/path/to/ember picks the binary
# (default target/release/ember, built if missing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
model="${1:-}"
threads="${2:-$(nproc)}"
reps="${3:-3}"
pp="${4:-128}"
tg="${5:-64}"
EMBER="${EMBER:-$root/target/release/ember}"
if [ ! -x "$EMBER" ]; then
  (cd "$root" && cargo build --release --locked >&2)
fi
margs=(); [ -n "$model" ] && margs=(-m "$model")
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for be in cpu "${GPU_BACKEND:-wgpu}"; do
  echo "gpu-vs-cpu: ember bench --backend $be" >&2
  "$EMBER" bench "${margs[@]}" --backend "$be" -t "$threads" --pp "$pp" --tg "$tg" -r "$reps" --json > "$out/$be.json"
done
python3 - "$out/cpu.json" "$out/${GPU_BACKEND:-wgpu}.json" <<'PY'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
if gpu.get("backend") != "wgpu":
    sys.exit(f"gpu-vs-cpu: the GPU run fell back to {gpu.get('backend')}; no adapter?")
print(f"model: {cpu['model']}  cpu: {cpu['isa']} x{cpu['threads']} threads  gpu: {gpu.get('adapter')}")
print(f"| test | cpu t/s | wgpu t/s | wgpu / cpu |")
print(f"| --- | ---: | ---: | ---: |")
for c, g in zip(cpu["results"], gpu["results"]):
    assert c["test"] == g["test"]
    print(f"| {c['test']} | {c['mean_tps']:.2f} ± {c['sd_tps']:.2f} | {g['mean_tps']:.2f} ± {g['sd_tps']:.2f} | {g['mean_tps'] / c['mean_tps']:.2f}x |")
PY
