//! The HTTP side: routes, the checks every request gets (API key, body size and read timeout,
//! queue bound, context), and turning the engine's updates into OpenAI responses, whole or as
//! server-sent events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use ember_runtime::chat::{ChatMessage, ChatTemplate};
use ember_runtime::engine::Engine;
use ember_runtime::request::RequestOptions;
use ember_runtime::sample::SamplerConfig;
use ember_runtime::serve::{FinishKind, ServeRequest};

use super::metrics::Metrics;
use super::openai::{self, ApiError, ApiResult, Fields, created, usage};
use super::worker::{Command, Done, Submit, Update};

/// Most `top_logprobs` a request may ask for.
const MAX_TOP_LOGPROBS: i64 = 20;
/// Most stop strings a request may give.
const MAX_STOPS: usize = 16;

/// What every handler shares.
pub struct App {
    pub engine: &'static Engine,
    /// The model's chat template (ChatML when the GGUF has none), or why it does not parse.
    pub template: Result<ChatTemplate, String>,
    pub model_id: String,
    /// Other names a request's `model` may use for the one model (the path given, the file name).
    pub aliases: Vec<String>,
    pub api_key: Option<String>,
    pub cmd: mpsc::UnboundedSender<Command>,
    pub metrics: Arc<Metrics>,
    /// Requests accepted and not finished (waiting, running, or streaming their end).
    pub inflight: AtomicUsize,
    pub max_queue: usize,
    pub body_limit: usize,
    pub body_timeout: Duration,
    pub next_id: AtomicU64,
    pub draining: AtomicBool,
    /// The scheduler's KV budget in blocks, and positions per block: a request that needs more
    /// could never be admitted.
    pub kv_blocks: usize,
    pub block_size: usize,
    pub started: u64,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(server_header))
        .with_state(app)
}

async fn server_header(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::SERVER,
        HeaderValue::from_static(concat!("ember/", env!("CARGO_PKG_VERSION"))),
    );
    r
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
    .code("not_found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this endpoint",
    )
    .code("method_not_allowed")
}

/// Unwrap a handler's result into a response.
fn respond(r: ApiResult<Response>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

impl App {
    /// `Authorization: Bearer KEY` when a key is set (compared in constant time).
    fn authorize(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (a, b) = (given.as_bytes(), key.as_bytes());
        let diff = a
            .iter()
            .zip(b)
            .fold((a.len() != b.len()) as u8, |d, (x, y)| d | (x ^ y));
        if diff != 0 {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect API key provided: send it as 'Authorization: Bearer KEY'.",
            )
            .code("invalid_api_key"));
        }
        Ok(())
    }

    /// The whole body, within the size limit and the read timeout (a client that sends its
    /// body a byte a second gets a 408, not a connection held forever).
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> ApiResult<Bytes> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the body is larger than {} bytes", self.body_limit),
            )
            .code("body_too_large")
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.body_limit as u64) {
            return Err(too_large());
        }
        let limit = self.body_limit;
        let read = async move {
            let mut stream = body.into_data_stream();
            let mut buf = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        format!("cannot read the body: {e}"),
                    )
                })?;
                if buf.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(Bytes::from(buf))
        };
        match tokio::time::timeout(self.body_timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the body did not arrive within {:.0} s",
                    self.body_timeout.as_secs_f64()
                ),
            )
            .code("timeout")),
        }
    }

    /// A place in the bounded queue, held until the request's response is complete.
    fn admit(self: &Arc<Self>) -> ApiResult<Permit> {
        if self.draining.load(Ordering::SeqCst) {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
            .code("shutting_down");
            e.retry_after = Some(5);
            return Err(e);
        }
        let max = self.max_queue;
        if self
            .inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            Metrics::add(&self.metrics.rejected_queue_full, 1);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the server has {max} requests in flight (its queue bound, --max-queue); try again shortly"),
            )
            .code("queue_full");
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(Permit(self.clone()))
    }

    fn check_model(&self, f: &Fields) -> ApiResult<()> {
        match f.str("model")? {
            Some(m) if m != self.model_id && !self.aliases.iter().any(|a| a == m) => {
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "The model `{m}` does not exist: this server serves `{}`.",
                        self.model_id
                    ),
                )
                .code("model_not_found"))
                .map_err(|mut e| {
                    e.param = Some("model".into());
                    e
                })
            }
            _ => Ok(()),
        }
    }
}

