#!/usr/bin/env python3
"""Compare two GGUF files (e.g. llama-quantize's and ember quantize's output for the same input
and type): whole-file sha256, metadata, tensor order, and per tensor either "identical" or, where
the bytes differ, the type of each and the max |delta| after dequantization (gguf-py's
dequantizers).

  python3 tools/quantize-ref/compare.py A.gguf B.gguf [--json] [--gguf-py DIR]

gguf-py: `pip install gguf`, or --gguf-py pointing at llama.cpp's gguf-py directory.
Exit status 0 when the files are byte-identical, 1 otherwise.
"""
import argparse
import hashlib
import json
import sys


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    ap.add_argument("--gguf-py", help="directory holding llama.cpp's gguf-py package")
    args = ap.parse_args()
    if args.gguf_py:
        sys.path.insert(0, args.gguf_py)
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    sa, sb = sha256(args.a), sha256(args.b)
    out = {"a": args.a, "b": args.b, "sha256_a": sa, "sha256_b": sb, "identical": sa == sb}
    if sa != sb:
        ra, rb = GGUFReader(args.a), GGUFReader(args.b)
        fa = [(f.name, f.types, [bytes(p) for p in f.parts]) for f in ra.fields.values()
              if not f.name.startswith("GGUF.")]
        fb = [(f.name, f.types, [bytes(p) for p in f.parts]) for f in rb.fields.values()
              if not f.name.startswith("GGUF.")]
        out["metadata_identical"] = fa == fb
        if fa != fb:
            ka, kb = [f[0] for f in fa], [f[0] for f in fb]
            out["metadata_diff"] = {
                "only_a": [k for k in ka if k not in kb],
                "only_b": [k for k in kb if k not in ka],
                "order_same": [k for k in ka if k in kb] == [k for k in kb if k in ka],
                "values_differ": [x[0] for x in fa if x[0] in kb and x != fb[kb.index(x[0])]],
            }
        ta = {t.name: t for t in ra.tensors}
        tb = {t.name: t for t in rb.tensors}
        out["tensor_order_same"] = [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
        rows = []
        for name, t in ta.items():
            u = tb.get(name)
            if u is None:
                rows.append({"tensor": name, "only_in": "a"})
                continue
            same_bytes = t.tensor_type == u.tensor_type and bytes(t.data.tobytes()) == bytes(u.data.tobytes())
            row = {"tensor": name, "type_a": t.tensor_type.name, "type_b": u.tensor_type.name,
                   "identical": bool(same_bytes), "offset_same": int(t.data_offset) == int(u.data_offset)}
            if not same_bytes:
                da = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
                db = dequantize(u.data, u.tensor_type).astype(np.float64).reshape(-1)
                if da.shape == db.shape:
                    row["max_abs_delta"] = float(np.max(np.abs(da - db))) if da.size else 0.0
                    row["max_abs_a"] = float(np.max(np.abs(da))) if da.size else 0.0
                else:
                    row["shape_differs"] = True
            rows.append(row)
        for name in tb:
            if name not in ta:
                rows.append({"tensor": name, "only_in": "b"})
        out["tensors"] = rows
        out["tensors_identical"] = sum(1 for r in rows if r.get("identical"))
        out["tensors_total"] = len(rows)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.a}: {sa}\n{args.b}: {sb}")
        if out["identical"]:
            print("byte-identical")
        else:
            print(f"metadata identical: {out['metadata_identical']}; tensor order same: {out['tensor_order_same']}; "
                  f"{out['tensors_identical']}/{out['tensors_total']} tensors identical")
            for r in out["tensors"]:
                if not r.get("identical"):
                    print("  ", json.dumps(r))
    return 0 if out["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
