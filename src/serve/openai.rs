//! The OpenAI wire format: errors in OpenAI's JSON shape, the request fields ember reads (each
//! checked, with the parameter named when it is wrong), and the response bodies.
//!
//! Requests are read from a `serde_json::Value` field by field rather than derived: a wrong
//! type then gets a 400 that names the field (`"temperature" must be a number`), and unknown
//! fields (`user`, `metadata`, ...) are ignored as OpenAI's own server does.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use ember_runtime::request::Position;
use ember_runtime::tokenizer::Tokenizer;

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429/503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }
    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        );
        e.param = Some(param.to_string());
        e
    }
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body with its content type (axum's `Json` needs a feature that would pull in
/// `serde_path_to_error` for nothing: the server builds `Value`s).
pub fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The body as a JSON object, or a 400 that says what is wrong with it.
pub fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
        .code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the body must be a JSON object",
        )
        .code("invalid_json")),
    }
}

/// Typed access to a request object's optional fields; `null` counts as absent.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    pub fn f32(&self, k: &str) -> ApiResult<Option<f32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x as f32)),
                _ => Err(ApiError::invalid(k, format!("'{k}' must be a number"))),
            },
        }
    }
    pub fn i64(&self, k: &str) -> ApiResult<Option<i64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) => Ok(Some(x)),
                None => Err(ApiError::invalid(k, format!("'{k}' must be an integer"))),
            },
        }
    }
    pub fn bool(&self, k: &str) -> ApiResult<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid(k, format!("'{k}' must be a boolean"))),
        }
    }
    pub fn str(&self, k: &str) -> ApiResult<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(k, format!("'{k}' must be a string"))),
        }
    }
    /// `stop`: a string or an array of strings.
    pub fn strings(&self, k: &str) -> ApiResult<Vec<String>> {
        let bad = || ApiError::invalid(k, format!("'{k}' must be a string or an array of strings"));
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    }
}

/// The token's text as a client sees it, and its bytes (a byte-level token may be part of a
/// UTF-8 sequence).
pub fn token_piece(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// What a finished request's logprobs are: its positions (top entries), the sampled tokens'
/// logprobs, and the token ids they are about.
pub struct LogprobData {
    pub positions: Vec<Position>,
    pub sampled: Vec<f32>,
}

impl LogprobData {
    /// The distribution after `consumed` tokens.
    fn at(&self, consumed: usize) -> Option<&Position> {
        self.positions.iter().find(|p| p.consumed == consumed)
    }

    /// Chat's `logprobs.content`: one entry per generated token.
    pub fn chat(&self, tok: &Tokenizer, n_prompt: usize, generated: &[u32], k: usize) -> Value {
        let content: Vec<Value> = generated
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let (token, bytes) = token_piece(tok, id);
                let top: Vec<Value> = self
                    .at(n_prompt + i)
                    .map(|p| {
                        p.top
                            .iter()
                            .take(k)
                            .map(|e| {
                                let (t, b) = token_piece(tok, e.id);
                                json!({"token": t, "logprob": e.logprob, "bytes": b})
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({"token": token, "logprob": self.sampled.get(i), "bytes": bytes,
                       "top_logprobs": top})
            })
            .collect();
        json!({ "content": content })
    }

    /// Legacy completions' `logprobs`: tokens, token_logprobs, top_logprobs, text_offset; with
    /// `echo` the prompt's tokens first (the first of them has no logprob, and a prompt token
    /// outside the top entries has none either: only the top entries of a prompt position are
    /// kept).
    pub fn completions(
        &self,
        tok: &Tokenizer,
        prompt: &[u32],
        echo: bool,
        generated: &[u32],
        k: usize,
    ) -> Value {
        let mut tokens = vec![];
        let mut token_logprobs = vec![];
        let mut top_logprobs = vec![];
        let mut text_offset = vec![];
        let mut offset = 0usize;
        let top_map = |p: Option<&Position>| -> Value {
            match p {
                None => Value::Null,
                Some(p) => {
                    let mut m = Map::new();
                    for e in p.top.iter().take(k) {
                        m.insert(token_piece(tok, e.id).0, json!(e.logprob));
                    }
                    Value::Object(m)
                }
            }
        };
        let mut push = |id: u32, lp: Value, top: Value| {
            let (t, _) = token_piece(tok, id);
            text_offset.push(offset);
            offset += t.len();
            tokens.push(t);
            token_logprobs.push(lp);
            top_logprobs.push(top);
        };
        if echo {
            for (j, &id) in prompt.iter().enumerate() {
                let p = if j == 0 { None } else { self.at(j) };
                let lp = p
                    .and_then(|p| p.top.iter().find(|e| e.id == id))
                    .map_or(Value::Null, |e| json!(e.logprob));
                push(id, lp, top_map(p));
            }
        }
        for (i, &id) in generated.iter().enumerate() {
            let p = self.at(prompt.len() + i);
            push(id, json!(self.sampled.get(i)), top_map(p));
        }
        json!({"tokens": tokens, "token_logprobs": token_logprobs,
               "top_logprobs": top_logprobs, "text_offset": text_offset})
    }
}

/// `usage`, with the prompt tokens the prefix cache served.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Seconds since the epoch, OpenAI's `created`.
pub fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
