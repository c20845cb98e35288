//! Chat templates: render `tokenizer.chat_template` (HF Jinja) with minijinja.
//!
//! The environment mimics transformers' `apply_chat_template`:
//! `trim_blocks` + `lstrip_blocks`, the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, the function
//! `raise_exception(msg)`, `strftime_now(fmt)`, a Python-compatible `tojson`
//! filter (`json.dumps(..., ensure_ascii=False)` separators; map keys come out
//! sorted because minijinja's maps are ordered without `preserve_order`), and the common
//! Python string/dict methods templates call (`.strip()`, `.startswith()`,
//! `.split()`, `.items()`, `.get()`, ...), since `minijinja-contrib`'s
//! `pycompat` is not a dependency.

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

use crate::gguf::{Metadata, keys};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not parse: {0}")]
    Parse(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

fn render_err(e: Error) -> ChatError {
    // Include the whole error chain (raise_exception messages live there).
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ChatError::Render(msg)
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Plain ChatML, used when a model carries no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turn format (`<start_of_turn>user … <end_of_turn>`, the reply as `model`), used
/// when a Gemma file carries no template: a system message goes at the head of the first user
/// turn, as Gemma's own template puts it. BOS is left to the tokenizer.
pub const GEMMA_TEMPLATE: &str = "{% set ns = namespace(sys='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\n\n' %}{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + ns.sys + message['content'] + '<end_of_turn>\n' }}{% set ns.sys = '' %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

const NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// The built-in template for a file without one: "Gemma" when its vocabulary has Gemma's turn
/// markers (`<start_of_turn>`), else "ChatML" (llama.cpp's fallback too).
pub fn builtin_for(md: &Metadata) -> &'static str {
    let gemma = md
        .get_strings(keys::TOK_TOKENS)
        .is_some_and(|t| t.iter().any(|s| s == "<start_of_turn>"));
    if gemma { "Gemma" } else { "ChatML" }
}

fn token_text(md: &Metadata, key: &str) -> String {
    let (Some(id), Some(toks)) = (md.get_u64(key), md.get_strings(keys::TOK_TOKENS)) else {
        return String::new();
    };
    toks.get(id as usize).cloned().unwrap_or_default()
}

impl ChatTemplate {
    /// `None` when the GGUF has no `tokenizer.chat_template`.
    pub fn from_metadata(md: &Metadata) -> Option<Result<ChatTemplate, ChatError>> {
        let src = md.get_str(keys::CHAT_TEMPLATE)?;
        Some(ChatTemplate::new(
            src,
            token_text(md, keys::TOK_BOS),
            token_text(md, keys::TOK_EOS),
        ))
    }

    /// The model's template or, when it has none, the built-in one [`builtin_for`] names.
    pub fn from_metadata_or_builtin(md: &Metadata) -> Result<ChatTemplate, ChatError> {
        match ChatTemplate::from_metadata(md) {
            Some(r) => r,
            None => {
                let src = match builtin_for(md) {
                    "Gemma" => GEMMA_TEMPLATE,
                    _ => CHATML_TEMPLATE,
                };
                ChatTemplate::new(
                    src,
                    token_text(md, keys::TOK_BOS),
                    token_text(md, keys::TOK_EOS),
                )
            }
        }
    }

    /// The fallback ChatML renderer.
    pub fn chatml(bos_token: impl Into<String>, eos_token: impl Into<String>) -> ChatTemplate {
        ChatTemplate::new(CHATML_TEMPLATE, bos_token.into(), eos_token.into())
            .expect("built-in ChatML template parses")
    }

    /// Compile a Jinja chat template.
    pub fn new(
        source: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(py_method);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatError::Parse(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render the conversation. `add_generation_prompt` appends the
    /// assistant header so the model answers next.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template(NAME).map_err(render_err)?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(render_err)
    }
}

/// Render ChatML directly (no Jinja), identical to [`CHATML_TEMPLATE`].
pub fn render_chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str("<|im_start|>");
        s.push_str(&m.role);
        s.push('\n');
        s.push_str(&m.content);
        s.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// The templates' `strftime_now(fmt)`.
fn strftime_now(fmt: String) -> String {
    strftime_now_utc(&fmt)
}

/// The current time (UTC) formatted as [`strftime_at`] does. The workspace's one civil-date
/// routine: the results store's timestamps come from here too.
pub fn strftime_now_utc(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_at(fmt, secs)
}

/// Unix time `secs` as UTC, formatted like C's `strftime` with %Y %m %d %H %M %S %y %b %B %a
/// %A %j %p %I %e %% (an unknown directive is copied as is).
pub fn strftime_at(fmt: &str, secs: i64) -> String {
    const MON: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAY: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let leap = (y.rem_euclid(4) == 0 && y.rem_euclid(100) != 0) || y.rem_euclid(400) == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + if leap && m > 2 { 1 } else { 0 };
    let wday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday (Mon=0)
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MON[(m - 1) as usize]),
            Some('b') => out.push_str(&MON[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAY[wday as usize]),
            Some('a') => out.push_str(&DAY[wday as usize][..3]),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: minijinja::value::Kwargs,
) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline(out: &mut String, indent: Option<usize>, level: usize) {
    if let Some(n) = indent {
        out.push('\n');
        for _ in 0..n * level {
            out.push(' ');
        }
    }
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    level: usize,
) -> Result<(), Error> {
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else if let Ok(f) = f64::try_from(v.clone()) {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&f.to_string());
                }
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, indent, level + 1);
                write_json(out, it, indent, level + 1)?;
            }
            newline(out, indent, level);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, indent, level + 1);
                match k.as_str() {
                    Some(s) => write_json_str(out, s),
                    None => write_json_str(out, &k.to_string()),
                }
                out.push_str(": ");
                let val = v.get_item(k)?;
                write_json(out, &val, indent, level + 1)?;
            }
            newline(out, indent, level);
            out.push('}');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

