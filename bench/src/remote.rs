//! `ember bench --url`: a [`Server`] that sends the harness's requests to any OpenAI-compatible
//! endpoint (vLLM, SGLang, TGI, llama-server, Ollama, `ember serve`) and turns the streamed
//! replies into the same events an in-process engine emits.
//!
//! Each request runs on a thread of its own with a blocking streaming client (`ureq`); every
//! received server-sent event is stamped on the monotonic clock the moment its line is read, and
//! becomes a [`ServeEvent::Chunk`] when it carries output text. A chunk may carry several tokens:
//! the client never spreads them, it records the chunk's one timestamp and counts tokens apart,
//! by the server's `usage` and, when a tokenizer is given, by tokenizing the output text
//! ([`ServeEvent::Usage`]). The harness's figures are then per chunk where the two differ
//! (`docs/METRICS.md`, Transport).

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use ember_runtime::sample::SamplerConfig;
use ember_runtime::serve::{FinishKind, RequestId, ServeEvent, ServeRequest, Server, ServerStats};
use ember_runtime::tokenizer::Tokenizer;

/// Which OpenAI endpoint the requests go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `POST /completions`: the prompt as token ids (exactly the in-process prompt) when the
    /// workload's tokenizer is the server model's, else as text.
    Completions,
    /// `POST /chat/completions`: the prompt text as one user message (the server applies its
    /// chat template, so its prompt token count is its own: see `usage`).
    Chat,
}

impl Api {
    pub fn parse(s: &str) -> Result<Api, String> {
        match s {
            "completions" => Ok(Api::Completions),
            "chat" => Ok(Api::Chat),
            _ => Err(format!(
                "unknown --api '{s}': expected 'completions' or 'chat'"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Api::Completions => "completions",
            Api::Chat => "chat",
        }
    }
    fn path(self) -> &'static str {
        match self {
            Api::Completions => "completions",
            Api::Chat => "chat/completions",
        }
    }
}

/// What goes wrong before a remote run starts.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("--url must start with http:// or https://, got '{0}'")]
    Scheme(String),
    #[error("--url must not carry credentials (user:password@); pass the key with --api-key")]
    Credentials,
    #[error("GET {url}: {reason}")]
    Models { url: String, reason: String },
    #[error("the server at {url} lists no models; name one with --served-model-name")]
    NoModels { url: String },
    #[error("the server does not list the model '{model}' (it lists: {listed})")]
    UnknownModel { model: String, listed: String },
}

/// An OpenAI-compatible endpoint, checked and described (`GET /models`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Base URL up to and including `/v1`, without a trailing slash.
    pub base: String,
    pub api: Api,
    /// The model id sent in every request.
    pub model: String,
    pub api_key: Option<String>,
    /// The server's `Server` response header, if it sends one (e.g. `llama.cpp`, `uvicorn`).
    pub server_header: String,
    /// `owned_by` of the model in `GET /models` (e.g. `vllm`, `llamacpp`, `ember`).
    pub owned_by: String,
    /// Send the prompt as token ids (completions API and the server model's tokenizer).
    pub send_token_ids: bool,
    /// Time to wait for any byte of a reply before the request fails.
    pub read_timeout: Duration,
}

