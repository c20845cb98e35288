#!/usr/bin/env python3
"""Write tests/fixtures/quantize-llama.json: the sha256 of llama-quantize's output for the inputs
and types tests/quantize.rs quantizes with ember (which must produce the same bytes).

  python3 tools/quantize-ref/make_fixture.py --llama-quantize BUILD/bin/llama-quantize \
      [--models models/cache] [--work /tmp/quant] [--out tests/fixtures/quantize-llama.json]

Every output is made with `llama-quantize --allow-requantize IN OUT TYPE 2` (no importance
matrix) and deleted after hashing. The F16 input is itself llama-quantize's F16 of the SmolLM2
Q4_1 file (its sha256 is recorded too: ember's F16 of that file must match it first).
"""
import argparse
import hashlib
import json
import os
import subprocess

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# From the F16 input: every mix but the IQ4 ones (their encoder is the slow one; the real-file
# cases below cover them).
FROM_F16 = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
            "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "BF16", "F32"]
# From the F16 input with --pure (no mix: the default type, or its fallback, everywhere).
FROM_F16_PURE = ["Q4_K_M", "Q2_K"]
# Requantized straight from the real files (the new block formats' test models are made so).
FROM_REAL = [(SMOL, "Q2_K"), (SMOL, "Q3_K_M"), (SMOL, "IQ4_NL"), (SMOL, "IQ4_XS"),
             (QWEN, "Q2_K"), (QWEN, "Q3_K_M")]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--models", default="models/cache")
    ap.add_argument("--work", default="/tmp/ember-quantize-fixture")
    ap.add_argument("--out", default="tests/fixtures/quantize-llama.json")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)

    def quantize(inp, ty, keep=False, args=()):
        out = os.path.join(a.work, f"{os.path.basename(inp)}.{ty}.gguf")
        subprocess.run([a.llama_quantize, "--allow-requantize", *args, inp, out, ty, "2"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s = sha256(out)
        if not keep:
            os.remove(out)
        print(f"{os.path.basename(inp)} {ty} {s}", flush=True)
        return s, out

    smol = os.path.join(a.models, SMOL)
    f16_sha, f16 = quantize(smol, "F16", keep=True)
    cases = [{"input": "f16", "type": t, "sha256": quantize(f16, t)[0]} for t in FROM_F16]
    cases += [{"input": "f16", "type": t, "args": ["--pure"],
               "sha256": quantize(f16, t, args=["--pure"])[0]} for t in FROM_F16_PURE]
    os.remove(f16)
    cases += [{"input": m, "type": t, "sha256": quantize(os.path.join(a.models, m), t)[0]}
              for m, t in FROM_REAL]
    doc = {
        "about": "sha256 of llama-quantize's output (llama.cpp 0c1e570, CPU build, "
                 "`llama-quantize --allow-requantize [ARGS] IN OUT TYPE 2`, no importance matrix) for "
                 "each case; input \"f16\" is f16_source (llama-quantize's F16 of the SmolLM2 Q4_1 "
                 "file), the others the real models of models/fetch.sh. Made by "
                 "tools/quantize-ref/make_fixture.py; tests/quantize.rs checks that `ember "
                 "quantize` writes the same bytes.",
        "llama_cpp": "0c1e570",
        "f16_source": {"input": SMOL, "type": "F16", "sha256": f16_sha},
        "cases": cases,
    }
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