fn arg_str(args: &[Value], i: usize) -> Option<&str> {
    args.get(i).and_then(|v| v.as_str())
}

fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let pred = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    let mut r = s;
    if left {
        r = r.trim_start_matches(pred);
    }
    if right {
        r = r.trim_end_matches(pred);
    }
    r.to_string()
}

/// Python methods on strings and dicts that HF templates use.
fn py_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let found = if let Some(s) = value.as_str() {
        py_str_method(s, method, args)?
    } else if value.kind() == ValueKind::Map {
        py_map_method(value, method, args)?
    } else {
        None
    };
    found.ok_or_else(|| {
        Error::new(
            ErrorKind::UnknownMethod,
            format!("no method `{method}` on {}", value.kind()),
        )
    })
}

/// A Python `str` method; `None` when `method` is not one.
fn py_str_method(s: &str, method: &str, args: &[Value]) -> Result<Option<Value>, Error> {
    let chars = arg_str(args, 0);
    Ok(Some(match method {
        "strip" => Value::from(py_strip(s, chars, true, true)),
        "lstrip" => Value::from(py_strip(s, chars, true, false)),
        "rstrip" => Value::from(py_strip(s, chars, false, true)),
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "title" => Value::from(title_case(s)),
        "capitalize" => {
            let mut c = s.chars();
            Value::from(match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + &c.as_str().to_lowercase(),
                None => String::new(),
            })
        }
        "startswith" | "endswith" => {
            let test = |p: &str| {
                if method == "startswith" {
                    s.starts_with(p)
                } else {
                    s.ends_with(p)
                }
            };
            match args.first() {
                Some(a) if a.kind() == ValueKind::Seq => {
                    Value::from(a.try_iter()?.any(|p| p.as_str().is_some_and(test)))
                }
                Some(a) => Value::from(a.as_str().is_some_and(test)),
                None => return Err(Error::new(ErrorKind::MissingArgument, method.to_string())),
            }
        }
        "split" | "rsplit" => py_split(s, method, chars, args),
        "replace" => {
            let (Some(a), Some(b)) = (arg_str(args, 0), arg_str(args, 1)) else {
                return Err(Error::new(ErrorKind::MissingArgument, "replace(old, new)"));
            };
            match args.get(2).and_then(|v| i64::try_from(v.clone()).ok()) {
                Some(n) if n >= 0 => Value::from(s.replacen(a, b, n as usize)),
                _ => Value::from(s.replace(a, b)),
            }
        }
        "find" => Value::from(
            chars
                .and_then(|p| s.find(p))
                .map(|i| s[..i].chars().count() as i64)
                .unwrap_or(-1),
        ),
        "count" => Value::from(
            chars
                .map(|p| {
                    if p.is_empty() {
                        0
                    } else {
                        s.matches(p).count()
                    }
                })
                .unwrap_or(0),
        ),
        "join" => {
            let items: Vec<String> = match args.first() {
                Some(a) => a
                    .try_iter()?
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect(),
                None => vec![],
            };
            Value::from(items.join(s))
        }
        "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
        "format" => py_format(s, args),
        _ => return Ok(None),
    }))
}

