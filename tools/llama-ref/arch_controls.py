#!/usr/bin/env python3
"""How far llama.cpp's logits move when one piece of a model changes: the check that llama.cpp
really applies what a tiny synthetic model carries (rope_freqs, phi3's long/short factors and
attention factor), and that a model ignoring it would fail tests/arch_reference.rs.

    arch_controls.py --refdump PATH --prompt FILE [--threads 2] [--b-arg ARG ...] \
        A.gguf[@N_CTX] B.gguf[@N_CTX]

Runs refdump on the prompt with each model (optionally in an N_CTX context, `refdump --n-ctx`; B with the extra
refdump arguments --b-arg, e.g. --fa to see llama.cpp against its own other attention path),
dumping the logits of every prompt position (`--dump result_output`), and prints, with A as
the reference as tests/arch_reference.rs uses it:
  - the largest |B - A| over A's top-8 ids at any position (what the test bounds),
  - the largest |logsumexp(B) - logsumexp(A)|,
  - the positions where the top-1 differs, of those where A's top-1/top-2 margin is >= 1.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def run(refdump, model, prompt, threads, tmp, tag, extra=()):
    n_ctx = None
    if "@" in model:
        model, n_ctx = model.rsplit("@", 1)
    d = os.path.join(tmp, tag)
    os.makedirs(d)
    cmd = [refdump, "-m", model, "-f", prompt, "-n", "0", "-t", str(threads),
           "--dump", "result_output", "--dump-dir", d]
    if n_ctx:
        cmd += ["--n-ctx", n_ctx]
    cmd += list(extra)
    out = subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8", "replace")
    case = json.loads(out)
    logits = np.fromfile(os.path.join(d, "result_output.f32"), dtype=np.float32)
    return case, logits.reshape(len(case["prompt_tokens"]), case["n_vocab"])


def lse(rows):
    m = rows.max(axis=1, keepdims=True).astype(np.float64)
    return (m[:, 0] + np.log(np.exp(rows.astype(np.float64) - m).sum(axis=1)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--refdump", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--b-arg", action="append", default=[], help="extra refdump argument for B")
    ap.add_argument("a")
    ap.add_argument("b")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca, la = run(a.refdump, a.a, a.prompt, a.threads, tmp, "a")
        cb, lb = run(a.refdump, a.b, a.prompt, a.threads, tmp, "b", a.b_arg)
    if ca["prompt_tokens"] != cb["prompt_tokens"]:
        sys.exit("the two models tokenize the prompt differently")
    n = la.shape[0]
    top8 = np.argsort(-la, axis=1)[:, :8]
    d8 = np.abs(np.take_along_axis(lb, top8, 1) - np.take_along_axis(la, top8, 1)).max(axis=1)
    dl = np.abs(lse(lb) - lse(la))
    s = np.sort(la, axis=1)
    margin = s[:, -1] - s[:, -2]
    sure = margin >= 1.0
    flips = (la.argmax(axis=1) != lb.argmax(axis=1)) & sure
    first = int(np.argmax(d8 > 0.5)) if (d8 > 0.5).any() else None
    print(f"{os.path.basename(a.prompt)}: {n} positions, context {ca.get('n_ctx')} vs {cb.get('n_ctx')}")
    print(f"  max |Δlogit| over A's top-8: {d8.max():.3f} (position {int(d8.argmax())}); "
          f"median over positions {np.median(d8):.3f}; first position over 0.5: {first}")
    print(f"  max |Δlogsumexp|: {dl.max():.3f}")
    print(f"  top-1 differs at {int(flips.sum())} of the {int(sure.sum())} positions with A's margin >= 1")


if __name__ == "__main__":
    main()
