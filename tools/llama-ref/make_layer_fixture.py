#!/usr/bin/env python3
"""Assemble a hidden-state fixture (tests/fixtures/layers-*.json + .f32) from one refdump run.

    make_layer_fixture.py --refdump PATH --model MODEL.gguf --prompt PROMPT_FILE \
        --out tests/fixtures/layers-NAME --tensor attn_norm-0 --tensor l_out-0 ... [--threads 2]

Runs `refdump --dump` on the prompt and writes:
  - NAME.f32: the named tensors of the prompt's decode, one after another, raw little-endian f32,
    each [tokens × width] with the width fastest (llama.cpp's [ne0, ne1] layout);
  - NAME.json: the model's sha256, the prompt and its tokens, and for each tensor its name,
    rows, cols and offset (in f32 elements) into NAME.f32.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import tempfile


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--refdump", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", required=True, help="path without extension")
    ap.add_argument("--tensor", action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="llama.cpp 0c1e570 (vendored in llama-cpp-python 0.3.36; GGML_NATIVE=ON, AMX off)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        cmd = [a.refdump, "-m", a.model, "-f", a.prompt, "-n", "0", "-t", str(a.threads),
               "--dump", ",".join(a.tensor), "--dump-dir", d]
        r = subprocess.run(cmd, check=True, capture_output=True, text=True)
        case = json.loads(r.stdout)
        # The last shape reported for a name is the tensor that was written (a name can label a
        # matmul result, its reshape and its RoPE; the file holds the last).
        shapes = {}
        for line in r.stderr.splitlines():
            m = re.match(r"dump: (\S+) \[(\d+), (\d+), (\d+), (\d+)\]", line)
            if m:
                ne = [int(x) for x in m.groups()[1:]]
                shapes[m.group(1)] = ne
        n_tok = len(case["prompt_tokens"])
        tensors = []
        offset = 0
        blob = b""
        for name in a.tensor:
            ne = shapes[name]
            n = ne[0] * ne[1] * ne[2] * ne[3]
            assert n % n_tok == 0, (name, ne, n_tok)
            data = open(os.path.join(d, name + ".f32"), "rb").read()
            assert len(data) == 4 * n
            tensors.append({"name": name, "rows": n_tok, "cols": n // n_tok, "offset": offset})
            offset += n
            blob += data

    with open(a.out + ".f32", "wb") as f:
        f.write(blob)
    doc = {
        "reference_engine": f"{a.engine}, CPU backend, {a.threads} threads, flash attention off, "
                            "f16 KV cache, tools/llama-ref/refdump.c --dump",
        "model_sha256": sha256_file(a.model),
        "notes": "hidden states of the prompt's one llama_decode, named as in llama.cpp's graph "
                 "(NAME-LAYER); values in the .f32 file next to this one, [rows x cols] each, "
                 "cols fastest, starting at offset (in f32 elements)",
        "prompt": case["prompt"],
        "prompt_tokens": case["prompt_tokens"],
        "tensors": tensors,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
