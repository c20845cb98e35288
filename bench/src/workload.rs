//! Workloads: what the simulated users ask.
//!
//! - Presets (`chat`, `rag`, `creative`, `shared-prefix`) made of synthetic
//!   prompts: windows of real text (`bench/data/corpus.txt`) cut to exact
//!   token lengths drawn from seeded length distributions.
//! - The `edit` preset: requests to reproduce a code or text block
//!   (`bench/data/edit.jsonl`) with one small change, through the model's chat
//!   template. The answer mostly repeats the prompt, which is where speculative
//!   decoding (`--lookup`, `--draft`) pays; next to `chat` and `creative` it
//!   shows where speculation pays and where it does not.
//! - Custom JSONL datasets (`prompt` or `messages`, optional `max_tokens`,
//!   `expected`, `tags`, `stop`, `raw`, `repeat`), and ShareGPT import.
//! - The workload hash: sha256 over prompt token ids, the arrival schedule and
//!   the sampling parameters. Two runs are comparable only if these match.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use ember_runtime::chat::{ChatMessage, ChatTemplate};
use ember_runtime::sample::{Rng, SamplerConfig};
use ember_runtime::tokenizer::Tokenizer;

use crate::load::LoadSpec;
use crate::record::Ns;

/// Text of our own writing that synthetic prompts are cut from.
pub const CORPUS: &str = include_str!("../data/corpus.txt");
/// The example evaluation set shipped with ember (JSONL).
pub const EVAL_SET: &str = include_str!("../data/eval.jsonl");
/// Code and text blocks of our own writing for the `edit` preset (JSONL, one [`EditBlock`] a line).
pub const EDIT_BLOCKS: &str = include_str!("../data/edit.jsonl");

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{source_name}:{line}: {msg}")]
    Line {
        source_name: String,
        line: usize,
        msg: String,
    },
    #[error("{source_name}: {msg}")]
    File { source_name: String, msg: String },
    #[error("unknown workload preset '{0}' (known: chat, rag, creative, shared-prefix, edit)")]
    Preset(String),
    #[error("bad length distribution '{0}': use fixed:N, uniform:LO:HI or normal:MEAN:SD:LO:HI")]
    Dist(String),
    #[error("tokenizing request {index}: {msg}")]
    Tokenize { index: usize, msg: String },
}

/// A distribution of token counts, sampled with a seeded generator.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LengthDist {
    Fixed {
        n: usize,
    },
    /// Inclusive bounds.
    Uniform {
        lo: usize,
        hi: usize,
    },
    /// Normal(mean, sd) rounded and clamped to [lo, hi].
    Normal {
        mean: f64,
        sd: f64,
        lo: usize,
        hi: usize,
    },
}

impl LengthDist {
    pub fn sample(&self, rng: &mut Rng) -> usize {
        match *self {
            LengthDist::Fixed { n } => n,
            LengthDist::Uniform { lo, hi } => lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize,
            LengthDist::Normal { mean, sd, lo, hi } => {
                // Box–Muller.
                let u1 = rng.next_f64().max(1e-12);
                let u2 = rng.next_f64();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                ((mean + sd * z).round().max(0.0) as usize).clamp(lo, hi)
            }
        }
    }

    pub fn max(&self) -> usize {
        match *self {
            LengthDist::Fixed { n } => n,
            LengthDist::Uniform { hi, .. } | LengthDist::Normal { hi, .. } => hi,
        }
    }

    /// The same distribution with every value at most `cap`.
    pub fn capped(&self, cap: usize) -> LengthDist {
        match *self {
            LengthDist::Fixed { n } => LengthDist::Fixed { n: n.min(cap) },
            LengthDist::Uniform { lo, hi } => LengthDist::Uniform {
                lo: lo.min(cap),
                hi: hi.min(cap),
            },
            LengthDist::Normal { mean, sd, lo, hi } => LengthDist::Normal {
                mean: mean.min(cap as f64),
                sd,
                lo: lo.min(cap),
                hi: hi.min(cap),
            },
        }
    }

    /// `fixed:N`, `uniform:LO:HI`, `normal:MEAN:SD:LO:HI`, or a bare `N`.
    pub fn parse(s: &str) -> Result<LengthDist, WorkloadError> {
        let bad = || WorkloadError::Dist(s.to_string());
        let p: Vec<&str> = s.split(':').collect();
        let u = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
        let f = |x: &str| x.trim().parse::<f64>().map_err(|_| bad());
        let d = match p.as_slice() {
            [n] => LengthDist::Fixed { n: u(n)? },
            ["fixed", n] => LengthDist::Fixed { n: u(n)? },
            ["uniform", lo, hi] => LengthDist::Uniform {
                lo: u(lo)?,
                hi: u(hi)?,
            },
            ["normal", m, sd, lo, hi] => LengthDist::Normal {
                mean: f(m)?,
                sd: f(sd)?,
                lo: u(lo)?,
                hi: u(hi)?,
            },
            _ => return Err(bad()),
        };
        match d {
            LengthDist::Uniform { lo, hi } | LengthDist::Normal { lo, hi, .. } if lo > hi => {
                Err(bad())
            }
            _ => Ok(d),
        }
    }
}

