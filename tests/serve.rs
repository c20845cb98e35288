//! `ember serve` end to end: the built binary on a free loopback port with SmolLM2, driven over
//! HTTP as a client would (ureq, and raw TCP where a client misbehaves).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running `ember serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// `ember serve` on SmolLM2 with `extra` flags, on a port the OS picks; waits until it
    /// listens.
    fn start(extra: &[&str]) -> Server {
        Server::start_env(extra, &[])
    }

    /// [`Server::start`] with environment variables set for the server.
    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let model = common::real_model(common::SMOLLM2);
        let mut cmd = common::ember();
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--port", "0", "--backend", "cpu", "-m"])
            .arg(&model)
            .args(extra)
            .env("EMBER_WGPU_BACKENDS", "none")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ember serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!("ember serve did not start:\n{}", stderr.lock().unwrap());
            }
        };
        Server {
            child,
            base,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// POST JSON; the status and the body as JSON (errors included).
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_with(path, body, None)
    }

    fn post_with(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        let mut req = ureq::post(&self.url(path));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        reply(req.send_json(body.clone()))
    }

    fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    fn metrics(&self) -> Metrics {
        let (s, text) = self.get("/metrics");
        assert_eq!(s, 200);
        Metrics::parse(&text)
    }

    /// SIGTERM, then the exit status and everything it printed on stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let st = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        // The reader thread sees EOF once the process is gone.
        std::thread::sleep(Duration::from_millis(200));
        let log = self.stderr.lock().unwrap().clone();
        (status, log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, t: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < t, "the server did not exit within {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => {
            let text = r.into_string().unwrap();
            let v = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("error body is not JSON: {text:?}"));
            (s, v)
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

/// `/metrics`, parsed: every sample line is `name{labels} value` with a number.
struct Metrics(Vec<(String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut v = vec![];
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            v.push((name.to_string(), value));
        }
        Metrics(v)
    }
    /// The sample whose name (with labels) starts with `prefix`.
    fn get(&self, prefix: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .unwrap_or_else(|| panic!("no metric {prefix}"))
            .1
    }
}

/// An SSE stream's `data:` payloads, read as they arrive.
struct Sse(BufReader<Box<dyn Read + Send + Sync>>);

impl Sse {
    fn open(s: &Server, path: &str, body: &Value) -> Sse {
        let r = ureq::post(&s.url(path))
            .send_json(body.clone())
            .expect("stream request");
        assert_eq!(r.status(), 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        Sse(BufReader::new(r.into_reader()))
    }
    fn next(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.0.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
            assert!(line.trim().is_empty(), "not SSE: {line:?}");
        }
    }
    fn all(mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

const PROMPT: &str = "The capital of France is";

#[test]
fn completions_match_ember_run_and_tokenize_roundtrips() {
    let s = Server::start(&["--no-db"]);
    let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": PROMPT, "max_tokens": 12,
                      "temperature": 0, "ignore_eos": true});
    let (st, r) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 12);
    let text = r["choices"][0]["text"].as_str().unwrap().to_string();
    // The same greedy decode as `ember run`.
    let out = common::ember()
        .args([
            "run",
            "--backend",
            "cpu",
            "--temp",
            "0",
            "-n",
            "12",
            "--ignore-eos",
            "-p",
            PROMPT,
            "-m",
        ])
        .arg(common::real_model(common::SMOLLM2))
        .env("EMBER_WGPU_BACKENDS", "none")
        .output()
        .unwrap();
    assert!(out.status.success());
    // `ember run` ends its output with a newline.
    let run = String::from_utf8(out.stdout).unwrap();
    assert_eq!(Some(text.as_str()), run.strip_suffix('\n'));

    // /tokenize as llama-server (with BOS as a completion prompt gets it), then the ids as the
    // prompt: the same answer; /detokenize gives the text back.
    let (st, t) = s.post(
        "/tokenize",
        &json!({"content": PROMPT, "add_special": true}),
    );
    assert_eq!(st, 200, "{t}");
    let ids = t["tokens"].as_array().unwrap().clone();
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());
    let (_, r2) = s.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r2["choices"][0]["text"], text.as_str());
    // The second request's whole-block prefix came from the prefix cache.
    assert!(r2["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    let (_, p) = s.post(
        "/tokenize",
        &json!({"content": "Paris", "with_pieces": true}),
    );
    assert!(
        p["tokens"][0]["id"].is_u64() && p["tokens"][0]["piece"].is_string(),
        "{p}"
    );
    let (st, d) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(st, 200);
    assert!(d["content"].as_str().unwrap().ends_with(PROMPT), "{d}");

    // Echo and logprobs: greedy tokens are their position's top entry, with its logprob.
    let (st, r3) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
        "ignore_eos": true, "logprobs": 2, "echo": true}),
    );
    assert_eq!(st, 200, "{r3}");
    let c = &r3["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with(PROMPT));
    let lp = &c["logprobs"];
    let n = ids.len() + 3;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{lp}");
    assert!(lp["token_logprobs"][0].is_null());
    for i in ids.len()..n {
        let tok = lp["tokens"][i].as_str().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 2);
        let best = top
            .iter()
            .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
            .unwrap();
        assert_eq!(best.0, tok);
        assert!(
            (best.1.as_f64().unwrap() - lp["token_logprobs"][i].as_f64().unwrap()).abs() < 1e-4
        );
    }
}