/// A request's place in the queue; given back when dropped (the response is done or its
/// client went away).
struct Permit(Arc<App>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A generation request, checked.
struct Gen {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampler: SamplerConfig,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    /// `Some(k)`: return logprobs with k alternatives.
    logprobs: Option<usize>,
    /// Completions: the prompt text goes before the output (and its logprobs with them).
    echo: bool,
    prompt_text: String,
}

fn seed_now() -> u64 {
    // No seed: a different one each request, as OpenAI's sampling is.
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ N
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The fields chat and completions share: sampling, stop, n, streaming. Defaults are
/// OpenAI's (temperature 1, top_p 1, no top-k or min-p).
fn common(f: &Fields, g: &mut Gen) -> ApiResult<()> {
    if let Some(n) = f.i64("n")?
        && n != 1
    {
        return Err(ApiError::invalid(
            "n",
            format!("n = {n} is not supported: ember returns one choice per request (n = 1)"),
        ));
    }
    if let Some(b) = f.i64("best_of")?
        && b != 1
    {
        return Err(ApiError::invalid("best_of", "best_of must be 1"));
    }
    for p in ["frequency_penalty", "presence_penalty"] {
        if let Some(x) = f.f32(p)?
            && x != 0.0
        {
            return Err(ApiError::invalid(
                p,
                format!(
                    "{p} is not supported; use repetition_penalty (> 1 penalizes repeats, as llama.cpp's repeat penalty)"
                ),
            ));
        }
    }
    if f.get("logit_bias")
        .is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty()))
    {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    let s = &mut g.sampler;
    if let Some(t) = f.f32("temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be in [0, 2], got {t}"),
            ));
        }
        s.temperature = t;
    }
    if let Some(p) = f.f32("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
        s.top_p = p;
    }
    if let Some(k) = f.i64("top_k")? {
        if k < -1 {
            return Err(ApiError::invalid(
                "top_k",
                "top_k must be -1 or 0 (off) or a positive count",
            ));
        }
        s.top_k = k.max(0) as usize;
    }
    if let Some(p) = f.f32("min_p")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::invalid(
                "min_p",
                format!("min_p must be in [0, 1], got {p}"),
            ));
        }
        s.min_p = p;
    }
    if let Some(r) = f.f32("repetition_penalty")? {
        if r <= 0.0 {
            return Err(ApiError::invalid(
                "repetition_penalty",
                "repetition_penalty must be > 0",
            ));
        }
        s.repeat_penalty = r;
    }
    s.seed = match f.i64("seed")? {
        Some(x) => x as u64,
        None => seed_now(),
    };
    s.validate()
        .map_err(|e| ApiError::invalid("temperature", e))?;
    g.stop = f
        .strings("stop")?
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if g.stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    g.ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    g.stream = f.bool("stream")?.unwrap_or(false);
    if let Some(o) = f.get("stream_options") {
        let Some(o) = o.as_object() else {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' must be an object",
            ));
        };
        if !g.stream {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        g.include_usage = Fields(o).bool("include_usage")?.unwrap_or(false);
    }
    Ok(())
}