/// One request, ready for the engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub tags: Vec<String>,
    pub expected: Option<String>,
    /// How the answer is scored (`--score`; None: not scored).
    #[serde(default)]
    pub score: Option<crate::score::Score>,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub seed: u64,
    /// Measured requests; a run longer than this cycles through them.
    pub items: Vec<WorkItem>,
    pub warmup: Vec<WorkItem>,
    pub sampler: SamplerConfig,
    pub ignore_eos: bool,
    /// Things the user should know (e.g. prompts clamped to the context).
    pub notes: Vec<String>,
    /// Parameters, for the record.
    pub params: serde_json::Value,
}

// ---------------------------------------------------------------- datasets

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One line of a JSONL dataset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub expected: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Send `prompt` as is, without the chat template.
    #[serde(default)]
    pub raw: bool,
    /// Repeat `prompt` this many times (to build prompts longer than a context).
    #[serde(default)]
    pub repeat: Option<usize>,
    /// An id of the line's own choosing (kept in the tags as `id:...`).
    #[serde(default)]
    pub id: Option<String>,
    /// How `--score` judges the answer: exact, contains (the default), regex or choice.
    #[serde(default)]
    pub score: Option<String>,
    /// `score: choice`: the candidate answers (`expected` is the right one).
    #[serde(default)]
    pub options: Option<Vec<String>>,
}

/// Parse a JSONL dataset. Blank lines and lines starting with `//` are skipped;
/// any other malformed line is an error naming its line number.
pub fn parse_jsonl(text: &str, source_name: &str) -> Result<Vec<DatasetEntry>, WorkloadError> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with("//") {
            continue;
        }
        let err = |msg: String| WorkloadError::Line {
            source_name: source_name.to_string(),
            line: i + 1,
            msg,
        };
        let e: DatasetEntry = serde_json::from_str(l).map_err(|e| err(e.to_string()))?;
        match (&e.prompt, &e.messages) {
            (None, None) => return Err(err("needs \"prompt\" or \"messages\"".into())),
            (Some(_), Some(_)) => {
                return Err(err("has both \"prompt\" and \"messages\"; give one".into()));
            }
            (None, Some(m)) if m.is_empty() => return Err(err("\"messages\" is empty".into())),
            _ => {}
        }
        if e.repeat == Some(0) {
            return Err(err("\"repeat\" must be at least 1".into()));
        }
        crate::score::validate(
            e.score.as_deref(),
            e.expected.as_deref(),
            e.options.as_deref(),
        )
        .map_err(err)?;
        out.push(e);
    }
    if out.is_empty() {
        return Err(WorkloadError::File {
            source_name: source_name.to_string(),
            msg: "no requests in the file".into(),
        });
    }
    Ok(out)
}

/// ShareGPT: a JSON array (or JSONL) of `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`.
/// The first human turn (after any system turn) is the prompt; the reply that
/// follows becomes `expected`, and its length (in tokens, at build time) the
/// `max_tokens` unless capped.
pub fn parse_sharegpt(text: &str, source_name: &str) -> Result<Vec<DatasetEntry>, WorkloadError> {
    #[derive(Deserialize)]
    struct Turn {
        from: String,
        value: String,
    }
    #[derive(Deserialize)]
    struct Conv {
        conversations: Vec<Turn>,
    }
    let convs: Vec<(usize, Conv)> = if text.trim_start().starts_with('[') {
        let v: Vec<Conv> = serde_json::from_str(text).map_err(|e| WorkloadError::File {
            source_name: source_name.to_string(),
            msg: format!("not a ShareGPT JSON array: {e} (line {})", e.line()),
        })?;
        v.into_iter().enumerate().map(|(i, c)| (i + 1, c)).collect()
    } else {
        let mut v = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let c: Conv = serde_json::from_str(line).map_err(|e| WorkloadError::Line {
                source_name: source_name.to_string(),
                line: i + 1,
                msg: e.to_string(),
            })?;
            v.push((i + 1, c));
        }
        v
    };
    let mut out = vec![];
    for (n, c) in convs {
        let mut messages = vec![];
        let mut expected = None;
        for t in &c.conversations {
            match t.from.as_str() {
                "system" if messages.is_empty() => messages.push(Message {
                    role: "system".into(),
                    content: t.value.clone(),
                }),
                "human" | "user" if !messages.iter().any(|m: &Message| m.role == "user") => {
                    messages.push(Message {
                        role: "user".into(),
                        content: t.value.clone(),
                    })
                }
                "gpt" | "assistant" | "chatgpt" | "bard"
                    if messages.iter().any(|m| m.role == "user") =>
                {
                    expected = Some(t.value.clone());
                    break;
                }
                _ => {}
            }
        }
        if !messages.iter().any(|m| m.role == "user") {
            // Conversations without a human turn are skipped, as other tools do.
            log::debug!("{source_name}: conversation {n} has no human turn; skipped");
            continue;
        }
        out.push(DatasetEntry {
            messages: Some(messages),
            expected,
            tags: vec!["sharegpt".into()],
            ..Default::default()
        });
    }
    if out.is_empty() {
        return Err(WorkloadError::File {
            source_name: source_name.to_string(),
            msg: "no conversation with a human turn".into(),
        });
    }
    Ok(out)
}

/// How dataset entries become token ids.
pub struct DatasetOptions<'a> {
    pub template: Option<&'a ChatTemplate>,
    /// For entries without `max_tokens` (and no `expected` to size from).
    pub default_max_tokens: usize,
    /// Cap on every entry's max_tokens.
    pub max_tokens_cap: Option<usize>,
    /// Size a missing `max_tokens` from the length of `expected` (ShareGPT, whose `expected` is
    /// a reference reply, never scored).
    pub size_from_expected: bool,
    /// Attach how each entry with `expected` is scored (`--score`).
    pub score: bool,
}