/// `str.split` / `str.rsplit` with an optional separator and `maxsplit`.
fn py_split(s: &str, method: &str, chars: Option<&str>, args: &[Value]) -> Value {
    let maxsplit = args
        .get(1)
        .and_then(|v| i64::try_from(v.clone()).ok())
        .unwrap_or(-1);
    let parts: Vec<String> = match chars {
        Some(sep) if !sep.is_empty() => {
            if maxsplit < 0 {
                s.split(sep).map(str::to_string).collect()
            } else if method == "split" {
                s.splitn(maxsplit as usize + 1, sep)
                    .map(str::to_string)
                    .collect()
            } else {
                let mut v: Vec<String> = s
                    .rsplitn(maxsplit as usize + 1, sep)
                    .map(str::to_string)
                    .collect();
                v.reverse();
                v
            }
        }
        _ => s.split_whitespace().map(str::to_string).collect(),
    };
    Value::from(parts)
}

/// `str.format` with positional `{}` placeholders only.
fn py_format(s: &str, args: &[Value]) -> Value {
    // Positional `{}` placeholders only.
    let mut out = String::new();
    let mut i = 0;
    let mut rest = s;
    while let Some(p) = rest.find("{}") {
        out.push_str(&rest[..p]);
        if let Some(a) = args.get(i) {
            out.push_str(&a.to_string());
        }
        i += 1;
        rest = &rest[p + 2..];
    }
    out.push_str(rest);
    Value::from(out)
}

/// A Python `dict` method; `None` when `method` is not one.
fn py_map_method(value: &Value, method: &str, args: &[Value]) -> Result<Option<Value>, Error> {
    let v: Result<Value, Error> = match method {
        "items" => {
            let mut v = Vec::new();
            for k in value.try_iter()? {
                let item = value.get_item(&k)?;
                v.push(Value::from(vec![k, item]));
            }
            Ok(Value::from(v))
        }
        "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
        "values" => {
            let mut v = Vec::new();
            for k in value.try_iter()? {
                v.push(value.get_item(&k)?);
            }
            Ok(Value::from(v))
        }
        "get" => {
            let key = args.first().cloned().unwrap_or(Value::UNDEFINED);
            let got = value.get_item(&key)?;
            if got.is_undefined() {
                Ok(args.get(1).cloned().unwrap_or(Value::from(())))
            } else {
                Ok(got)
            }
        }
        _ => return Ok(None),
    };
    v.map(Some)
}

fn title_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_alpha = false;
    for c in s.chars() {
        if prev_alpha {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_alpha = c.is_alphabetic();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_chatml_template_matches_direct_renderer() {
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        let t = ChatTemplate::chatml("", "");
        assert_eq!(t.render(&msgs, true).unwrap(), render_chatml(&msgs, true));
        assert_eq!(
            render_chatml(&msgs, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn gemma_builtin_puts_the_system_message_in_the_first_user_turn() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        let msgs = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chat_python_methods_and_raise() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip() }}|{{ messages[0].content.lstrip() }}|{{ 'a,b'.split(',') | join('+') }}|{{ messages[0]['role'].startswith('us') }}|{{ bos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  x  ")], false)
            .unwrap();
        // Booleans print Python-style, as in transformers.
        assert_eq!(out, "x|x  |a+b|True|<s>");
        let t = ChatTemplate::new("{{ raise_exception('only user/assistant roles') }}", "", "")
            .unwrap();
        let e = t.render(&[], false).unwrap_err();
        assert!(e.to_string().contains("only user/assistant roles"), "{e}");
    }

    #[test]
    fn chat_tojson_is_python_style() {
        let t = ChatTemplate::new(
            "{{ {'name': 'f', 'args': [1, 'é', none]} | tojson }}",
            "",
            "",
        )
        .unwrap();
        // Python separators and no ASCII escaping; minijinja (without its
        // `preserve_order` feature) keeps map keys sorted.
        assert_eq!(
            t.render(&[], false).unwrap(),
            r#"{"args": [1, "é", null], "name": "f"}"#
        );
    }

    #[test]
    fn chat_strftime() {
        // 2024-07-26 12:34:56 UTC was a Friday.
        assert_eq!(
            strftime_at("%d %b %Y %H:%M:%S %A %j", 1722000896),
            "26 Jul 2024 13:34:56 Friday 208"
        );
    }
}