/// `max_tokens` (and chat's `max_completion_tokens`): at least `min`, and with the prompt
/// within the context; none given means the rest of the context (chat) or `default`.
fn max_tokens(
    app: &App,
    f: &Fields,
    g: &mut Gen,
    prompt_param: &str,
    min: i64,
    default: Option<usize>,
) -> ApiResult<()> {
    let n_ctx = app.engine.cfg.n_ctx;
    let (param, given) = match f.i64("max_completion_tokens")? {
        Some(x) => ("max_completion_tokens", Some(x)),
        None => ("max_tokens", f.i64("max_tokens")?),
    };
    let n_prompt = g.prompt.len();
    if n_prompt == 0 {
        return Err(ApiError::invalid(
            prompt_param,
            "the prompt is empty (no tokens)",
        ));
    }
    let room = n_ctx.saturating_sub(n_prompt);
    g.max_tokens = match given {
        Some(x) if x < min => {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least {min}, got {x}"),
            ));
        }
        Some(x) => x as usize,
        None => default.unwrap_or(room).min(room),
    };
    let total = n_prompt.saturating_add(g.max_tokens);
    if total > n_ctx || g.max_tokens < min as usize {
        return Err(ApiError::invalid(
            if given.is_some() && n_prompt + (min as usize) <= n_ctx {
                param
            } else {
                prompt_param
            },
            format!(
                "This model's maximum context length is {n_ctx} tokens. However, you requested {} tokens ({n_prompt} in the prompt, {} in the completion). Please reduce the length of the prompt or completion.",
                n_prompt + g.max_tokens.max(min as usize),
                g.max_tokens.max(min as usize)
            ),
        )
        .code("context_length_exceeded"));
    }
    let need = total.div_ceil(app.block_size.max(1));
    if need > app.kv_blocks {
        return Err(ApiError::invalid(
            param,
            format!(
                "{total} positions need {need} KV blocks, more than the server's whole KV budget of {} blocks (--kv-budget-mib)",
                app.kv_blocks
            ),
        )
        .code("context_length_exceeded"));
    }
    Ok(())
}

fn new_gen() -> Gen {
    Gen {
        prompt: vec![],
        max_tokens: 0,
        sampler: SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        },
        stop: vec![],
        ignore_eos: false,
        stream: false,
        include_usage: false,
        logprobs: None,
        echo: false,
        prompt_text: String::new(),
    }
}

/// One message's text: a string, or an array of text parts.
fn message_text(i: usize, m: &serde_json::Map<String, Value>) -> ApiResult<String> {
    let param = format!("messages[{i}].content");
    match m.get("content") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    (ty, _) => {
                        return Err(ApiError::invalid(
                            &param,
                            format!(
                                "content part of type {} is not supported: only text",
                                ty.unwrap_or("?")
                            ),
                        ));
                    }
                }
            }
            Ok(s)
        }
        Some(_) => Err(ApiError::invalid(
            &param,
            "content must be a string or an array of text parts",
        )),
    }
}

fn parse_chat(app: &App, f: &Fields) -> ApiResult<Gen> {
    app.check_model(f)?;
    let mut g = new_gen();
    common(f, &mut g)?;
    let msgs = match f.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "'messages' must be an array of messages",
            ));
        }
        None => return Err(ApiError::invalid("messages", "'messages' is required")),
    };
    let mut chat = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                "a message must be an object",
            ));
        };
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                "a message needs a string 'role'",
            ));
        };
        chat.push(ChatMessage::new(role, message_text(i, m)?));
    }
    let tpl = app.template.as_ref().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("the model's chat template does not parse: {e}"),
        )
    })?;
    let text = tpl.render(&chat, true).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the chat template refused the messages: {e}"),
        )
    })?;
    // The template writes any BOS itself, as `ember run --chat` does.
    g.prompt = app
        .engine
        .tokenizer
        .encode(&text, false, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let lp = f.bool("logprobs")?.unwrap_or(false);
    let top = f.i64("top_logprobs")?;
    if let Some(k) = top {
        if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            ));
        }
        if !lp {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
    }
    if lp {
        g.logprobs = Some(top.unwrap_or(0) as usize);
    }
    max_tokens(app, f, &mut g, "messages", 1, None)?;
    Ok(g)
}