impl Endpoint {
    /// Checks `url` and asks the server for its models (the first is used unless `model` names
    /// one).
    pub fn connect(
        url: &str,
        api: Api,
        model: Option<String>,
        api_key: Option<String>,
        send_token_ids: bool,
        read_timeout: Duration,
    ) -> Result<Endpoint, RemoteError> {
        let base = url.trim_end_matches('/').to_string();
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .ok_or_else(|| RemoteError::Scheme(url.to_string()))?;
        if rest
            .split('/')
            .next()
            .is_some_and(|host| host.contains('@'))
        {
            return Err(RemoteError::Credentials);
        }
        let agent = agent(Duration::from_secs(30));
        let models_url = format!("{base}/models");
        let mut req = agent.get(&models_url);
        if let Some(k) = &api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let fail = |reason: String| RemoteError::Models {
            url: models_url.clone(),
            reason,
        };
        let resp = req.call().map_err(|e| fail(describe_error(e)))?;
        let server_header = resp.header("server").unwrap_or_default().to_string();
        let body: Value = resp
            .into_json()
            .map_err(|e| fail(format!("not JSON: {e}")))?;
        let listed: Vec<(String, String)> = body["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        let id = m["id"].as_str()?.to_string();
                        Some((id, m["owned_by"].as_str().unwrap_or_default().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (model, owned_by) = match model {
            Some(m) => match listed.iter().find(|(id, _)| *id == m) {
                Some((_, owner)) => (m, owner.clone()),
                // Some servers list nothing (or an alias); trust the name then.
                None if listed.is_empty() => (m, String::new()),
                None => {
                    return Err(RemoteError::UnknownModel {
                        model: m,
                        listed: listed
                            .iter()
                            .map(|(id, _)| id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            },
            None => listed.first().cloned().ok_or(RemoteError::NoModels {
                url: models_url.clone(),
            })?,
        };
        Ok(Endpoint {
            base,
            api,
            model,
            api_key,
            server_header,
            owned_by,
            send_token_ids: send_token_ids && api == Api::Completions,
            read_timeout,
        })
    }

    /// The request body for `req` (streaming, with usage in the last chunk).
    fn body(&self, req: &ServeRequest, prompt_text: Option<&str>) -> Value {
        let prompt = match (self.send_token_ids, prompt_text) {
            (true, _) | (false, None) => json!(req.prompt_tokens),
            (false, Some(t)) => json!(t),
        };
        let mut b = json!({
            "model": self.model,
            "max_tokens": req.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match self.api {
            Api::Completions => b["prompt"] = prompt,
            Api::Chat => {
                b["messages"] = json!([{"role": "user", "content": prompt_text.unwrap_or("")}])
            }
        }
        sampler_fields(&mut b, &req.sampler);
        if !req.stop_strings.is_empty() {
            b["stop"] = json!(req.stop_strings);
        }
        if req.ignore_eos {
            // vLLM, SGLang, llama-server and ember serve honour it; OpenAI's API has no such field.
            b["ignore_eos"] = json!(true);
        }
        b
    }
}

/// The sampler as OpenAI fields; the extensions (top_k, min_p, repetition_penalty) only when
/// they are on, so servers without them are not sent them.
fn sampler_fields(b: &mut Value, s: &SamplerConfig) {
    b["temperature"] = json!(s.temperature);
    b["seed"] = json!(s.seed);
    if s.is_greedy() {
        return;
    }
    b["top_p"] = json!(s.top_p);
    if s.top_k > 0 {
        b["top_k"] = json!(s.top_k);
    }
    if s.min_p > 0.0 {
        b["min_p"] = json!(s.min_p);
    }
    if s.repeat_penalty != 1.0 {
        b["repetition_penalty"] = json!(s.repeat_penalty);
    }
}

fn agent(read_timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(read_timeout)
        .build()
}

/// A failed call as one line: the status and the server's OpenAI error message, or the
/// transport error.
fn describe_error(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            let text = resp.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            format!("HTTP {code}: {msg}")
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// The harness's [`Server`] over HTTP: one thread per request in flight, events back through
/// a channel. Runs take no server-side memory figures (`stats` is all zeros).
pub struct HttpServer {
    endpoint: Arc<Endpoint>,
    agent: ureq::Agent,
    /// The workload's tokenizer: prompt text for text prompts, and the local output count.
    tokenizer: Arc<Tokenizer>,
    /// Count output tokens locally (the tokenizer is the server model's).
    count_locally: bool,
    tx: Sender<ServeEvent>,
    rx: Receiver<ServeEvent>,
    in_flight: usize,
    /// An event [`Server::wait`] received, for the next `step`.
    stash: Option<ServeEvent>,
}

impl HttpServer {
    pub fn new(endpoint: Endpoint, tokenizer: Arc<Tokenizer>, count_locally: bool) -> Self {
        let (tx, rx) = mpsc::channel();
        HttpServer {
            agent: agent(endpoint.read_timeout),
            endpoint: Arc::new(endpoint),
            tokenizer,
            count_locally,
            tx,
            rx,
            in_flight: 0,
            stash: None,
        }
    }

    fn take(&mut self, ev: ServeEvent, out: &mut Vec<ServeEvent>) {
        if matches!(ev, ServeEvent::Finished { .. }) {
            self.in_flight -= 1;
        }
        out.push(ev);
    }
}

impl Server for HttpServer {
    fn submit(&mut self, req: ServeRequest, _out: &mut Vec<ServeEvent>) {
        self.in_flight += 1;
        let call = Call {
            endpoint: self.endpoint.clone(),
            agent: self.agent.clone(),
            tokenizer: self.tokenizer.clone(),
            count_locally: self.count_locally,
            tx: self.tx.clone(),
        };
        let id = req.id;
        let spawned = std::thread::Builder::new()
            .name(format!("ember-http-{id}"))
            .spawn(move || call.run(req));
        if let Err(e) = spawned {
            let _ = self.tx.send(ServeEvent::Finished {
                id,
                at: Instant::now(),
                reason: FinishKind::Error,
                error: Some(format!("cannot start a client thread: {e}")),
            });
        }
    }

    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool {
        let mut any = false;
        if let Some(ev) = self.stash.take() {
            self.take(ev, out);
            any = true;
        }
        while let Ok(ev) = self.rx.try_recv() {
            self.take(ev, out);
            any = true;
        }
        any
    }

    fn wait(&mut self, until: Option<Instant>) {
        if self.stash.is_some() || self.in_flight == 0 {
            return;
        }
        // At most 50 ms at a time, so that the harness still samples memory and reports
        // progress while a long reply streams.
        let cap = Instant::now() + Duration::from_millis(50);
        let until = until.map_or(cap, |u| u.min(cap));
        let d = until.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(d) {
            Ok(ev) => self.stash = Some(ev),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => unreachable!("the server holds a sender"),
        }
    }

    fn has_work(&self) -> bool {
        self.in_flight > 0 || self.stash.is_some()
    }

    fn stats(&self) -> ServerStats {
        ServerStats::default()
    }
}

/// One request's client, on its own thread.
struct Call {
    endpoint: Arc<Endpoint>,
    agent: ureq::Agent,
    tokenizer: Arc<Tokenizer>,
    count_locally: bool,
    tx: Sender<ServeEvent>,
}

/// What the stream said, as it went.
#[derive(Default)]
struct Reply {
    text: String,
    finish: Option<String>,
    usage: Option<Value>,
    error: Option<String>,
    done: bool,
}

impl Call {
    fn run(self, req: ServeRequest) {
        let id = req.id;
        let prompt_text = (!self.endpoint.send_token_ids)
            .then(|| self.tokenizer.decode_with_special(&req.prompt_tokens, true));
        let body = self.endpoint.body(&req, prompt_text.as_deref());
        let url = format!("{}/{}", self.endpoint.base, self.endpoint.api.path());
        let mut call = self
            .agent
            .post(&url)
            .set("Content-Type", "application/json")
            .set("Accept", "text/event-stream");
        if let Some(k) = &self.endpoint.api_key {
            call = call.set("Authorization", &format!("Bearer {k}"));
        }
        let _ = self.tx.send(ServeEvent::Enqueued {
            id,
            at: Instant::now(),
        });
        let mut reply = Reply::default();
        match call.send_string(&body.to_string()) {
            Ok(resp) => self.read_stream(id, resp, &mut reply),
            Err(e) => reply.error = Some(describe_error(e)),
        }
        self.finish(id, reply);
    }

    /// Reads the event stream, stamping every line as it arrives.
    fn read_stream(&self, id: RequestId, resp: ureq::Response, reply: &mut Reply) {
        let api = self.endpoint.api;
        let mut lines = BufReader::new(resp.into_reader());
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    reply.error = Some(format!("reading the stream: {e}"));
                    return;
                }
            }
            let at = Instant::now();
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue; // blank separators, comments, `event:` lines
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                reply.done = true;
                break;
            }
            let v: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => {
                    reply.error = Some(format!("a stream chunk is not JSON ({e}): {data}"));
                    return;
                }
            };
            if let Some(msg) = v.get("error") {
                let m = msg["message"].as_str().map(str::to_string);
                reply.error = Some(m.unwrap_or_else(|| msg.to_string()));
                return;
            }
            if v.get("usage").is_some_and(|u| !u.is_null()) {
                reply.usage = Some(v["usage"].clone());
            }
            let Some(choice) = v["choices"].get(0) else {
                continue; // the usage-only last chunk
            };
            if let Some(f) = choice["finish_reason"].as_str() {
                reply.finish = Some(f.to_string());
            }
            let piece = match api {
                Api::Completions => choice["text"].as_str(),
                Api::Chat => choice["delta"]["content"]
                    .as_str()
                    .or(choice["delta"]["reasoning_content"].as_str()),
            };
            if let Some(text) = piece.filter(|t| !t.is_empty()) {
                reply.text.push_str(text);
                let _ = self.tx.send(ServeEvent::Chunk {
                    id,
                    at,
                    text: text.to_string(),
                });
            }
        }
        if !reply.done && reply.error.is_none() {
            reply.error = Some("the stream ended without data: [DONE]".into());
        }
    }

    fn finish(&self, id: RequestId, reply: Reply) {
        let at = Instant::now();
        let usage = reply.usage.as_ref();
        let count = |k: &str| usage.and_then(|u| u[k].as_u64()).map(|n| n as usize);
        let local = self
            .count_locally
            .then(|| self.tokenizer.encode(&reply.text, false, false).ok())
            .flatten()
            .map(|t| t.len());
        let _ = self.tx.send(ServeEvent::Usage {
            id,
            at,
            prompt_tokens: count("prompt_tokens"),
            output_tokens: count("completion_tokens"),
            cached_prompt_tokens: usage
                .and_then(|u| u["prompt_tokens_details"]["cached_tokens"].as_u64())
                .map(|n| n as usize),
            local_output_tokens: local,
        });
        let reason = match (&reply.error, reply.finish.as_deref()) {
            (Some(_), _) => FinishKind::Error,
            (None, Some("length")) => FinishKind::Length,
            (None, _) => FinishKind::Stop,
        };
        let _ = self.tx.send(ServeEvent::Finished {
            id,
            at,
            reason,
            error: reply.error,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;

    use ember_runtime::gguf::GgufFile;
    use ember_runtime::sample::SamplerConfig;
    use ember_runtime::tokenizer::Tokenizer;

    use super::{Api, Endpoint, HttpServer};
    use crate::harness::{self, HarnessOptions, Hooks, SystemClock};
    use crate::metrics;
    use crate::record::FinishKind;
    use crate::workload::{WorkItem, Workload};

    /// A server ember did not write, reduced to what the client reads: `GET /v1/models`, and
    /// `POST /v1/completions` answered with `chunks` (text, then usage) as server-sent events.
    /// Serves `n` connections, one at a time.
    fn fake_server(n: usize, reply: fn(&str) -> String) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in l.incoming().take(n) {
                let mut s = stream.unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let out = if head.starts_with("GET /v1/models") {
                    let b = r#"{"object":"list","data":[{"id":"fake-1","object":"model","owned_by":"fakery"}]}"#;
                    format!(
                        "HTTP/1.1 200 OK\r\nServer: fake/9\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        b.len()
                    )
                } else {
                    let b = reply(&String::from_utf8(body).unwrap());
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{b}"
                    )
                };
                s.write_all(out.as_bytes()).unwrap();
            }
        });
        format!("http://{addr}/v1")
    }

    /// The fake server's endpoint: completions with token-id prompts.
    fn connect(base: &str) -> Endpoint {
        Endpoint::connect(
            base,
            Api::Completions,
            None,
            None,
            true,
            super::Duration::from_secs(10),
        )
        .unwrap()
    }

    fn run(server: &mut HttpServer, w: &Workload) -> crate::harness::RunOutput {
        let o = HarnessOptions::default();
        harness::run(server, &SystemClock, w, &o, Hooks::default())
    }

    fn tokenizer() -> Arc<Tokenizer> {
        let dir = std::env::temp_dir().join(format!("ember-remote-test-{}", std::process::id()));
        let (path, _) = ember_runtime::embedded::ensure_in(&dir).unwrap();
        let file = GgufFile::open(&path).unwrap();
        Arc::new(Tokenizer::from_gguf(&file.metadata).unwrap())
    }

    fn workload(n: usize) -> Workload {
        let item = WorkItem {
            prompt_tokens: vec![1, 2, 3],
            max_tokens: 8,
            stop: vec![],
            tags: vec![],
            expected: None,
            score: None,
        };
        Workload {
            name: "t".into(),
            seed: 0,
            items: vec![item; n],
            warmup: vec![],
            sampler: SamplerConfig::greedy(),
            ignore_eos: false,
            notes: vec![],
            params: serde_json::json!({}),
        }
    }

    /// Two chunks carry three tokens (the second chunk two): the run keeps two stamps, counts
    /// three tokens by the server's usage, spreads nothing, and says ITL is per chunk.
    #[test]
    fn several_tokens_per_chunk_are_counted_not_spread() {
        let base = fake_server(3, |body| {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["model"], "fake-1");
            assert_eq!(
                v["prompt"],
                serde_json::json!([1, 2, 3]),
                "token ids as given"
            );
            assert_eq!(v["stream"], true);
            assert_eq!(v["stream_options"]["include_usage"], true);
            concat!(
                "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":null}]}\n\n",
                ": a comment line\n\n",
                "data: {\"choices\":[{\"index\":0,\"text\":\"bc\",\"finish_reason\":\"length\"}]}\n\n",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":3,",
                "\"total_tokens\":6,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\n",
                "data: [DONE]\n\n"
            )
            .to_string()
        });
        let ep = connect(&base);
        assert_eq!(
            (
                ep.model.as_str(),
                ep.server_header.as_str(),
                ep.owned_by.as_str()
            ),
            ("fake-1", "fake/9", "fakery")
        );
        let mut server = HttpServer::new(ep, tokenizer(), false);
        let w = workload(2);
        let out = run(&mut server, &w);
        assert_eq!(out.records.len(), 2);
        for r in &out.records {
            assert_eq!(r.finish_reason, FinishKind::Length, "{:?}", r.error);
            assert_eq!(r.token_ns.len(), 2, "one stamp per chunk");
            assert!(r.token_ns[0] <= r.token_ns[1]);
            assert_eq!(r.output_tokens(), 3, "tokens by the server's usage");
            assert_eq!(r.counted.prompt_tokens, Some(3));
            assert_eq!(r.cache.cached_prompt_tokens, 2);
            assert_eq!(r.output_text.as_deref(), Some("abc"));
            assert!(r.chunked());
        }
        let s = metrics::summarize(&out.records, &out.memory, None);
        assert!(s.itl_per_chunk);
        assert_eq!((s.output_tokens, s.chunks), (6, 4));
        assert_eq!(s.itl_ms.n, 2, "one gap per request: between its two chunks");
    }