pub fn build_dataset_items(
    entries: &[DatasetEntry],
    tok: &Tokenizer,
    o: &DatasetOptions,
) -> Result<Vec<WorkItem>, WorkloadError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let terr = |msg: String| WorkloadError::Tokenize { index, msg };
            let (text, templated) = match (&e.prompt, &e.messages, o.template) {
                (Some(p), _, tpl) => {
                    let p = p.repeat(e.repeat.unwrap_or(1));
                    match tpl {
                        Some(t) if !e.raw => (
                            t.render(&[ChatMessage::new("user", p)], true)
                                .map_err(|x| terr(x.to_string()))?,
                            true,
                        ),
                        _ => (p, false),
                    }
                }
                (None, Some(m), Some(t)) => {
                    let msgs: Vec<ChatMessage> = m
                        .iter()
                        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                        .collect();
                    (
                        t.render(&msgs, true).map_err(|x| terr(x.to_string()))?,
                        true,
                    )
                }
                (None, Some(m), None) => (
                    m.iter()
                        .map(|m| m.content.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    false,
                ),
                (None, None, _) => unreachable!("parse_jsonl checks"),
            };
            // A chat template writes BOS itself; special-token text is parsed as in `ember run`.
            let add_bos = !templated && !text.is_empty() && tok.add_bos_default();
            let prompt_tokens = tok
                .encode(&text, add_bos, true)
                .map_err(|x| terr(x.to_string()))?;
            let mut max_tokens = match (e.max_tokens, &e.expected) {
                (Some(n), _) => n,
                (None, Some(x)) if o.size_from_expected => tok
                    .encode(x, false, false)
                    .map(|v| v.len())
                    .unwrap_or(0)
                    .max(1),
                _ => o.default_max_tokens,
            };
            if let Some(c) = o.max_tokens_cap {
                max_tokens = max_tokens.min(c);
            }
            let mut tags = e.tags.clone();
            if let Some(id) = &e.id {
                tags.push(format!("id:{id}"));
            }
            let kind = crate::score::validate(
                e.score.as_deref(),
                e.expected.as_deref(),
                e.options.as_deref(),
            )
            .map_err(terr)?;
            let score = match (kind, &e.expected) {
                (Some(kind), Some(expected)) if o.score && !o.size_from_expected => {
                    let options = e.options.clone().unwrap_or_default();
                    // Each option as it would follow the prompt (no BOS, special text as text).
                    let option_tokens = options
                        .iter()
                        .map(|x| tok.encode(x, false, false).map_err(|x| terr(x.to_string())))
                        .collect::<Result<Vec<_>, _>>()?;
                    if option_tokens.iter().any(|t| t.is_empty()) {
                        return Err(terr("an option tokenizes to nothing".into()));
                    }
                    Some(crate::score::Score {
                        kind,
                        expected: expected.clone(),
                        options,
                        option_tokens,
                        chosen: None,
                    })
                }
                _ => None,
            };
            Ok(WorkItem {
                prompt_tokens,
                max_tokens,
                stop: e.stop.clone(),
                tags,
                expected: e.expected.clone(),
                score,
            })
        })
        .collect()
}

// ---------------------------------------------------------------- edit

/// One block of the `edit` preset: a code or text block and the small change asked of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditBlock {
    pub id: String,
    /// `code` or `text`.
    pub kind: String,
    /// The code fence's language (`rust`, `python`, `text`, ...).
    pub lang: String,
    /// The change, as an imperative ("Rename the variable `window` to `span`").
    pub task: String,
    /// Literal replacements (every occurrence, in order) that turn `block` into the answer.
    pub edits: Vec<(String, String)>,
    pub block: String,
}

impl EditBlock {
    /// The user turn: the task, then the block in a code fence. The model is asked for the
    /// whole block back and nothing else, so that its answer is the block copied with the
    /// change: the case prompt lookup and draft models are for.
    pub fn prompt(&self) -> String {
        let what = if self.kind == "code" { "code" } else { "text" };
        format!(
            "{task} in the following {what}. Reply with the complete {what} after the change, \
             in one code block, and nothing else.\n\n```{lang}\n{block}\n```",
            task = self.task,
            lang = self.lang,
            block = self.block,
        )
    }

    /// The block with the change made (the reply's content, without the fence).
    pub fn expected(&self) -> String {
        self.edits
            .iter()
            .fold(self.block.clone(), |b, (from, to)| b.replace(from, to))
    }
}