#[test]
fn chat_whole_and_streamed_agree_and_stream_ends_with_usage_then_done() {
    let s = Server::start(&["--no-db"]);
    let msgs = json!([{"role": "system", "content": "You are brief."},
                      {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]);
    let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": msgs, "max_tokens": 16,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (st, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    let m = &r["choices"][0]["message"];
    assert_eq!(m["role"], "assistant");
    let content = m["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    let u = &r["usage"];
    let n_out = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=16).contains(&n_out));
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + n_out
    );
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len() as u64, n_out);
    for e in lp {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
        assert_eq!(
            e["top_logprobs"][0]["token"], e["token"],
            "greedy picks the top entry"
        );
    }

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    sbody.as_object_mut().unwrap().remove("logprobs");
    sbody.as_object_mut().unwrap().remove("top_logprobs");
    let events = Sse::open(&s, "/v1/chat/completions", &sbody).all();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], n_out);
    let body_chunks = &chunks[..chunks.len() - 1];
    let mut text = String::new();
    for c in body_chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["usage"].is_null(), "usage only on the last chunk");
        text += c["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    }
    assert_eq!(text, content);
    assert_eq!(
        body_chunks.last().unwrap()["choices"][0]["finish_reason"],
        r["choices"][0]["finish_reason"]
    );

    // Streamed logprobs: one entry per token, the same as the whole answer's.
    let mut lbody = body.clone();
    lbody["stream"] = json!(true);
    let events = Sse::open(&s, "/v1/chat/completions", &lbody).all();
    let streamed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, lp);

    // Completions stream too; without include_usage there is no usage chunk.
    let events = Sse::open(
        &s,
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 5,
        "temperature": 0, "ignore_eos": true, "stream": true}),
    )
    .all();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none())
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(chunks.len() >= 2);
}

#[test]
fn models_health_and_metrics() {
    let s = Server::start(&["--no-db", "--model-name", "smol"]);
    let (st, h) = s.get("/health");
    assert_eq!((st, h.as_str()), (200, r#"{"status":"ok"}"#));
    let (st, m) = s.get("/v1/models");
    assert_eq!(st, 200);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "smol");
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"model": "smol", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    let (_, text) = s.get("/metrics");
    let m = Metrics::parse(&text);
    assert_eq!(m.get("ember_generation_tokens_total"), 4.0);
    assert_eq!(m.get("ember_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(m.get("ember_inter_token_latency_seconds_count"), 3.0);
    assert_eq!(m.get("ember_e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(
        m.get("ember_requests_total{model_name=\"smol\",finish_reason=\"length\""),
        1.0
    );
    assert!(m.get("ember_prompt_tokens_total") > 0.0);
    assert!(m.get("ember_kv_blocks{") > 0.0);
    assert_eq!(m.get("ember_requests_running"), 0.0);
    assert_eq!(m.get("ember_kv_blocks_used"), 0.0);
    let hit = m.get("ember_prefix_cache_hits_total");
    // The same prompt again: its whole blocks come from the prefix cache.
    s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT.repeat(8), "max_tokens": 1}),
    );
    s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT.repeat(8), "max_tokens": 1}),
    );
    assert!(s.metrics().get("ember_prefix_cache_hits_total") > hit);
    // promtool (Debian's prometheus package) is the reference parser when it is installed.
    if let Ok(mut p) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: /metrics checked by the parser above only");
    }
}

