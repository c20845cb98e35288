#!/usr/bin/env bash
# ember over HTTP, measured side by side in one run, on loopback:
#   1. overhead: `ember bench --url` against `ember serve` vs `ember bench` in-process, same
#      workload, alternating rounds; the ratios of TTFT p50 and ITL p50;
#   2. ember serve vs llama.cpp's llama-server on the same GGUF, the same workload at
#      concurrency 1, 4 and 8, both measured by `ember bench --url`: output tokens/s, TTFT p50 and
#      p99, ITL p50, as ratios; with llama-server's own timings (its /metrics) next to ember's
#      client-side figures.
#
# Usage: bench/compare-servers.sh MODEL.gguf [LLAMA_SERVER] [EMBER]
#   LLAMA_SERVER: a llama-server binary (built from the llama-cpp-python source archive as for
#   llama-bench: cmake -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON, target llama-server);
#   without it only part 1 runs. EMBER: default target/release/ember.
# Env: ROUNDS (default 3), N (requests per run, default 24), WORKLOAD (default chat),
#      MAX_TOKENS (default 64), THREADS (default: all cores).
set -euo pipefail
model=${1:?usage: $0 MODEL.gguf [LLAMA_SERVER] [EMBER]}
llama=${2:-}
ember=${3:-target/release/ember}
rounds=${ROUNDS:-3}
n=${N:-24}
workload=${WORKLOAD:-chat}
max_tokens=${MAX_TOKENS:-64}
threads=${THREADS:-$(nproc)}
out=$(mktemp -d /tmp/ember-compare-XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { # url
  for _ in $(seq 1 600); do curl -fs "$1/models" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "compare-servers: $1 did not come up" >&2; exit 1
}
# bench OUT.json ARGS...: one `ember bench` run, its JSON summary kept.
bench() {
  local f=$1; shift
  "$ember" bench -m "$model" -w "$workload" -n "$n" --max-tokens "$max_tokens" --warmup 2 \
    --no-db --json "$@" > "$f" 2> "$f.err" || { cat "$f.err" >&2; exit 1; }
}
fig() { # FILE KEY -> summary figure
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["summary"]; k=sys.argv[2].split(".")
v=s
for p in k: v=v[p]
print(v)' "$1" "$2"
}
ratio() { python3 -c 'import sys,statistics as st; a=[float(x) for x in sys.argv[1].split()]; b=[float(x) for x in sys.argv[2].split()]; print("%.3f" % (st.median(a)/st.median(b)))' "$1" "$2"; }
med() { python3 -c 'import sys,statistics as st; print("%.3f" % st.median(float(x) for x in sys.argv[1].split()))' "$1"; }

echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') · $(nproc) cores · threads $threads"
echo "model: $model · workload $workload · $n requests · max_tokens $max_tokens · $rounds rounds"
ep=$(free_port)
"$ember" serve -m "$model" --port "$ep" --no-db -t "$threads" --backend cpu > "$out/serve.log" 2>&1 &
pids+=($!)
wait_up "http://127.0.0.1:$ep/v1"

echo
echo "## 1. ember bench --url against ember serve vs ember bench in-process (sync)"
t_in=""; t_http=""; i_in=""; i_http=""
for r in $(seq 1 "$rounds"); do
  # A fresh seed per round (the same on both sides): no prompt is cached from an earlier round.
  bench "$out/in.$r.json" --seed "$r" --backend cpu -t "$threads"
  bench "$out/http.$r.json" --seed "$r" --url "http://127.0.0.1:$ep/v1"
  t_in+=" $(fig "$out/in.$r.json" ttft_ms.p50)"; t_http+=" $(fig "$out/http.$r.json" ttft_ms.p50)"
  i_in+=" $(fig "$out/in.$r.json" itl_ms.p50)"; i_http+=" $(fig "$out/http.$r.json" itl_ms.p50)"
done
echo "| figure (median of $rounds rounds) | in-process | --url → ember serve | ratio |"
echo "| --- | ---: | ---: | ---: |"
echo "| TTFT p50 ms | $(med "$t_in") | $(med "$t_http") | $(ratio "$t_http" "$t_in") |"
echo "| ITL p50 ms | $(med "$i_in") | $(med "$i_http") | $(ratio "$i_http" "$i_in") |"

[ -n "$llama" ] || exit 0
lp=$(free_port)
# As many slots as the highest concurrency, each with the context ember serve gives a request.
"$llama" -m "$model" --host 127.0.0.1 --port "$lp" -t "$threads" -tb "$threads" -np 8 -c 32768 \
  --metrics --no-webui > "$out/llama-server.log" 2>&1 &
pids+=($!)
wait_up "http://127.0.0.1:$lp/v1"
lmetric() { curl -fs "http://127.0.0.1:$lp/metrics" | awk -v k="llamacpp:$1" '$1==k {print $2}'; }

echo
echo "## 2. ember serve vs llama-server, both measured by ember bench --url (completions API)"
echo "| c | ember out tok/s | llama out tok/s | ratio | ember TTFT p50/p99 ms | llama TTFT p50/p99 ms | p99 ratio | ember ITL p50 | llama ITL p50 | llama-server's own: prompt ms/req, ms/token |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
for c in 1 4 8; do
  eo=""; lo=""; et5=""; lt5=""; et9=""; lt9=""; ei=""; li=""; own=""
  for r in $(seq 1 "$rounds"); do
    bench "$out/e.$c.$r.json" --seed "$((100 * c + r))" --url "http://127.0.0.1:$ep/v1" -c "$c"
    ps0=$(lmetric prompt_seconds_total); pt0=$(lmetric prompt_tokens_total)
    ds0=$(lmetric tokens_predicted_seconds_total); dt0=$(lmetric tokens_predicted_total)
    bench "$out/l.$c.$r.json" --seed "$((100 * c + r))" --url "http://127.0.0.1:$lp/v1" -c "$c"
    ps1=$(lmetric prompt_seconds_total); ds1=$(lmetric tokens_predicted_seconds_total)
    dt1=$(lmetric tokens_predicted_total)
    own=$(python3 -c "import sys; ps,ds,dt=float(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print('%.2f, %.3f' % (ps*1000/($n+2), ds*1000/dt if dt else 0))" \
      "$(python3 -c "print($ps1-$ps0)")" "$(python3 -c "print($ds1-$ds0)")" "$(python3 -c "print($dt1-$dt0)")")
    eo+=" $(fig "$out/e.$c.$r.json" output_tps)"; lo+=" $(fig "$out/l.$c.$r.json" output_tps)"
    et5+=" $(fig "$out/e.$c.$r.json" ttft_ms.p50)"; lt5+=" $(fig "$out/l.$c.$r.json" ttft_ms.p50)"
    et9+=" $(fig "$out/e.$c.$r.json" ttft_ms.p99)"; lt9+=" $(fig "$out/l.$c.$r.json" ttft_ms.p99)"
    ei+=" $(fig "$out/e.$c.$r.json" itl_ms.p50)"; li+=" $(fig "$out/l.$c.$r.json" itl_ms.p50)"
  done
  echo "| $c | $(med "$eo") | $(med "$lo") | $(ratio "$eo" "$lo") | $(med "$et5") / $(med "$et9") | $(med "$lt5") / $(med "$lt9") | $(ratio "$et9" "$lt9") | $(med "$ei") | $(med "$li") | $own |"
done
echo
echo "(runs in $out; ratio = ember / other, medians over rounds; llama-server's own figures are the last round's)"