/// The shipped blocks, in file order.
pub fn edit_blocks() -> Result<Vec<EditBlock>, WorkloadError> {
    let mut out = vec![];
    for (i, line) in EDIT_BLOCKS.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with("//") {
            continue;
        }
        let b: EditBlock = serde_json::from_str(l).map_err(|e| WorkloadError::Line {
            source_name: "bench/data/edit.jsonl".into(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        out.push(b);
    }
    Ok(out)
}

/// Output tokens allowed beyond the block's own: the fence lines around the copy
/// (```` ```lang ```` and ```` ``` ````) and a short lead-in sentence some models write first.
pub const EDIT_SLACK_TOKENS: usize = 32;

/// An `edit` request as one model sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct EditPrompt {
    pub id: String,
    pub kind: String,
    /// The user turn through the chat template (or as is, without one).
    pub text: String,
    pub prompt_tokens: Vec<u32>,
    /// Tokens of the block alone (as it would follow the prompt).
    pub block_tokens: usize,
    /// The block with the change made.
    pub expected: String,
}

/// Every shipped block as a prompt for this tokenizer: through `template` when given (the
/// model's chat template: an instruct model answers a chat turn, and copies the block; as bare
/// text it tends to continue the prompt instead), else as bare text with BOS if the model
/// wants one.
pub fn edit_prompts(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<EditPrompt>, WorkloadError> {
    edit_blocks()?
        .into_iter()
        .enumerate()
        .map(|(index, b)| {
            let terr = |msg: String| WorkloadError::Tokenize { index, msg };
            let user = b.prompt();
            let text = match template {
                Some(t) => t
                    .render(&[ChatMessage::new("user", user)], true)
                    .map_err(|x| terr(x.to_string()))?,
                None => user,
            };
            // As for datasets: a chat template writes BOS itself.
            let add_bos = template.is_none() && tok.add_bos_default();
            let prompt_tokens = tok
                .encode(&text, add_bos, true)
                .map_err(|x| terr(x.to_string()))?;
            let block_tokens = tok
                .encode(&b.block, false, false)
                .map_err(|x| terr(x.to_string()))?
                .len();
            Ok(EditPrompt {
                id: b.id.clone(),
                kind: b.kind.clone(),
                text,
                prompt_tokens,
                block_tokens,
                expected: b.expected(),
            })
        })
        .collect()
}

/// The output budget of an edit request: the block's length plus [`EDIT_SLACK_TOKENS`], at
/// most `cap`. The copy ends with the model's end-of-generation token well before this, so the
/// budget only stops a model that does not stop.
pub fn edit_max_tokens(p: &EditPrompt, cap: usize) -> usize {
    (p.block_tokens + EDIT_SLACK_TOKENS).min(cap).max(1)
}

// ---------------------------------------------------------------- synthetic

/// Token ids of the corpus, cut into prompts of exact lengths.
pub struct Corpus {
    pub tokens: Vec<u32>,
    pub bos: Option<u32>,
}

impl Corpus {
    pub fn new(tok: &Tokenizer, text: &str) -> Corpus {
        let tokens = tok.encode(text, false, false).unwrap_or_default();
        assert!(!tokens.is_empty(), "corpus tokenizes to nothing");
        Corpus {
            tokens,
            bos: if tok.add_bos_default() {
                tok.bos_id()
            } else {
                None
            },
        }
    }

    /// Exactly `n` tokens: BOS (if the model wants one) then a window of the
    /// corpus starting at a seeded offset, wrapping around at the end.
    pub fn cut(&self, n: usize, rng: &mut Rng) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        if let Some(b) = self.bos {
            out.push(b);
        }
        let len = self.tokens.len();
        let start = (rng.next_u64() % len as u64) as usize;
        out.extend((0..n - out.len()).map(|i| self.tokens[(start + i) % len]));
        out
    }
}

/// A synthetic workload's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub name: String,
    /// Input tokens per request (after any shared prefix).
    pub input: LengthDist,
    pub output: LengthDist,
    /// Tokens of one system prompt shared by every request (shared-prefix).
    pub shared_prefix: usize,
}

impl SyntheticSpec {
    pub fn preset(name: &str) -> Result<SyntheticSpec, WorkloadError> {
        let s = |input, output, shared_prefix| SyntheticSpec {
            name: name.to_string(),
            input,
            output,
            shared_prefix,
        };
        use LengthDist::*;
        Ok(match name {
            // short in, short-to-medium out
            "chat" => s(
                Normal {
                    mean: 96.0,
                    sd: 48.0,
                    lo: 16,
                    hi: 256,
                },
                Uniform { lo: 32, hi: 96 },
                0,
            ),
            // ~2k in, short out: prefill-dominated
            "rag" => s(
                Normal {
                    mean: 2048.0,
                    sd: 128.0,
                    lo: 1792,
                    hi: 2304,
                },
                Uniform { lo: 16, hi: 48 },
                0,
            ),
            // short in, long out: decode-dominated
            "creative" => s(Uniform { lo: 16, hi: 64 }, Uniform { lo: 192, hi: 384 }, 0),
            // one 512-token system prompt, short user turns
            "shared-prefix" => s(Uniform { lo: 16, hi: 64 }, Uniform { lo: 32, hi: 64 }, 512),
            // Reproduce a block with a small change (see `build_edit`): the prompts are the
            // shipped blocks, whatever their length (`input` is unused); each answer's budget
            // is its block's length plus slack, at most `output`'s maximum.
            "edit" => s(Fixed { n: 0 }, Fixed { n: 512 }, 0),
            other => return Err(WorkloadError::Preset(other.to_string())),
        })
    }

    pub fn default_requests(&self) -> usize {
        match self.name.as_str() {
            "rag" => 4,
            "creative" => 8,
            // One pass over the shipped blocks.
            "edit" => 16,
            _ => 24,
        }
    }

