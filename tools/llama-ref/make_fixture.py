#!/usr/bin/env python3
"""Assemble a reference fixture (tests/fixtures/*.json) from refdump runs.

    make_fixture.py --refdump PATH --model MODEL.gguf --source TEXT --out FIXTURE.json \
        [--n-gen 24] [--threads 2] [--refdump-arg ARG ...] [--regenerate TEXT] PROMPT_FILE[@N_CTX]...

Runs `refdump` once per prompt file (each file's bytes are the prompt, exactly) and writes one
JSON document in the format tests/reference_logits.rs reads: the model file's sha256, n_vocab,
and one case per prompt, with the context llama.cpp ran it in (`n_ctx`). One position per
line, so that a regenerated fixture diffs readably. `PROMPT_FILE@N` runs that prompt with an
N-token context (`refdump --n-ctx N`) instead of the smallest power of two from 512 that holds
it: phi3 models take their long RoPE factors only in a context over their original one.
"""

import argparse
import hashlib
import json
import subprocess
import sys


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
    ap.add_argument("--source", required=True, help="where the model file comes from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-gen", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="llama.cpp 0c1e570 (vendored in llama-cpp-python 0.3.36; GGML_NATIVE=ON, AMX off)")
    ap.add_argument("--refdump-arg", action="append", default=[],
                    help="extra argument for refdump (repeatable), e.g. --no-extra-bufts")
    ap.add_argument("--regenerate", help="how to rebuild the model file and this fixture (recorded)")
    ap.add_argument("prompts", nargs="+")
    a = ap.parse_args()

    cases = []
    n_vocab = None
    for p in a.prompts:
        n_ctx = None
        if "@" in p:
            p, n_ctx = p.rsplit("@", 1)
        cmd = [a.refdump, "-m", a.model, "-f", p, "-n", str(a.n_gen), "-t", str(a.threads)]
        cmd += a.refdump_arg
        if n_ctx:
            cmd += ["--n-ctx", n_ctx]
        # refdump prints greedy_text byte by byte: a token may end inside a UTF-8 sequence.
        out = subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8", "replace")
        case = json.loads(out)
        n_vocab = case.pop("n_vocab")
        cases.append(case)
        print(f"{p}: {len(case['prompt_tokens'])} prompt tokens, "
              f"{len(case['greedy_tokens'])} generated, context {case.get('n_ctx')}", file=sys.stderr)

    flags = " ".join(a.refdump_arg)
    doc = {
        "reference_engine": f"{a.engine}, CPU backend, {a.threads} threads, flash attention off, "
                            f"f16 KV cache, tools/llama-ref/refdump.c {flags}".rstrip(),
        "model_sha256": sha256_file(a.model),
        "model_source": a.source,
        "notes": "prompt_tokens are llama.cpp's tokenization with special tokens parsed; "
                 "top_logits_per_position[i] are the 8 largest raw logits after consuming token i "
                 "of prompt_tokens+greedy_tokens, with the logsumexp of the full row; the prompt "
                 "is one llama_decode, each greedy token is decoded alone",
        "n_vocab": n_vocab,
    }
    if a.regenerate:
        doc["regenerate"] = a.regenerate
    with open(a.out, "w") as f:
        head = json.dumps(doc, ensure_ascii=False, indent=1)[:-2]
        f.write(head + ',\n "cases": [\n')
        for ci, c in enumerate(cases):
            f.write("  {\n")
            for k in ("prompt", "add_bos", "n_ctx", "prompt_tokens", "greedy_tokens", "greedy_text"):
                if k not in c:
                    continue  # n_ctx: refdump builds before it printed one
                f.write(f"   {json.dumps(k)}: {json.dumps(c[k], ensure_ascii=False, separators=(',', ':'))},\n")
            f.write('   "top_logits_per_position": [\n')
            rows = c["top_logits_per_position"]
            for ri, r in enumerate(rows):
                sep = "," if ri + 1 < len(rows) else ""
                f.write("    " + json.dumps(r, separators=(",", ":")) + sep + "\n")
            f.write("   ]\n  }" + ("," if ci + 1 < len(cases) else "") + "\n")
        f.write(" ]\n}\n")


if __name__ == "__main__":
    main()