/// Raw HTTP/1.1 on a socket: the status line's code and the body.
fn raw(addr: &str, head: &str, body: &[u8]) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before it has read everything: that is the point.
    let _ = c.write_all(body);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    (code, text)
}

fn assert_error(st: u16, r: &Value, want: u16, param: Option<&str>, code: Option<&str>) {
    assert_eq!(st, want, "{r}");
    let e = &r["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    assert!(e["type"].is_string(), "{r}");
    assert!(
        e.as_object().unwrap().contains_key("param") && e.as_object().unwrap().contains_key("code"),
        "{r}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{r}");
    }
    if let Some(c) = code {
        assert_eq!(e["code"], c, "{r}");
    }
}

#[test]
fn bad_input_gets_the_right_status_and_an_openai_error() {
    let s = Server::start(&[
        "--no-db",
        "--ctx",
        "256",
        "--max-body-kib",
        "64",
        "--body-timeout",
        "2",
    ]);
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        s.post("/v1/chat/completions", &b)
    };
    let (st, r) = chat(json!({"temperature": "hot"}));
    assert_error(st, &r, 400, Some("temperature"), None);
    let (st, r) = chat(json!({"max_tokens": -1}));
    assert_error(st, &r, 400, Some("max_tokens"), None);
    let (st, r) = chat(json!({"max_tokens": 1000}));
    assert_error(
        st,
        &r,
        400,
        Some("max_tokens"),
        Some("context_length_exceeded"),
    );
    let (st, r) = chat(json!({"n": 2}));
    assert_error(st, &r, 400, Some("n"), None);
    let (st, r) = chat(json!({"model": "gpt-4o"}));
    assert_error(st, &r, 404, Some("model"), Some("model_not_found"));
    let (st, r) = chat(json!({"frequency_penalty": 0.5}));
    assert_error(st, &r, 400, Some("frequency_penalty"), None);
    let (st, r) = chat(json!({"messages": "hi"}));
    assert_error(st, &r, 400, Some("messages"), None);
    let (st, r) = chat(json!({"stream": "yes"}));
    assert_error(st, &r, 400, Some("stream"), None);
    let (st, r) = chat(json!({"logprobs": true, "top_logprobs": 50}));
    assert_error(st, &r, 400, Some("top_logprobs"), None);
    let (st, r) = chat(json!({"messages": []}));
    assert_error(st, &r, 400, Some("messages"), None);
    let (st, r) = s.post("/v1/completions", &json!({"prompt": [1, 2, 99999999]}));
    assert_error(st, &r, 400, Some("prompt"), None);
    // A prompt that can never fit the context: refused at once, not queued.
    let (st, r) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT.repeat(100), "max_tokens": 1}),
    );
    assert_error(st, &r, 400, Some("prompt"), Some("context_length_exceeded"));
    // Malformed JSON and a body that is not an object.
    let (st, r) = reply(
        ureq::post(&s.url("/v1/chat/completions"))
            .set("Content-Type", "application/json")
            .send_string("{\"messages\": [}"),
    );
    assert_error(st, &r, 400, None, Some("invalid_json"));
    let (st, r) = reply(ureq::post(&s.url("/v1/completions")).send_string("[1, 2]"));
    assert_error(st, &r, 400, None, Some("invalid_json"));
    // Routes and methods that do not exist.
    let (st, r) = reply(ureq::get(&s.url("/v1/nothing")).call());
    assert_error(st, &r, 404, None, None);
    let (st, r) = reply(ureq::get(&s.url("/v1/chat/completions")).call());
    assert_error(st, &r, 405, None, None);

    // A 100 MB body, declared: 413 before it is read. Then one too large without a length.
    let (st, text) = raw(
        &s.addr(),
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\nConnection: close\r\n\r\n",
        &[],
    );
    assert_eq!(st, 413, "{text}");
    assert!(text.contains("\"body_too_large\""), "{text}");
    let big = vec![b' '; 100 << 10];
    let chunked = format!("{:x}\r\n", big.len());
    let mut body = chunked.into_bytes();
    body.extend_from_slice(&big);
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    let (st, text) = raw(
        &s.addr(),
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        &body,
    );
    assert_eq!(st, 413, "{text}");

    // A body sent a byte at a time: 408 after --body-timeout, while others are served.
    let addr = s.addr();
    let slow = std::thread::spawn(move || {
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..40 {
            // Read first: once the answer is there, stop sending (bytes the server never reads
            // would make its close a reset).
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(_) => {}
            }
            if c.write_all(b" ").is_err() {
                break;
            }
        }
        String::from_utf8_lossy(&out).to_string()
    });
    let (st, r) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{r}");
    let text = slow.join().unwrap();
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains("\"timeout\""), "{text}");
    // Headers that never end: the connection is closed after --body-timeout (hyper's header
    // read timeout), not held.
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut out = Vec::new();
    let r = c.read_to_end(&mut out);
    assert!(
        r.is_ok() || out.starts_with(b"HTTP/1.1 408"),
        "the connection was held: {r:?}"
    );
    // Still serving.
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn api_key_and_queue_bound() {
    let s = Server::start(&["--no-db", "--api-key", "sekret", "--max-queue", "1"]);
    let body = json!({"prompt": PROMPT, "max_tokens": 2});
    let (st, r) = s.post("/v1/completions", &body);
    assert_error(st, &r, 401, None, Some("invalid_api_key"));
    let (st, r) = s.post_with("/v1/completions", &body, Some("wrong"));
    assert_error(st, &r, 401, None, Some("invalid_api_key"));
    let (st, _) = s.get("/v1/models");
    assert_eq!(st, 401);
    assert_eq!(s.get("/health").0, 200, "health needs no key");
    let (st, r) = s.post_with("/v1/completions", &body, Some("sekret"));
    assert_eq!(st, 200, "{r}");

    // One request in flight fills a queue of one: the next gets 429 with Retry-After.
    let r = ureq::post(&s.url("/v1/completions"))
        .set("Authorization", "Bearer sekret")
        .send_json(
            json!({"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": true, "stream": true}),
        )
        .unwrap();
    let mut sse = Sse(BufReader::new(r.into_reader()));
    assert!(sse.next().is_some());
    match ureq::post(&s.url("/v1/completions"))
        .set("Authorization", "Bearer sekret")
        .send_json(body.clone())
    {
        Err(ureq::Error::Status(429, resp)) => {
            assert_eq!(resp.header("retry-after"), Some("1"));
            let v: Value = resp.into_json().unwrap();
            assert_eq!(v["error"]["code"], "queue_full");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    drop(sse);
}

/// Polls `/metrics` until `done` holds (or panics after `t`).
fn wait_metrics(s: &Server, t: Duration, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let start = Instant::now();
    loop {
        let m = s.metrics();
        if done(&m) {
            return m;
        }
        assert!(start.elapsed() < t, "metrics never settled: {:?}", m.0);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn store_rows(db: &Path) -> Vec<(String, String, i64, i64, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare(
            "SELECT r.finish_reason, r.tags, r.output_tokens, r.tokens_stored, w.name || '/' || u.status
             FROM requests r JOIN runs u ON u.run_id = r.run_id JOIN workloads w ON w.workload_id = u.workload_id
             ORDER BY r.request_id",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-serve-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("serve.db")
}

#[test]
fn a_client_that_disconnects_mid_stream_is_cancelled_and_its_kv_freed() {
    let db = temp_db("disconnect");
    let s = Server::start(&["--db", db.to_str().unwrap()]);
    let mut sse = Sse::open(
        &s,
        "/v1/chat/completions",
        &json!({
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500, "ignore_eos": true, "stream": true}),
    );
    for _ in 0..4 {
        assert!(sse.next().is_some());
    }
    let m = s.metrics();
    assert_eq!(m.get("ember_requests_running"), 1.0);
    assert!(m.get("ember_kv_blocks_used") > 0.0);
    drop(sse);
    let m = wait_metrics(&s, Duration::from_secs(60), |m| {
        m.get("ember_requests_running") == 0.0 && m.get("ember_kv_blocks_used") == 0.0
    });
    assert_eq!(m.get("ember_requests_total{model_name=\"SmolLM2-135M-Instruct.Q4_1\",finish_reason=\"cancelled\""), 1.0);
    assert!(m.get("ember_generation_tokens_total") < 1500.0);
    // A client that gives up on a whole (non-streamed) answer is cancelled too.
    let body = json!({"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": true}).to_string();
    let mut c = TcpStream::connect(s.addr()).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_metrics(&s, Duration::from_secs(60), |m| {
        m.get("ember_requests_running") == 1.0 && m.get("ember_generation_tokens_total") > 0.0
    });
    drop(c);
    let m = wait_metrics(&s, Duration::from_secs(60), |m| {
        m.get("ember_requests_running") == 0.0 && m.get("ember_kv_blocks_used") == 0.0
    });
    assert_eq!(m.get("ember_requests_total{model_name=\"SmolLM2-135M-Instruct.Q4_1\",finish_reason=\"cancelled\""), 2.0);
    // Still serving, and the cancelled requests are in the store as such.
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 2}),
    );
    assert_eq!(st, 200);
    let (status, log) = s.terminate();
    assert!(status.success(), "{log}");
    let rows = store_rows(&db);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0].0, "cancelled");
    assert_eq!(rows[0].1, r#"["chat"]"#);
    assert_eq!(rows[1].0, "cancelled");
    assert_eq!(rows[1].1, r#"["completions"]"#);
    assert_eq!(rows[2].0, "length");
}

#[test]
fn sigterm_drains_in_flight_requests_and_every_request_is_stored() {
    let db = temp_db("drain");
    let s = Server::start(&["--db", db.to_str().unwrap()]);
    let (st, _) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
    );
    assert_eq!(st, 200);
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 7, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    // A stream in flight when SIGTERM comes finishes whole.
    let mut sse = Sse::open(
        &s,
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 60,
        "ignore_eos": true, "stream": true}),
    );
    assert!(sse.next().is_some());
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let rest = sse.all();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let (status, log) = s.terminate_after_signal();
    assert!(status.success(), "exit {status:?}: {log}");
    assert!(log.contains("3 request(s) saved"), "{log}");
    let rows = store_rows(&db);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.4 == "serve/finished"), "{rows:?}");
    assert_eq!((rows[1].0.as_str(), rows[1].2, rows[1].3), ("length", 7, 7));
    assert_eq!((rows[2].0.as_str(), rows[2].2), ("length", 60));
    assert_eq!(rows[2].1, r#"["completions"]"#);
}