fn parse_completions(app: &App, f: &Fields) -> ApiResult<Gen> {
    app.check_model(f)?;
    let mut g = new_gen();
    common(f, &mut g)?;
    let tok = &app.engine.tokenizer;
    let encode = |s: &str| {
        tok.encode(s, tok.add_bos_default(), true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let ids = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .map(|v| match v.as_u64() {
                Some(x) if (x as usize) < tok.vocab_size() => Ok(x as u32),
                _ => Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "token ids must be integers below the vocabulary size {}",
                        tok.vocab_size()
                    ),
                )),
            })
            .collect()
    };
    let one = || {
        ApiError::invalid(
            "prompt",
            "one prompt per request: a batch of prompts is not supported",
        )
    };
    let (prompt, text) = match f.get("prompt") {
        Some(Value::String(s)) => (encode(s)?, s.clone()),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(s) if a.len() == 1 => (encode(s)?, s.clone()),
            Value::Array(inner) if a.len() == 1 => {
                let p = ids(inner)?;
                let t = tok.decode(&p);
                (p, t)
            }
            Value::Number(_) => {
                let p = ids(a)?;
                let t = tok.decode(&p);
                (p, t)
            }
            Value::String(_) | Value::Array(_) => return Err(one()),
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "'prompt' must be a string, an array of token ids, or an array of one of those",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "'prompt' must be a string or an array of token ids",
            ));
        }
        None => return Err(ApiError::invalid("prompt", "'prompt' is required")),
    };
    g.prompt = prompt;
    g.prompt_text = text;
    g.echo = f.bool("echo")?.unwrap_or(false);
    if let Some(k) = f.i64("logprobs")? {
        if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            ));
        }
        g.logprobs = Some(k as usize);
    }
    if f.get("suffix").is_some() {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    // OpenAI's legacy default.
    max_tokens(app, f, &mut g, "prompt", 0, Some(16))?;
    Ok(g)
}

/// Hand a checked request to the engine.
fn submit(
    app: &App,
    g: &Gen,
    tag: &'static str,
    arrived: Instant,
) -> ApiResult<(u64, mpsc::UnboundedReceiver<Update>)> {
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let req = ServeRequest {
        id,
        prompt_tokens: g.prompt.clone(),
        max_tokens: g.max_tokens,
        sampler: g.sampler.clone(),
        stop_strings: g.stop.clone(),
        ignore_eos: g.ignore_eos,
    };
    let opts = RequestOptions {
        // The sampled token's logprob is recorded only with at least one top entry.
        top_logprobs: g.logprobs.map_or(0, |k| k.max(1)),
        echo: g.echo && g.logprobs.is_some(),
        keep: true,
    };
    app.cmd
        .send(Command::Submit(Box::new(Submit {
            req,
            opts,
            arrived,
            tag,
            tx,
        })))
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine has stopped",
            )
        })?;
    Ok((id, rx))
}

/// Wait for the end of a request, collecting nothing from its tokens (`Done` has the text).
async fn finish(rx: &mut mpsc::UnboundedReceiver<Update>) -> ApiResult<Box<Done>> {
    while let Some(u) = rx.recv().await {
        if let Update::Done(d) = u {
            return Ok(d);
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the engine dropped the request",
    ))
}

/// A failed request's error (the checks above should have caught what a client could fix).
fn engine_error(d: &Done) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        d.error
            .clone()
            .unwrap_or_else(|| "the request failed".into()),
    )
}

fn finish_reason(k: FinishKind) -> &'static str {
    match k {
        FinishKind::Stop => "stop",
        FinishKind::Length => "length",
        FinishKind::Error => "error",
        FinishKind::Cancelled => "cancelled",
    }
}