    /// A stream that stops before `[DONE]`, and a server error in the stream, fail the
    /// request with a message; the run goes on.
    #[test]
    fn broken_streams_fail_their_request_with_a_message() {
        let base = fake_server(3, |body| {
            if body.contains("\"max_tokens\":8") {
                "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":null}]}\n\n"
                    .into()
            } else {
                "data: {\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\"}}\n\n"
                    .into()
            }
        });
        let ep = connect(&base);
        let mut server = HttpServer::new(ep, tokenizer(), false);
        let mut w = workload(2);
        w.items[1].max_tokens = 9;
        let out = run(&mut server, &w);
        let errors: Vec<_> = out
            .records
            .iter()
            .map(|r| (r.finish_reason, r.error.clone().unwrap_or_default()))
            .collect();
        assert_eq!(errors[0].0, FinishKind::Error);
        assert!(errors[0].1.contains("without data: [DONE]"), "{errors:?}");
        assert_eq!(errors[1].0, FinishKind::Error);
        assert!(errors[1].1.contains("out of memory"), "{errors:?}");
    }

    #[test]
    fn urls_with_credentials_or_another_scheme_are_refused() {
        let t = super::Duration::from_secs(1);
        let e = Endpoint::connect("http://u:p@127.0.0.1:1/v1", Api::Chat, None, None, false, t);
        assert!(e.unwrap_err().to_string().contains("credentials"));
        let e = Endpoint::connect("127.0.0.1:1/v1", Api::Chat, None, None, false, t);
        assert!(e.unwrap_err().to_string().contains("http://"));
    }
}
