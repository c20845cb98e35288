#!/usr/bin/env bash
# Quantize SRC to every TYPE with llama-quantize and with ember quantize, compare the outputs
# (compare.py: sha256, then per tensor identical or max |delta|), print one markdown row per type
# and delete the outputs.
#
#   tools/quantize-ref/compare-all.sh SRC.gguf WORKDIR [TYPE...]
#
# Environment: LLAMA_QUANTIZE (llama-quantize binary), EMBER (ember binary), GGUF_PY (llama.cpp's
# gguf-py dir, for compare.py), THREADS (default 2), KEEP=1 keeps the outputs.
set -euo pipefail
src=$1; work=$2; shift 2
types=("$@")
[ ${#types[@]} -eq 0 ] && types=(Q8_0 Q6_K Q5_K_M Q5_K_S Q5_0 Q5_1 Q4_K_M Q4_K_S Q4_0 Q4_1 Q3_K_M Q2_K IQ4_NL IQ4_XS F16 BF16 F32)
LLAMA_QUANTIZE=${LLAMA_QUANTIZE:-llama-quantize}
EMBER=${EMBER:-ember}
THREADS=${THREADS:-2}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
base=$(basename "$src" .gguf)
echo "| source | type | llama-quantize sha256 | ember sha256 | identical | tensors identical | max abs delta |"
echo "|---|---|---|---|---|---|---|"
for t in "${types[@]}"; do
  l=$work/$base.$t.llama.gguf; e=$work/$base.$t.ember.gguf
  "$LLAMA_QUANTIZE" --allow-requantize "$src" "$l" "$t" "$THREADS" > "$work/$base.$t.llama.log" 2>&1
  "$EMBER" quantize -q --allow-requantize -t "$THREADS" "$src" "$e" "$t" 2> "$work/$base.$t.ember.log"
  j=$(python3 "$here/compare.py" --json ${GGUF_PY:+--gguf-py "$GGUF_PY"} "$l" "$e" || true)
  python3 - "$base" "$t" "$j" <<'PY'
import json, sys
base, t, j = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if j["identical"]:
    n = "all"; d = "0"
else:
    n = f'{j["tensors_identical"]}/{j["tensors_total"]}'
    d = "%g" % max([r.get("max_abs_delta", 0.0) for r in j["tensors"]] or [0.0])
print(f'| {base} | {t} | {j["sha256_a"][:16]} | {j["sha256_b"][:16]} | {"yes" if j["identical"] else "NO"} | {n} | {d} |')
PY
  [ "${KEEP:-0}" = 1 ] || rm -f "$l" "$e"
done