/// Parse, check and queue: what both generation endpoints do before they answer.
async fn start(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
    parse: fn(&App, &Fields) -> ApiResult<Gen>,
    tag: &'static str,
) -> ApiResult<(Gen, Permit, u64, mpsc::UnboundedReceiver<Update>)> {
    let arrived = Instant::now();
    app.authorize(headers)?;
    let body = app.read_body(headers, body).await?;
    let obj = openai::parse_object(&body)?;
    let g = parse(app, &Fields(&obj))?;
    let permit = app.admit()?;
    let (id, rx) = submit(app, &g, tag, arrived)?;
    Ok((g, permit, id, rx))
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    respond(generate(app, headers, body, Api::Chat).await)
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    respond(generate(app, headers, body, Api::Completions).await)
}

/// A chat or completions request: streamed as it goes, or answered whole once it finishes.
async fn generate(app: Arc<App>, headers: HeaderMap, body: Body, api: Api) -> ApiResult<Response> {
    let (parse, tag, prefix): (fn(&App, &Fields) -> ApiResult<Gen>, _, _) = match api {
        Api::Chat => (parse_chat, "chat", "chatcmpl"),
        Api::Completions => (parse_completions, "completions", "cmpl"),
    };
    let (g, permit, id, mut rx) = start(&app, &headers, body, parse, tag).await?;
    let rid = format!("{prefix}-{id}");
    if g.stream {
        return Ok(stream_response(app, g, permit, rid, rx, api));
    }
    let d = finish(&mut rx).await?;
    drop(permit);
    if d.reason == FinishKind::Error {
        return Err(engine_error(&d));
    }
    Ok(ok_json(match api {
        Api::Chat => chat_body(&app, &g, &d, &rid),
        Api::Completions => completions_body(&app, &g, &d, &rid),
    }))
}

/// A whole `chat.completion`.
fn chat_body(app: &App, g: &Gen, d: &Done, rid: &str) -> Value {
    let tok = &app.engine.tokenizer;
    let logprobs = match (&d.logprobs, g.logprobs) {
        (Some(l), Some(k)) => l.chat(tok, d.prompt_tokens, &d.generated, k),
        _ => Value::Null,
    };
    json!({
        "id": rid, "object": "chat.completion", "created": created(), "model": app.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": d.text},
                     "logprobs": logprobs, "finish_reason": finish_reason(d.reason)}],
        "usage": usage(d.prompt_tokens, d.generated.len(), d.cached_tokens),
    })
}

/// A whole `text_completion` (with the prompt in front when echoed).
fn completions_body(app: &App, g: &Gen, d: &Done, rid: &str) -> Value {
    let tok = &app.engine.tokenizer;
    let logprobs = match (&d.logprobs, g.logprobs) {
        (Some(l), Some(k)) => l.completions(tok, &g.prompt, g.echo, &d.generated, k),
        _ => Value::Null,
    };
    let text = if g.echo {
        format!("{}{}", g.prompt_text, d.text)
    } else {
        d.text.clone()
    };
    json!({
        "id": rid, "object": "text_completion", "created": created(), "model": app.model_id,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                     "finish_reason": finish_reason(d.reason)}],
        "usage": usage(d.prompt_tokens, d.generated.len(), d.cached_tokens),
    })
}

#[derive(Clone, Copy)]
enum Api {
    Chat,
    Completions,
}

/// A streamed token's `logprobs`: chat's `{"content": [one entry]}`, completions' lists of one.
fn stream_logprobs(
    app: &App,
    api: Api,
    lp: &super::worker::TokenLogprobs,
    k: usize,
    offset: usize,
) -> Value {
    let tok = &app.engine.tokenizer;
    let (token, bytes) = openai::token_piece(tok, lp.token);
    let top = lp.top.iter().take(k);
    match api {
        Api::Chat => {
            let top: Vec<Value> = top
                .map(|e| {
                    let (t, b) = openai::token_piece(tok, e.id);
                    json!({"token": t, "logprob": e.logprob, "bytes": b})
                })
                .collect();
            json!({"content": [{"token": token, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top}]})
        }
        Api::Completions => {
            let mut m = serde_json::Map::new();
            for e in top {
                m.insert(openai::token_piece(tok, e.id).0, json!(e.logprob));
            }
            json!({"tokens": [token], "token_logprobs": [lp.logprob], "top_logprobs": [m], "text_offset": [offset]})
        }
    }
}

