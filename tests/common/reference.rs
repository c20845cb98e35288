//! llama.cpp's reference fixtures (`tests/fixtures/*.json`, made by `tools/llama-ref`) and the
//! comparison of ember's logits with them: what a test against llama.cpp checks at every
//! position of a case, whatever model it is about.

use std::path::Path;

use ember_runtime::engine::{Engine, GenerateRequest};
use ember_runtime::model::LogitsWanted;
use ember_runtime::sample::SamplerConfig;
use serde::Deserialize;

/// Top-1 must agree wherever llama.cpp's top-1/top-2 margin is at least this.
pub const MARGIN: f32 = 1.0;

/// How far ember may be from llama.cpp.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// |Δ| of the logit of each of llama.cpp's top-8 ids.
    pub logit: f32,
    /// |Δ| of the logsumexp of the whole row.
    pub logsumexp: f32,
}

#[derive(Deserialize)]
pub struct Reference {
    pub model_sha256: String,
    pub n_vocab: usize,
    /// How to rebuild the model file and the fixture, where the fixture says.
    #[serde(default)]
    pub regenerate: Option<String>,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub prompt: String,
    pub add_bos: bool,
    /// The context llama.cpp ran the case in (fixtures from before refdump printed it: none).
    #[serde(default)]
    pub n_ctx: Option<usize>,
    pub prompt_tokens: Vec<u32>,
    pub greedy_tokens: Vec<u32>,
    pub top_logits_per_position: Vec<Top>,
}

#[derive(Deserialize)]
pub struct Top {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub logsumexp: f32,
}

impl Top {
    pub fn margin(&self) -> f32 {
        self.logits[0] - self.logits[1]
    }
}

