"""Load check for `ember serve` (issue 16), standard library only; not run by cargo test.

    ember serve -m models/cache/SmolLM2-135M-Instruct.Q4_1.gguf --port 18090 --db load.db &
    python3 tests/serve_load.py 127.0.0.1 18090 $!

32 concurrent streaming chat clients, 10 requests each (32 tokens, ignore_eos): prints errors,
wall time, RSS after the first 32 requests and at the end; then 32 clients that disconnect
after 3 chunks, and the running/waiting/KV-block gauges and cancelled count once settled.
"""
import http.client, json, sys, threading, time, re
host, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1]) * 1024
def metrics():
    c = http.client.HTTPConnection(host, port); c.request("GET", "/metrics"); t = c.getresponse().read().decode()
    out = {}
    for l in t.splitlines():
        if l.startswith("#") or not l: continue
        k, v = l.rsplit(" ", 1); out[k] = float(v)
    return out
def g(m, prefix): return [v for k, v in m.items() if k.startswith(prefix)][0]
lock = threading.Lock(); done = [0]; errors = []; rss_after_32 = [None]; chunks = [0]
def stream(i, j, disconnect_after=None):
    body = json.dumps({"messages": [{"role": "user", "content": f"Tell me about number {i*10+j}."}],
                       "max_tokens": 32, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection(host, port, timeout=300)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200: raise RuntimeError(f"status {r.status}: {r.read()[:200]}")
    n = 0; usage = None; last = None
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: "): continue
        d = line[6:]; last = d
        if d == "[DONE]": break
        n += 1
        obj = json.loads(d)
        if obj.get("usage"): usage = obj["usage"]
        if disconnect_after and n >= disconnect_after:
            c.sock.close(); c.close(); return
    if last != "[DONE]" or not usage or usage["completion_tokens"] != 32: raise RuntimeError(f"bad stream end {last} {usage}")
    with lock: chunks[0] += n
def client(i):
    for j in range(10):
        try: stream(i, j)
        except Exception as e:
            with lock: errors.append(repr(e))
        with lock:
            done[0] += 1
            if done[0] == 32: rss_after_32[0] = rss()
t0 = time.time()
ts = [threading.Thread(target=client, args=(i,)) for i in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.time() - t0
r_end = rss()
print(f"load: 32 clients x 10 streaming requests: {done[0]} done, {len(errors)} errors, {el:.1f} s, {chunks[0]} chunks")
if errors: print(errors[:3])
print(f"RSS after the first 32: {rss_after_32[0]/2**20:.1f} MiB, at the end: {r_end/2**20:.1f} MiB, ratio {r_end/rss_after_32[0]:.3f}")
m = metrics()
print("after load: running", g(m, "ember_requests_running"), "kv_blocks_used", g(m, "ember_kv_blocks_used"), "requests", sum(v for k, v in m.items() if k.startswith("ember_requests_total")))
# 32 clients that disconnect mid-stream.
ts = [threading.Thread(target=stream, args=(100 + i, 0, 3)) for i in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
for _ in range(100):
    m = metrics()
    if g(m, "ember_requests_running") == 0 and g(m, "ember_kv_blocks_used") == 0 and g(m, "ember_requests_waiting") == 0: break
    time.sleep(0.1)
print("after 32 disconnects: running", g(m, "ember_requests_running"), "waiting", g(m, "ember_requests_waiting"), "kv_blocks_used", g(m, "ember_kv_blocks_used"),
      "cancelled", [v for k, v in m.items() if 'cancelled' in k][0])