    /// Build `n` measured and `n_warmup` warm-up requests, each prompt plus its
    /// output fitting `n_ctx` (prompts are clamped, with a note, when the
    /// model's context is too small for the preset).
    pub fn build(
        &self,
        corpus: &Corpus,
        n_ctx: usize,
        n: usize,
        n_warmup: usize,
        seed: u64,
        sampler: SamplerConfig,
    ) -> Workload {
        assert!(
            self.name != "edit",
            "the edit preset tokenizes its own blocks: build it with SyntheticSpec::build_for"
        );
        let mut notes = vec![];
        let out_max = self.output.max().min(n_ctx / 4).max(1);
        let output = self.output.capped(out_max);
        if output != self.output {
            notes.push(format!(
                "{}: output lengths capped at {out_max} tokens for the context of {n_ctx}",
                self.name
            ));
        }
        let room = n_ctx.saturating_sub(out_max + 1).max(2);
        let prefix_len = self.shared_prefix.min(room / 2);
        if prefix_len != self.shared_prefix {
            notes.push(format!("{}: shared prefix clamped from {} to {prefix_len} tokens to fit the context of {n_ctx}", self.name, self.shared_prefix));
        }
        let in_cap = room - prefix_len;
        let input = self.input.capped(in_cap);
        if input != self.input {
            notes.push(format!(
                "{}: prompts of up to {} tokens do not fit this model's context of {n_ctx} with {out_max} output tokens; clamped to at most {} tokens",
                self.name,
                self.input.max() + prefix_len,
                in_cap + prefix_len
            ));
        }
        let mut rng = Rng::new(seed);
        let prefix = corpus.cut(prefix_len, &mut rng);
        let suffix_corpus = Corpus {
            tokens: corpus.tokens.clone(),
            bos: None,
        };
        let make = |rng: &mut Rng| {
            let n_in = input.sample(rng).max(1);
            let mut p = prefix.clone();
            let c = if p.is_empty() { corpus } else { &suffix_corpus };
            p.extend(c.cut(n_in, rng));
            WorkItem {
                prompt_tokens: p,
                max_tokens: output.sample(rng).max(1),
                stop: vec![],
                tags: vec![self.name.clone()],
                expected: None,
                score: None,
            }
        };
        let items: Vec<WorkItem> = (0..n).map(|_| make(&mut rng)).collect();
        // Warm-ups fault in the weights and pools; they need not be long.
        let mut wrng = Rng::new(seed ^ 0x5EED_0A3D);
        let warmup: Vec<WorkItem> = (0..n_warmup)
            .map(|_| {
                let mut it = make(&mut wrng);
                it.prompt_tokens.truncate(256);
                it.max_tokens = it.max_tokens.min(16);
                it
            })
            .collect();
        Workload {
            name: self.name.clone(),
            seed,
            items,
            warmup,
            sampler,
            ignore_eos: true,
            notes,
            params: serde_json::json!({"input": input, "output": output, "shared_prefix": prefix_len, "n_ctx": n_ctx}),
        }
    }

    /// Build for a model: the `edit` preset from its blocks through the model's chat template
    /// (its own, or the built-in one [`ChatTemplate::from_metadata_or_builtin`] picks, as for
    /// datasets; bare text, with a note, when that does not parse or render), any other preset
    /// from the corpus ([`SyntheticSpec::build`]).
    #[allow(clippy::too_many_arguments)]
    pub fn build_for(
        &self,
        tok: &Tokenizer,
        md: &ember_runtime::gguf::Metadata,
        n_ctx: usize,
        n: usize,
        n_warmup: usize,
        seed: u64,
        sampler: SamplerConfig,
    ) -> Workload {
        if self.name != "edit" {
            let corpus = Corpus::new(tok, CORPUS);
            return self.build(&corpus, n_ctx, n, n_warmup, seed, sampler);
        }
        let templated = ChatTemplate::from_metadata_or_builtin(md)
            .map_err(|e| e.to_string())
            .and_then(|t| edit_prompts(tok, Some(&t)).map_err(|e| e.to_string()));
        let (prompts, note) = match templated {
            Ok(p) => (p, None),
            Err(e) => (
                edit_prompts(tok, None).expect("the shipped edit blocks parse"),
                Some(format!(
                    "{}: prompts sent as bare text: the chat template failed ({e})",
                    self.name
                )),
            ),
        };
        let mut w = self.build_edit(&prompts, n_ctx, n, n_warmup, seed, sampler);
        if let Some(p) = w.params.as_object_mut() {
            p.insert("templated".into(), note.is_none().into());
        }
        w.notes.extend(note);
        w
    }