pub fn read_reference(path: &Path) -> Reference {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// The worst deviation seen and where.
#[derive(Default)]
pub struct Worst {
    pub value: f32,
    pub at: String,
}

impl Worst {
    pub fn see(&mut self, v: f32, at: impl FnOnce() -> String) {
        if v > self.value {
            self.value = v;
            self.at = at();
        }
    }
}

/// A prompt, shortened for messages.
pub fn short(prompt: &str) -> String {
    let p: String = prompt.chars().take(40).collect();
    if p.len() < prompt.len() {
        format!("{p:?}…")
    } else {
        format!("{p:?}")
    }
}

/// What comparing cases found: the worst deviations and every failure.
#[derive(Default)]
pub struct Outcome {
    pub worst: Worst,
    pub worst_lse: Worst,
    /// Positions where llama.cpp's margin is at least [`MARGIN`], so the top-1 was compared.
    pub top1_checked: usize,
    pub failures: Vec<String>,
    /// What was seen but tolerated or is only worth a look: decode steps that part from
    /// llama.cpp at one of its near-ties, how far free-running greedy follows llama.cpp.
    pub notes: Vec<String>,
}

/// One case at every position: the tokenizer must give llama.cpp's prompt tokens; then the
/// prompt and llama.cpp's greedy tokens go through `engine` in one prefill, and at every
/// position ember's logit for each of llama.cpp's top-8 ids must be within `b.logit`, the
/// logsumexp of ember's whole row within `b.logsumexp`, and ember's top-1 llama.cpp's wherever
/// llama.cpp's margin is at least [`MARGIN`]. Returns the worst |Δlogit| over llama.cpp's top-8
/// at each position, to see whether the deviation grows with the context.
pub fn compare_positions(
    engine: &Engine,
    case: &Case,
    n_vocab: usize,
    b: Bounds,
    out: &mut Outcome,
) -> Vec<f32> {
    let name = short(&case.prompt);
    let ours = engine
        .tokenizer
        .encode(&case.prompt, case.add_bos, true)
        .unwrap();
    if ours != case.prompt_tokens {
        out.failures.push(format!(
            "{name}: ember tokenizes the prompt as {ours:?}, llama.cpp as {:?}",
            case.prompt_tokens
        ));
    }
    let all: Vec<u32> = case
        .prompt_tokens
        .iter()
        .chain(&case.greedy_tokens)
        .copied()
        .collect();
    let mut kv = engine.new_cache();
    let mut logits = Vec::new();
    engine
        .forward(&all, &mut kv, LogitsWanted::All, &mut logits)
        .unwrap();
    assert_eq!(logits.len(), all.len() * n_vocab, "{name}: logits shape");
    let mut per_position = vec![0f32; case.top_logits_per_position.len()];
    for (i, top) in case.top_logits_per_position.iter().enumerate() {
        let row = &logits[i * n_vocab..(i + 1) * n_vocab];
        for (&id, &want) in top.ids.iter().zip(&top.logits) {
            let d = (row[id as usize] - want).abs();
            per_position[i] = per_position[i].max(d);
            out.worst.see(d, || format!("{name} position {i} id {id}"));
            if d > b.logit || d.is_nan() {
                out.failures.push(format!(
                    "{name} position {i}: logit of id {id} is {}, llama.cpp {want} (|Δ| {d:.3} > {})",
                    row[id as usize], b.logit
                ));
            }
        }
        let lse = logsumexp(row) as f32;
        let d = (lse - top.logsumexp).abs();
        out.worst_lse.see(d, || format!("{name} position {i}"));
        if d > b.logsumexp || d.is_nan() {
            out.failures.push(format!(
                "{name} position {i}: logsumexp of the row is {lse}, llama.cpp {} (|Δ| {d:.3} > {})",
                top.logsumexp, b.logsumexp
            ));
        }
        if top.margin() >= MARGIN {
            out.top1_checked += 1;
            let argmax = ember_runtime::sample::argmax(row);
            if argmax != top.ids[0] {
                out.failures.push(format!(
                    "{name} position {i}: top-1 is {argmax}, llama.cpp {} (its margin {:.3})",
                    top.ids[0],
                    top.margin()
                ));
            }
        }
    }
    per_position
}

/// The largest of each `span` consecutive values (the last span may be shorter).
pub fn worst_per_span(values: &[f32], span: usize) -> Vec<f32> {
    values
        .chunks(span)
        .map(|c| c.iter().copied().fold(0f32, f32::max))
        .collect()
}

/// The decode path (one token per step) on the first `steps` of llama.cpp's greedy tokens,
/// teacher-forced: ember's argmax must be llama.cpp's token at each, except where llama.cpp's
/// own margin there is under `near_tie`.
pub fn compare_decode(
    engine: &Engine,
    case: &Case,
    steps: usize,
    near_tie: f32,
    out: &mut Outcome,
) {
    let name = short(&case.prompt);
    let n = steps.min(case.greedy_tokens.len());
    let np = case.prompt_tokens.len();
    let mut kv = engine.new_cache();
    let mut logits = Vec::new();
    engine
        .forward(
            &case.prompt_tokens,
            &mut kv,
            LogitsWanted::Last,
            &mut logits,
        )
        .unwrap();
    for i in 0..n {
        let want = case.greedy_tokens[i];
        let margin = case.top_logits_per_position[np - 1 + i].margin();
        let got = ember_runtime::sample::argmax(&logits);
        if got != want {
            if margin >= near_tie {
                out.failures.push(format!(
                    "{name}: decode step {i} (teacher-forced) picks {got}, llama.cpp {want} (its margin {margin:.3})"
                ));
            } else {
                out.notes.push(format!(
                    "{name}: decode step {i}: near-tie (llama.cpp margin {margin:.3}): ours {got}, llama.cpp {want}"
                ));
            }
        }
        engine
            .forward(&[want], &mut kv, LogitsWanted::Last, &mut logits)
            .unwrap();
    }
}

/// Free-running greedy generation (`Engine::generate`): ember's continuation must be llama.cpp's
/// greedy tokens for the first `prefix`, unless the two part at a token where llama.cpp's own
/// margin is under `near_tie` (after that the contexts differ and nothing more is compared).
/// How far the two agree goes into `out.notes`.
pub fn compare_free_running(
    engine: &Engine,
    case: &Case,
    prefix: usize,
    near_tie: f32,
    out: &mut Outcome,
) {
    let name = short(&case.prompt);
    let np = case.prompt_tokens.len();
    let req = GenerateRequest {
        prompt_tokens: case.prompt_tokens.clone(),
        max_tokens: case.greedy_tokens.len(),
        sampler: SamplerConfig::greedy(),
        stop_strings: vec![],
        top_logprobs: 0,
        echo: false,
        ignore_eos: false,
    };
    let g = engine.generate(&req, &mut |_| {}).unwrap();
    let same = g
        .generated_tokens
        .iter()
        .zip(&case.greedy_tokens)
        .take_while(|(a, b)| a == b)
        .count();
    let parted = if same < case.greedy_tokens.len() {
        let margin = case.top_logits_per_position[np - 1 + same].margin();
        if same < prefix && margin >= near_tie {
            out.failures.push(format!(
                "{name}: free-running greedy parts from llama.cpp's at token {same} \
                 (ours {:?}, llama.cpp {}, its margin {margin:.3})",
                g.generated_tokens.get(same),
                case.greedy_tokens[same]
            ));
        }
        format!(", parted at llama.cpp margin {margin:.3}")
    } else {
        String::new()
    };
    out.notes.push(format!(
        "{name}: free-running greedy matches llama.cpp for {same}/{} tokens{parted}",
        case.greedy_tokens.len()
    ));
}