/// One SSE event.
fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// The streamed answer: a chunk per token that made text visible, a last chunk with the
/// finish reason, a usage chunk when asked (`stream_options.include_usage`), then `[DONE]`.
/// The body owns the receiver and the queue permit: when the client goes away the body is
/// dropped, the engine sees the closed channel and cancels the request.
fn stream_response(
    app: Arc<App>,
    g: Gen,
    permit: Permit,
    rid: String,
    rx: mpsc::UnboundedReceiver<Update>,
    api: Api,
) -> Response {
    let created = created();
    let model = app.model_id.clone();
    let chunk = move |delta_or_text: Value, finish: Value, u: bool| -> Value {
        let choice = match api {
            Api::Chat => {
                json!({"index": 0, "delta": delta_or_text, "logprobs": null, "finish_reason": finish})
            }
            Api::Completions => {
                json!({"index": 0, "text": delta_or_text, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = match api {
            Api::Chat => "chat.completion.chunk",
            Api::Completions => "text_completion",
        };
        let mut c = json!({"id": rid, "object": object, "created": created, "model": model, "choices": [choice]});
        if u {
            c["usage"] = Value::Null;
        }
        c
    };
    let include_usage = g.include_usage;
    // What goes first: chat's role delta, completions' echoed prompt.
    let first = match api {
        Api::Chat => Some(sse(&chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            include_usage,
        ))),
        Api::Completions if g.echo && !g.prompt_text.is_empty() => Some(sse(&chunk(
            json!(g.prompt_text),
            Value::Null,
            include_usage,
        ))),
        Api::Completions => None,
    };
    struct St<C> {
        app: Arc<App>,
        top_k: Option<usize>,
        /// Completions' text_offset of the next token.
        offset: usize,
        rx: mpsc::UnboundedReceiver<Update>,
        _permit: Permit,
        chunk: C,
        first: Option<String>,
        done: bool,
    }
    let st = St {
        app: app.clone(),
        top_k: g.logprobs,
        offset: if g.echo { g.prompt_text.len() } else { 0 },
        rx,
        _permit: permit,
        chunk,
        first,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        if let Some(f) = st.first.take() {
            return Some((Ok::<_, std::convert::Infallible>(Bytes::from(f)), st));
        }
        if st.done {
            return None;
        }
        loop {
            match st.rx.recv().await {
                // Without logprobs a token that made no text visible sends nothing; with them
                // every token gets its chunk.
                Some(Update::Token(t, None)) if t.is_empty() => continue,
                Some(Update::Token(t, lp)) => {
                    let v = match api {
                        Api::Chat => json!({"content": t}),
                        Api::Completions => json!(t),
                    };
                    let mut c = (st.chunk)(v, Value::Null, include_usage);
                    if let (Some(lp), Some(k)) = (lp, st.top_k) {
                        c["choices"][0]["logprobs"] =
                            stream_logprobs(&st.app, api, &lp, k, st.offset);
                        st.offset += openai::token_piece(&st.app.engine.tokenizer, lp.token)
                            .0
                            .len();
                    }
                    let s = sse(&c);
                    return Some((Ok(Bytes::from(s)), st));
                }
                Some(Update::Done(d)) => {
                    st.done = true;
                    let mut out = String::new();
                    if d.reason == FinishKind::Error {
                        out += &sse(&engine_error(&d).body());
                    } else {
                        let empty = match api {
                            Api::Chat => json!({}),
                            Api::Completions => json!(""),
                        };
                        out += &sse(&(st.chunk)(
                            empty,
                            json!(finish_reason(d.reason)),
                            include_usage,
                        ));
                        if include_usage {
                            let mut u = (st.chunk)(Value::Null, Value::Null, false);
                            u["choices"] = json!([]);
                            u["usage"] = usage(d.prompt_tokens, d.generated.len(), d.cached_tokens);
                            out += &sse(&u);
                        }
                    }
                    out += "data: [DONE]\n\n";
                    return Some((Ok(Bytes::from(out)), st));
                }
                None => {
                    st.done = true;
                    let e = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the engine dropped the request",
                    );
                    return Some((Ok(Bytes::from(sse(&e.body()) + "data: [DONE]\n\n")), st));
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    respond((|| {
        app.authorize(&headers)?;
        Ok(ok_json(json!({"object": "list", "data": [{
            "id": app.model_id, "object": "model", "created": app.started, "owned_by": "ember",
            "max_model_len": app.engine.cfg.n_ctx,
        }]})))
    })())
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
        .code("shutting_down")
        .into_response();
    }
    ok_json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    respond((|| {
        app.authorize(&headers)?;
        Ok((
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            app.metrics.render(),
        )
            .into_response())
    })())
}

/// llama-server's `/tokenize`: `{"content", "add_special", "parse_special", "with_pieces"}` →
/// `{"tokens": [...]}` (ids, or `{"id", "piece"}` with pieces; a piece that is not valid UTF-8
/// is its bytes).
async fn tokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    respond(
        async {
            app.authorize(&headers)?;
            let body = app.read_body(&headers, body).await?;
            let obj = openai::parse_object(&body)?;
            let f = Fields(&obj);
            let content = f
                .str("content")?
                .ok_or_else(|| ApiError::invalid("content", "'content' is required"))?;
            let add_special = f.bool("add_special")?.unwrap_or(false);
            let parse_special = f.bool("parse_special")?.unwrap_or(true);
            let tok = &app.engine.tokenizer;
            let ids = tok
                .encode(content, add_special && tok.add_bos_default(), parse_special)
                .map_err(|e| ApiError::invalid("content", e.to_string()))?;
            let tokens: Vec<Value> = if f.bool("with_pieces")?.unwrap_or(false) {
                ids.iter()
                    .map(|&id| {
                        let b = tok.token_bytes(id);
                        let piece = match String::from_utf8(b) {
                            Ok(s) => json!(s),
                            Err(e) => json!(e.into_bytes()),
                        };
                        json!({"id": id, "piece": piece})
                    })
                    .collect()
            } else {
                ids.iter().map(|&id| json!(id)).collect()
            };
            Ok(ok_json(json!({ "tokens": tokens })).into_response())
        }
        .await,
    )
}

/// llama-server's `/detokenize`: `{"tokens": [...]}` → `{"content"}`.
async fn detokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    respond(
        async {
            app.authorize(&headers)?;
            let body = app.read_body(&headers, body).await?;
            let obj = openai::parse_object(&body)?;
            let tok = &app.engine.tokenizer;
            let bad = || {
                ApiError::invalid(
                    "tokens",
                    format!(
                        "'tokens' must be an array of token ids below {}",
                        tok.vocab_size()
                    ),
                )
            };
            let ids: Vec<u32> = match Fields(&obj).get("tokens") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .filter(|&x| (x as usize) < tok.vocab_size())
                            .map(|x| x as u32)
                            .ok_or_else(bad)
                    })
                    .collect::<ApiResult<_>>()?,
                _ => return Err(bad()),
            };
            Ok(ok_json(json!({ "content": tok.decode(&ids) })).into_response())
        }
        .await,
    )
}

/// 200 with a JSON body.
fn ok_json(v: Value) -> Response {
    openai::json_response(StatusCode::OK, &v)
}