    /// The `edit` preset from `prompts` ([`edit_prompts`]): each request asks for one of
    /// them, in a seeded order (every block once per pass, each pass shuffled anew).
    ///
    /// End-of-generation ends a request here (`ignore_eos` is false, unlike the other
    /// presets). The answer is the block copied with one change and then the model's
    /// end-of-turn token; generating past that token would measure the model rambling on
    /// (inventing new chat turns) rather than the copy, which is the very part speculation
    /// makes cheap or not. llama.cpp's `llama-lookup` stops at end-of-generation too, so the
    /// two compare on the same text. Output lengths therefore vary with what the model writes
    /// (bounded by [`edit_max_tokens`]); throughput is still tokens over time.
    ///
    /// Blocks whose prompt and answer do not fit `n_ctx` are left out (with a note); when none
    /// fits, the shortest is cut to fit (with a note: it then no longer holds the whole block).
    pub fn build_edit(
        &self,
        prompts: &[EditPrompt],
        n_ctx: usize,
        n: usize,
        n_warmup: usize,
        seed: u64,
        sampler: SamplerConfig,
    ) -> Workload {
        assert!(!prompts.is_empty(), "no edit prompts to build from");
        let mut notes = vec![];
        if self.input != (LengthDist::Fixed { n: 0 }) {
            notes.push(format!(
                "{}: input lengths do not apply; the prompts are the shipped blocks",
                self.name
            ));
        }
        let cap = self.output.max().max(1);
        let item = |p: &EditPrompt, prompt_tokens: Vec<u32>, max_tokens: usize| WorkItem {
            prompt_tokens,
            max_tokens,
            stop: vec![],
            tags: vec![self.name.clone(), p.kind.clone(), format!("id:{}", p.id)],
            expected: Some(p.expected.clone()),
            score: None,
        };
        let mut pool: Vec<WorkItem> = prompts
            .iter()
            .filter_map(|p| {
                let m = edit_max_tokens(p, cap);
                (p.prompt_tokens.len() + m < n_ctx).then(|| item(p, p.prompt_tokens.clone(), m))
            })
            .collect();
        if pool.len() < prompts.len() {
            notes.push(format!(
                "{}: {} of {} blocks do not fit the context of {n_ctx} with their answer; left out",
                self.name,
                prompts.len() - pool.len(),
                prompts.len()
            ));
        }
        if pool.is_empty() {
            let p = prompts
                .iter()
                .min_by_key(|p| p.prompt_tokens.len())
                .expect("edits is not empty");
            let m = edit_max_tokens(p, cap).min(n_ctx / 2).max(1);
            let keep = n_ctx.saturating_sub(m + 1).max(1);
            let mut t = p.prompt_tokens.clone();
            t.truncate(keep);
            notes.push(format!(
                "{}: no block fits the context of {n_ctx}; the shortest prompt ({} tokens) is cut to {} and the answer to {m} tokens",
                self.name,
                p.prompt_tokens.len(),
                t.len()
            ));
            pool.push(item(p, t, m));
        }
        // Seeded passes over the pool, each in a fresh order.
        let passes = |count: usize, rng: &mut Rng| -> Vec<WorkItem> {
            let mut out = Vec::with_capacity(count);
            while out.len() < count {
                let mut order: Vec<usize> = (0..pool.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                out.extend(
                    order
                        .into_iter()
                        .map(|i| pool[i].clone())
                        .take(count - out.len()),
                );
            }
            out
        };
        let mut rng = Rng::new(seed);
        let items = passes(n, &mut rng);
        // Warm-ups fault in the weights and pools; they need not be long. Their prompts stay
        // whole (cut, they would lose the template's assistant turn).
        let mut wrng = Rng::new(seed ^ 0x5EED_0A3D);
        let warmup = passes(n_warmup, &mut wrng)
            .into_iter()
            .map(|mut it| {
                it.max_tokens = it.max_tokens.min(16);
                it
            })
            .collect();
        Workload {
            name: self.name.clone(),
            seed,
            items,
            warmup,
            sampler,
            ignore_eos: false,
            notes,
            params: serde_json::json!({
                "blocks": pool.len(),
                "output_cap": cap,
                "slack_tokens": EDIT_SLACK_TOKENS,
                "n_ctx": n_ctx,
            }),
        }
    }
}

// ---------------------------------------------------------------- hash

/// sha256 (first 16 bytes, hex) over every request's prompt token ids and
/// output budget, the arrival schedule (the load spec, and the intended
/// arrival offsets where the load has them) and the sampling parameters.
pub fn workload_hash(w: &Workload, load: &LoadSpec, schedule: &[Ns]) -> String {
    let mut h = Sha256::new();
    h.update(b"ember-workload-v1");
    for (tag, items) in [(b'w', &w.warmup), (b'm', &w.items)] {
        h.update([tag]);
        h.update((items.len() as u64).to_le_bytes());
        for it in items.iter() {
            h.update((it.prompt_tokens.len() as u64).to_le_bytes());
            for t in &it.prompt_tokens {
                h.update(t.to_le_bytes());
            }
            h.update((it.max_tokens as u64).to_le_bytes());
            for s in &it.stop {
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
        }
    }
    h.update(serde_json::to_vec(load).unwrap_or_default());
    h.update((schedule.len() as u64).to_le_bytes());
    for t in schedule {
        h.update(t.to_le_bytes());
    }
    let s = &w.sampler;
    h.update(
        format!(
            "temp={};top_k={};top_p={};min_p={};rp={};rln={};seed={};ignore_eos={}",
            s.temperature,
            s.top_k,
            s.top_p,
            s.min_p,
            s.repeat_penalty,
            s.repeat_last_n,
            s.seed,
            w.ignore_eos
        )
        .as_bytes(),
    );
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_dists() {
        assert_eq!(
            LengthDist::parse("128").unwrap(),
            LengthDist::Fixed { n: 128 }
        );
        assert_eq!(
            LengthDist::parse("uniform:4:9").unwrap(),
            LengthDist::Uniform { lo: 4, hi: 9 }
        );
        assert!(LengthDist::parse("uniform:9:4").is_err());
        assert!(LengthDist::parse("normal:1:2").is_err());
        let d = LengthDist::parse("normal:100:30:80:120").unwrap();
        let mut rng = Rng::new(3);
        let v: Vec<usize> = (0..2000).map(|_| d.sample(&mut rng)).collect();
        assert!(v.iter().all(|&x| (80..=120).contains(&x)));
        let mean = v.iter().sum::<usize>() as f64 / v.len() as f64;
        assert!((mean - 100.0).abs() < 2.0, "{mean}");
        let u = LengthDist::Uniform { lo: 4, hi: 9 };
        let v: Vec<usize> = (0..600).map(|_| u.sample(&mut rng)).collect();
        assert!((4..=9).all(|k| v.contains(&k)) && v.iter().all(|&x| (4..=9).contains(&x)));
    }

    #[test]
    fn malformed_lines_are_named() {
        let text =
            "{\"prompt\": \"hi\"}\n\n// comment\n{\"prompt\": \"x\", \"max_tokens\": \"many\"}\n";
        let e = parse_jsonl(text, "d.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("d.jsonl:4:"), "{e}");
        let e = parse_jsonl("{\"prompt\":\"a\"}\n{\"tags\":[\"x\"]}\n", "d.jsonl")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "d.jsonl:2: needs \"prompt\" or \"messages\"");
        let e = parse_jsonl(
            "{\"prompt\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"b\"}]}",
            "d",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("d:1: has both"), "{e}");
        let e = parse_jsonl("not json", "d").unwrap_err().to_string();
        assert!(e.starts_with("d:1: "), "{e}");
        let e = parse_jsonl("{\"prompt\":\"a\",\"colour\":1}", "d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let ok = parse_jsonl("{\"messages\":[{\"role\":\"user\",\"content\":\"b\"}],\"max_tokens\":3,\"expected\":\"c\",\"tags\":[\"t\"]}", "d").unwrap();
        assert_eq!(ok[0].max_tokens, Some(3));
        assert_eq!(ok[0].tags, ["t"]);
    }

    #[test]
    fn sharegpt_import() {
        let text = r#"[{"conversations":[{"from":"system","value":"be brief"},{"from":"human","value":"hi"},{"from":"gpt","value":"hello there"},{"from":"human","value":"more"}]},
                      {"conversations":[{"from":"gpt","value":"orphan"}]}]"#;
        let v = parse_sharegpt(text, "s.json").unwrap();
        assert_eq!(v.len(), 1);
        let m = v[0].messages.as_ref().unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[1].content.as_str()),
            ("system", "hi")
        );
        assert_eq!(v[0].expected.as_deref(), Some("hello there"));
        let e = parse_sharegpt("{\"conversations\":[]}\n{oops}\n", "s.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.jsonl:2:"), "{e}");
    }

    #[test]
    fn shipped_eval_set_parses() {
        let v = parse_jsonl(EVAL_SET, "eval.jsonl").unwrap();
        assert!(v.len() >= 100, "{}", v.len());
        assert!(v.iter().all(|e| !e.tags.is_empty()));
        for tag in [
            "empty",
            "one-token",
            "over-context",
            "unicode",
            "emoji",
            "mixed-script",
            "code",
            "stop",
            "special-tokens",
        ] {
            assert!(
                v.iter().any(|e| e.tags.iter().any(|t| t == tag)),
                "no prompt tagged {tag}"
            );
        }
    }

    /// The embedded test model's tokenizer and metadata (it has a ChatML template).
    fn embedded() -> (Tokenizer, ember_runtime::gguf::Metadata) {
        let dir = std::env::temp_dir().join(format!("ember-workload-test-{}", std::process::id()));
        let (path, _) = ember_runtime::embedded::ensure_in(&dir).unwrap();
        let file = ember_runtime::gguf::GgufFile::open(&path).unwrap();
        (
            Tokenizer::from_gguf(&file.metadata).unwrap(),
            file.metadata.clone(),
        )
    }

    #[test]
    fn shipped_edit_blocks_are_sound() {
        let v = edit_blocks().unwrap();
        assert!(v.len() >= 12, "{}", v.len());
        let mut ids: Vec<&str> = v.iter().map(|b| b.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), v.len(), "ids are not unique");
        for kind in ["code", "text"] {
            assert!(
                v.iter().filter(|b| b.kind == kind).count() >= 4,
                "few {kind} blocks"
            );
        }
        for b in &v {
            assert!(!b.edits.is_empty(), "{}", b.id);
            let expected = b.expected();
            assert_ne!(expected, b.block, "{}: the edit changes nothing", b.id);
            for (from, _) in &b.edits {
                assert!(b.block.contains(from.as_str()), "{}: no {from:?}", b.id);
                assert!(!expected.contains(from.as_str()), "{}: {from:?} left", b.id);
            }
            // A small change: the answer is mostly the block.
            let d = expected.len().abs_diff(b.block.len());
            assert!(d * 10 < b.block.len(), "{}: {d} bytes changed", b.id);
            let p = b.prompt();
            assert!(p.starts_with(&b.task) && p.contains(&b.block), "{}", b.id);
            assert!(p.ends_with(&format!("```{}\n{}\n```", b.lang, b.block)));
        }
    }

    #[test]
    fn edit_preset_builds_through_the_chat_template() {
        let (tok, md) = embedded();
        let spec = SyntheticSpec::preset("edit").unwrap();
        assert_eq!(spec.default_requests(), edit_blocks().unwrap().len());
        let w = spec.build_for(&tok, &md, 2048, 20, 2, 7, SamplerConfig::greedy());
        assert_eq!((w.items.len(), w.warmup.len()), (20, 2));
        assert!(!w.ignore_eos, "the copy ends at end-of-generation");
        assert_eq!(w.params["templated"], true);
        assert!(w.notes.is_empty(), "{:?}", w.notes);
        let blocks = edit_blocks().unwrap();
        let bare = edit_prompts(&tok, None).unwrap();
        let tpl = ChatTemplate::from_metadata_or_builtin(&md).unwrap();
        let chat = edit_prompts(&tok, Some(&tpl)).unwrap();
        for it in &w.items {
            let id = it.tags.iter().find_map(|t| t.strip_prefix("id:")).unwrap();
            let i = blocks.iter().position(|b| b.id == id).unwrap();
            let text = tok.decode_with_special(&it.prompt_tokens, true);
            assert!(
                text.contains(&blocks[i].block),
                "{id}: block not in the prompt"
            );
            // The chat template's turn, not the bare request.
            assert_eq!(it.prompt_tokens, chat[i].prompt_tokens, "{id}");
            assert!(text.contains("<|im_start|>assistant"), "{id}: {text}");
            assert!(it.prompt_tokens.len() > bare[i].prompt_tokens.len(), "{id}");
            // The embedded model's tokens are bytes: blocks are long, and the 512 cap bites.
            assert_eq!(it.max_tokens, edit_max_tokens(&chat[i], 512), "{id}");
            assert!(it.max_tokens <= chat[i].block_tokens + EDIT_SLACK_TOKENS);
            assert_eq!(it.expected.as_deref(), Some(blocks[i].expected().as_str()));
            assert_eq!(it.tags[..2], ["edit".to_string(), blocks[i].kind.clone()]);
        }
        // One pass visits every block once before any repeats.
        let mut first: Vec<&String> = w.items[..blocks.len()].iter().map(|i| &i.tags[2]).collect();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), blocks.len());
        assert!(
            w.warmup
                .iter()
                .all(|i| i.max_tokens <= 16
                    && chat.iter().any(|p| p.prompt_tokens == i.prompt_tokens))
        );
        // Seeded: the same seed builds the same requests, another seed another order.
        let again = spec.build_for(&tok, &md, 2048, 20, 2, 7, SamplerConfig::greedy());
        assert_eq!(w.items, again.items);
        assert_eq!(w.warmup, again.warmup);
        let other = spec.build_for(&tok, &md, 2048, 20, 2, 8, SamplerConfig::greedy());
        assert_ne!(w.items, other.items);
        // --max-tokens caps the budget.
        let mut capped = spec.clone();
        capped.output = capped.output.capped(40);
        let c = capped.build_for(&tok, &md, 2048, 4, 0, 7, SamplerConfig::greedy());
        assert!(c.items.iter().all(|i| i.max_tokens == 40));
    }

    #[test]
    fn edit_preset_fits_the_context() {
        let (tok, md) = embedded();
        let spec = SyntheticSpec::preset("edit").unwrap();
        let full = spec.build_for(&tok, &md, 4096, 16, 0, 1, SamplerConfig::greedy());
        let longest = full
            .items
            .iter()
            .map(|i| i.prompt_tokens.len() + i.max_tokens)
            .max()
            .unwrap();
        let shortest = full
            .items
            .iter()
            .map(|i| i.prompt_tokens.len() + i.max_tokens)
            .min()
            .unwrap();
        // A context between the two: some blocks are left out, with a note.
        let n_ctx = (longest + shortest) / 2;
        let w = spec.build_for(&tok, &md, n_ctx, 16, 0, 1, SamplerConfig::greedy());
        assert!(
            w.items
                .iter()
                .all(|i| i.prompt_tokens.len() + i.max_tokens < n_ctx)
        );
        assert!((1..16).contains(&w.params["blocks"].as_u64().unwrap()));
        assert!(
            w.notes.iter().any(|n| n.contains("left out")),
            "{:?}",
            w.notes
        );
        // Smaller than any: the shortest, cut to fit.
        let w = spec.build_for(&tok, &md, 64, 3, 0, 1, SamplerConfig::greedy());
        assert_eq!(w.items.len(), 3);
        assert!(
            w.items
                .iter()
                .all(|i| i.prompt_tokens.len() + i.max_tokens < 64)
        );
        assert!(
            w.notes.iter().any(|n| n.contains("is cut")),
            "{:?}",
            w.notes
        );
    }

    #[test]
    #[should_panic(expected = "build_for")]
    fn edit_needs_the_tokenizer() {
        let corpus = Corpus {
            tokens: vec![5; 100],
            bos: None,
        };
        let spec = SyntheticSpec::preset("edit").unwrap();
        spec.build(&corpus, 2048, 1, 0, 1, SamplerConfig::greedy());
    }

    /// With a real instruct model's tokenizer (skipped when models/fetch.sh has not run): the
    /// blocks are 80 to 300 tokens, so that the copy dominates each answer.
    #[test]
    fn edit_block_lengths_with_a_real_tokenizer() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
        if !path.exists() {
            eprintln!("skipped: {} not fetched", path.display());
            return;
        }
        let file = ember_runtime::gguf::GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&file.metadata).unwrap();
        let tpl = ChatTemplate::from_metadata_or_builtin(&file.metadata).unwrap();
        for p in edit_prompts(&tok, Some(&tpl)).unwrap() {
            assert!(
                (80..=300).contains(&p.block_tokens),
                "{}: {}",
                p.id,
                p.block_tokens
            );
            // The block is most of the prompt: the instruction and template are small.
            assert!(p.prompt_tokens.len() < p.block_tokens + 100, "{}", p.id);
            // The preset's cap does not bite: each answer may be its block plus the slack.
            let cap = SyntheticSpec::preset("edit").unwrap().output.max();
            assert_eq!(edit_max_tokens(&p, cap), p.block_tokens + EDIT_SLACK_TOKENS);
        }
    }
}