#[test]
fn serve_records_the_power_it_draws() {
    // The Jetson test tree: its module rail reads a constant 5.072 V × 1.464 A.
    let root = common::fixture("sysfs").join("jetson-orin");
    let db = temp_db("power");
    let s = Server::start_env(
        &["--db", db.to_str().unwrap()],
        &[
            ("EMBER_SYSFS_ROOT", root.to_str().unwrap()),
            ("EMBER_NVML_LIB", "/nonexistent/libnvidia-ml.so.1"),
            ("EMBER_VCGENCMD", "/nonexistent/vcgencmd"),
        ],
    );
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 8, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (status, log) = s.terminate_after_signal();
    assert!(status.success(), "exit {status:?}: {log}");
    assert!(log.contains("power: reading ina3221 VDD_IN"), "{log}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (source, err): (Option<String>, Option<String>) = conn
        .query_row("SELECT power_source, power_error FROM runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((source.as_deref(), err), (Some("ina3221 VDD_IN"), None));
    let (n, w): (i64, f64) = conn
        .query_row(
            "SELECT COUNT(power_w), AVG(power_w) FROM memory_samples",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        n >= 2 && (w - 5.072 * 1.464).abs() < 1e-9,
        "{n} readings, {w} W"
    );
    let energy: f64 = conn
        .query_row(
            "SELECT value FROM run_metrics WHERE metric = 'energy_j'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let window: f64 = conn
        .query_row(
            "SELECT (MAX(finish_ns) - MIN(arrival_ns)) / 1e9 FROM requests WHERE warmup = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let want = 5.072 * 1.464 * window;
    assert!(
        (energy - want).abs() < 1e-6 * want,
        "{energy} J vs {want} J"
    );
}

impl Server {
    /// Wait for the exit a signal already asked for.
    fn terminate_after_signal(mut self) -> (std::process::ExitStatus, String) {
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
        let log = self.stderr.lock().unwrap().clone();
        (status, log)
    }
}

/// The official `openai` Python package streams and completes against the server. It runs
/// where a Python with `openai` is named by `EMBER_TEST_PYTHON` (`.ci/run` makes one).
#[test]
fn openai_python_client() {
    let Some(py) = std::env::var_os("EMBER_TEST_PYTHON") else {
        eprintln!("EMBER_TEST_PYTHON is not set: the openai client check did not run");
        return;
    };
    let s = Server::start(&["--no-db", "--api-key", "sekret"]);
    let out = std::process::Command::new(py)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py"))
        .arg(s.url("/v1"))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}

/// `ember bench` with `args`, then the run it wrote with `--out`.
fn bench_run(args: &[&str], out: &Path) -> Value {
    let o = common::ember()
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .env("EMBER_WGPU_BACKENDS", "none")
        .output()
        .expect("run ember bench");
    assert!(
        o.status.success(),
        "ember bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    v["run"].clone()
}

/// `ember bench --url` against `ember serve` measures what in-process `ember bench` measures:
/// the same workload (hash) and, greedy and one request at a time, the same text per request;
/// the run is stored as an HTTP run with the server's token counts.
#[test]
fn bench_url_against_ember_serve_runs_the_in_process_workload() {
    let s = Server::start(&["--no-db"]);
    let model = common::real_model(common::SMOLLM2);
    let model = model.to_str().unwrap();
    let db = temp_db("bench-url");
    let dir = db.parent().unwrap().to_path_buf();
    let base = format!("{}/v1", s.base);
    let same = [
        "-m",
        model,
        "-n",
        "4",
        "--max-tokens",
        "12",
        "--warmup",
        "1",
    ];
    let http = bench_run(
        &[
            &["--url", base.as_str(), "--db", db.to_str().unwrap()][..],
            &same[..],
        ]
        .concat(),
        &dir.join("http.json"),
    );
    let local = bench_run(
        &[&["--backend", "cpu", "--no-db"][..], &same[..]].concat(),
        &dir.join("local.json"),
    );
    assert_eq!(http["workload"]["hash"], local["workload"]["hash"]);
    let p = &http["provenance"];
    assert_eq!(p["transport"], "http");
    assert_eq!(p["endpoint"], base.as_str());
    assert!(
        p["server_version"].as_str().unwrap().contains("ember"),
        "{p}"
    );
    assert_eq!(local["provenance"]["transport"], "in-process");
    // The client's RSS says nothing about the server: no memory samples over HTTP.
    assert!(http["memory"].as_array().unwrap().is_empty());
    assert!(!local["memory"].as_array().unwrap().is_empty());
    let (hr, lr) = (
        http["records"].as_array().unwrap(),
        local["records"].as_array().unwrap(),
    );
    assert_eq!(hr.len(), 5);
    assert_eq!(hr.len(), lr.len());
    for (h, l) in hr.iter().zip(lr) {
        assert_eq!(h["request_id"], l["request_id"]);
        assert_eq!(h["finish_reason"], l["finish_reason"], "{h}");
        assert_eq!(h["output_text"], l["output_text"]);
        let stamps = h["token_ns"].as_array().unwrap().len();
        assert_eq!(stamps, l["token_ns"].as_array().unwrap().len());
        // ember serve streams a token per chunk, and says so in its usage.
        assert_eq!(h["counted"]["output_tokens"], stamps);
        assert_eq!(h["counted"]["local_output_tokens"], stamps);
        assert_eq!(h["counted"]["prompt_tokens"], l["prompt_tokens"]);
    }
    let c = rusqlite::Connection::open(&db).unwrap();
    let (transport, endpoint): (String, String) = c
        .query_row("SELECT transport, endpoint FROM runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(
        (transport.as_str(), endpoint.as_str()),
        ("http", base.as_str())
    );
    let (n, counted): (i64, i64) = c
        .query_row(
            "SELECT count(*), sum(server_output_tokens = output_tokens AND chunks = output_tokens) FROM requests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((n, counted), (5, 5));
}
