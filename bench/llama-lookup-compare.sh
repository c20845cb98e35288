#!/usr/bin/env bash
# Prompt lookup decoding in llama.cpp on ember's `edit` workload: the same prompts
# `ember bench -w edit` sends, through llama.cpp's `llama-lookup`, with lookup (draft up
# to DRAFT_MAX tokens) and without it (the same program drafting nothing, so sampling,
# timing and stopping are the same code). Prints, per prompt and in the mean, decode
# tokens/s of both, the speed-up, tokens drafted and accepted, and whether the two texts
# are the same; the ember commands that measure the same prompts come at the end.
#
#   LLAMA_BIN=/path/to/llama.cpp/build/bin bench/llama-lookup-compare.sh MODEL.gguf [DRAFT_MAX=16] [THREADS=2]
#
# Environment:
#   LLAMA_BIN   directory with llama-lookup (built from the llama-cpp-python 0.3.36 source
#               archive's vendor/llama.cpp, outside the repository; see llama-bench-compare.sh)
#   PROMPTS     a directory written by `cargo run -p ember-bench --example edit_prompts --
#               MODEL.gguf DIR` (default: written now, into a temporary directory)
#   N           measure only the first N prompts (default: all 16)
#   CTX         context size (default 4096, ember bench's default for these models)
#   OUT         keep the raw llama-lookup logs and results.tsv here (default: temporary)
#
# Each prompt file is passed with -bf (read byte for byte; -f drops the template's final
# newline) and --no-escape (code holds backslashes). Greedy (--temp 0), stopping at
# end-of-generation or after the budget ember gives the request (block tokens + 32).
# llama-lookup's drafter is not ember's: it keeps n-gram statistics (1- to 4-grams) of the
# prompt and output and drafts the most frequent continuation once an n-gram has been seen
# often enough (lax thresholds), where `ember --lookup N` drafts what followed the latest
# occurrence of the last N..1 tokens. Its decode time (`decoded N tokens in S seconds`) runs
# from the end of prompt processing to the last token, drafting and sampling included.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
model="${1:?usage: LLAMA_BIN=DIR $0 MODEL.gguf [DRAFT_MAX] [THREADS]}"
draft_max="${2:-16}"
threads="${3:-2}"
ctx="${CTX:-4096}"
LLAMA_BIN="${LLAMA_BIN:?set LLAMA_BIN to the directory holding llama-lookup}"
lookup="$LLAMA_BIN/llama-lookup"
[ -x "$lookup" ] || { echo "compare: no $lookup" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
out="${OUT:-$tmp/out}"
mkdir -p "$out"
prompts="${PROMPTS:-}"
if [ -z "$prompts" ]; then
  prompts="$tmp/prompts"
  (cd "$root" && cargo run -q -p ember-bench --example edit_prompts -- "$model" "$prompts" >&2)
fi
[ -f "$prompts/manifest.tsv" ] || { echo "compare: no $prompts/manifest.tsv" >&2; exit 1; }

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "compare: $(basename "$model"), llama-lookup draft max $draft_max vs 0, $threads threads, ctx $ctx" >&2
echo "compare: $cpu, $(nproc) cpus; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

run() { # run NAME DRAFT FILE MAX_TOKENS
  "$lookup" -m "$model" -bf "$3" --no-escape -n "$4" --temp 0 -t "$threads" -tb "$threads" \
    -c "$ctx" --spec-draft-n-max "$2" >"$out/$1.out" 2>"$out/$1.err" ||
    { echo "compare: llama-lookup failed on $3 (log: $out/$1.err)" >&2; tail -5 "$out/$1.err" >&2; exit 1; }
}

i=0
while IFS=$'\t' read -r index id kind ptok btok maxtok file; do
  [ "$index" = index ] && continue
  if [ -n "${N:-}" ] && [ "$i" -ge "$N" ]; then break; fi
  echo "compare: [$((i + 1))] $id" >&2
  # Alternate which run goes first, so that a machine slowing down or warming up does not
  # favour one side.
  if [ $((i % 2)) -eq 0 ]; then
    run "$index-plain" 0 "$prompts/$file" "$maxtok"
    run "$index-lookup" "$draft_max" "$prompts/$file" "$maxtok"
  else
    run "$index-lookup" "$draft_max" "$prompts/$file" "$maxtok"
    run "$index-plain" 0 "$prompts/$file" "$maxtok"
  fi
  i=$((i + 1))
done <"$prompts/manifest.tsv"
echo "compare: load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$out" "$prompts" "$i" "$draft_max" "$model" "$threads" "$cpu" <<'PY'
import re, sys
out, prompts, n, draft_max, model, threads, cpu = sys.argv[1:8]
n = int(n)
rows = [l.rstrip("\n").split("\t") for l in open(f"{prompts}/manifest.tsv")][1 : n + 1]

def parse(name, prompt_text):
    err = open(f"{out}/{name}.err", errors="replace").read()
    def num(pat):
        m = re.search(pat, err)
        if not m:
            sys.exit(f"compare: no '{pat}' in {out}/{name}.err")
        return float(m.group(1))
    r = {
        "encoded": int(num(r"encoded\s+(\d+) tokens")),
        "tokens": int(num(r"decoded\s+(\d+) tokens")),
        "secs": num(r"decoded\s+\d+ tokens in\s+([\d.]+) seconds"),
        "drafted": int(num(r"n_drafted\s+=\s+(\d+)")),
        "accepted": int(num(r"n_accept\s+=\s+(\d+)")),
    }
    r["tps"] = r["tokens"] / r["secs"]
    # stdout: the prompt as its tokens print, then the generated text.
    text = open(f"{out}/{name}.out", errors="replace").read()
    tail = prompt_text[-48:]
    r["text"] = text[text.rfind(tail) + len(tail) :].rstrip("\n") if tail in text else text
    return r

def same_text(a, b):
    """yes; yes* when lookup's text is plain's with more after it (see the note); else no."""
    if a["text"] == b["text"]:
        return "yes"
    return "yes*" if b["text"].startswith(a["text"]) else "no"

res = []
for index, id, kind, ptok, btok, maxtok, file in rows:
    p = open(f"{prompts}/{file}", errors="replace").read()
    plain, look = parse(f"{index}-plain", p), parse(f"{index}-lookup", p)
    res.append((id, kind, int(ptok), plain, look))

print(f"model: {model}  threads: {threads}  cpu: {cpu}")
print(f"llama-lookup --temp 0, draft max {draft_max} (lookup) vs 0 (plain); decode tokens/s")
print()
print("| prompt | kind | prompt tok (ember / llama.cpp) | plain tok | plain t/s | lookup tok | lookup t/s | speed-up | drafted | accepted | accept % | same text |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
warn = []
for id, kind, ptok, a, b in res:
    acc = 100 * b["accepted"] / b["drafted"] if b["drafted"] else float("nan")
    same = same_text(a, b)
    print(f"| {id} | {kind} | {ptok} / {a['encoded']} | {a['tokens']} | {a['tps']:.2f} | {b['tokens']} | {b['tps']:.2f} | {b['tps'] / a['tps']:.2f}x | {b['drafted']} | {b['accepted']} | {acc:.1f} | {same} |")
    if ptok != a["encoded"]:
        warn.append(f"{id}: ember tokenizes the prompt to {ptok} tokens, llama.cpp to {a['encoded']}")

def summary(label, sel):
    if not sel:
        return
    pt = sum(a["tps"] for *_, a, b in sel) / len(sel)
    lt = sum(b["tps"] for *_, a, b in sel) / len(sel)
    ratios = [b["tps"] / a["tps"] for *_, a, b in sel]
    geo = 1.0
    for r in ratios:
        geo *= r
    geo **= 1 / len(ratios)
    agg_p = sum(a["tokens"] for *_, a, b in sel) / sum(a["secs"] for *_, a, b in sel)
    agg_l = sum(b["tokens"] for *_, a, b in sel) / sum(b["secs"] for *_, a, b in sel)
    dr = sum(b["drafted"] for *_, a, b in sel)
    ac = sum(b["accepted"] for *_, a, b in sel)
    same = sum(same_text(a, b) != "no" for *_, a, b in sel)
    print(f"| {label} | {len(sel)} | {pt:.2f} | {lt:.2f} | {lt / pt:.2f}x | {geo:.2f}x | {agg_p:.2f} | {agg_l:.2f} | {dr} | {ac} | {100 * ac / dr if dr else float('nan'):.1f} | {same}/{len(sel)} |")

print()
print("| set | prompts | mean plain t/s | mean lookup t/s | ratio of means | geomean speed-up | plain tok/total s | lookup tok/total s | drafted | accepted | accept % | same text |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
summary("all", res)
summary("code", [r for r in res if r[1] == "code"])
summary("text", [r for r in res if r[1] == "text"])
if any(same_text(a, b) == "yes*" for *_, a, b in res):
    print()
    print("yes*: the same text up to end-of-generation, and then more: when llama-lookup accepts a drafted")
    print("end-of-generation token it still takes the tokens after it in the same step (counted in its tokens).")
for w in warn:
    print(f"warning: {w}")
PY

cat >&2 <<EOF

compare: ember on the same prompts (the preset, in a seeded order, one pass over all 16):
  ember bench -m $model -w edit -n 16 -t $threads --ctx $ctx
  ember bench -m $model -w edit -n 16 -t $threads --ctx $ctx --lookup 4 --draft-max $draft_max
or in file order, as here: --dataset $prompts/edit.jsonl instead of -w edit -n 16
(PROMPTS=DIR keeps the directory: write it first with
  cargo run -p ember-bench --example edit_prompts -- $model DIR)
EOF
