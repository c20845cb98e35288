//! Task accuracy: a dataset entry with `expected` is scored (`ember bench --dataset … --score`).
//!
//! Kinds (`"score"` in the entry; default `contains` where `expected` is given):
//! - `exact`: the answer, normalized, is `expected`, normalized. Normalizing lowercases,
//!   collapses whitespace and trims surrounding whitespace, quotes and final punctuation.
//! - `contains`: the normalized answer contains the normalized `expected`, as a whole word
//!   sequence (so "366" is not found in "1366").
//! - `regex`: `expected` is a regular expression (Rust `regex` syntax) found in the raw answer.
//! - `choice`: `options` lists the candidate answers and `expected` is the right one; the
//!   model ranks the options by the log-probability of each option's tokens after the prompt
//!   (summed), without generating, as multiple-choice evaluations do. Decided in-process
//!   before the run ([`choose`]); the generated text is still measured for latency.
//!
//! Accuracy is reported with a 95% Wilson score interval.

use serde::{Deserialize, Serialize};

use ember_runtime::engine::Engine;
use ember_runtime::model::{LogitsWanted, ModelError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    Exact,
    Contains,
    Regex,
    Choice,
}

impl ScoreKind {
    pub const NAMES: &'static str = "exact, contains, regex, choice";

    pub fn parse(s: &str) -> Option<ScoreKind> {
        Some(match s {
            "exact" => ScoreKind::Exact,
            "contains" => ScoreKind::Contains,
            "regex" => ScoreKind::Regex,
            "choice" => ScoreKind::Choice,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::Exact => "exact",
            ScoreKind::Contains => "contains",
            ScoreKind::Regex => "regex",
            ScoreKind::Choice => "choice",
        }
    }
}

/// How one workload item is scored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub kind: ScoreKind,
    pub expected: String,
    /// `choice`: the options, the right one among them.
    #[serde(default)]
    pub options: Vec<String>,
    /// `choice`: the options' token ids (each as it follows the prompt).
    #[serde(default)]
    pub option_tokens: Vec<Vec<u32>>,
    /// `choice`: decided by [`choose`] before the run.
    #[serde(default)]
    pub chosen: Option<usize>,
}

/// Check a dataset entry's scoring fields; the message names what is wrong.
pub fn validate(
    kind: Option<&str>,
    expected: Option<&str>,
    options: Option<&[String]>,
) -> Result<Option<ScoreKind>, String> {
    let Some(expected) = expected else {
        return match (kind, options) {
            (Some(k), _) => Err(format!("\"score\": \"{k}\" needs an \"expected\" answer")),
            (None, Some(_)) => {
                Err("\"options\" needs \"score\": \"choice\" and \"expected\"".into())
            }
            (None, None) => Ok(None),
        };
    };
    let kind = match kind {
        None => ScoreKind::Contains,
        Some(k) => ScoreKind::parse(k).ok_or_else(|| {
            format!(
                "unknown \"score\" kind '{k}' (ember knows {})",
                ScoreKind::NAMES
            )
        })?,
    };
    match kind {
        ScoreKind::Regex => {
            regex::Regex::new(expected)
                .map_err(|e| format!("\"expected\" is not a valid regex: {e}"))?;
        }
        ScoreKind::Choice => {
            let opts = options.unwrap_or_default();
            if opts.len() < 2 {
                return Err(
                    "\"score\": \"choice\" needs \"options\" with at least two answers".into(),
                );
            }
            if !opts.iter().any(|o| o == expected) {
                return Err(format!(
                    "\"expected\" ('{expected}') is not one of the \"options\""
                ));
            }
        }
        _ if options.is_some() => {
            return Err("\"options\" is only for \"score\": \"choice\"".into());
        }
        _ => {}
    }
    Ok(Some(kind))
}

/// Lowercase, whitespace collapsed, surrounding quotes and final punctuation trimmed.
pub fn normalize(s: &str) -> String {
    let words: Vec<String> = s.split_whitespace().map(str::to_lowercase).collect();
    let joined = words.join(" ");
    joined
        .trim_matches(|c: char| c.is_whitespace() || "\"'`“”‘’".contains(c))
        .trim_end_matches(|c: char| ".!?,;:".contains(c))
        .trim_matches(|c: char| c.is_whitespace() || "\"'`“”‘’".contains(c))
        .to_string()
}

/// `needle` in `hay` with word boundaries on both sides (alphanumerics do not continue it).
fn contains_words(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    hay.match_indices(needle).any(|(i, m)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + m.len()..].chars().next();
        let starts_word = is_word(needle.chars().next());
        let ends_word = is_word(needle.chars().next_back());
        let glued_before = starts_word && is_word(before);
        let glued_after = ends_word && is_word(after);
        !glued_before && !glued_after
    })
}

impl Score {
    /// Whether `answer` (the generated text) is right. `choice` uses its decided option.
    pub fn judge(&self, answer: &str) -> bool {
        match self.kind {
            ScoreKind::Exact => normalize(answer) == normalize(&self.expected),
            ScoreKind::Contains => contains_words(&normalize(answer), &normalize(&self.expected)),
            ScoreKind::Regex => regex::Regex::new(&self.expected)
                .map(|r| r.is_match(answer))
                .unwrap_or(false),
            ScoreKind::Choice => self
                .chosen
                .is_some_and(|i| self.options.get(i) == Some(&self.expected)),
        }
    }
}

/// The option the model finds most likely after `prompt`: each option's tokens are scored by
/// the sum of their log-probabilities (one forward pass over prompt + option on a fresh cache).
pub fn choose(engine: &Engine, prompt: &[u32], options: &[Vec<u32>]) -> Result<usize, ModelError> {
    let n_vocab = engine.model.config().n_vocab;
    let mut best = (f64::NEG_INFINITY, 0);
    let mut logits = Vec::new();
    for (i, opt) in options.iter().enumerate() {
        let mut kv = engine.new_cache();
        let mut tokens = prompt.to_vec();
        tokens.extend_from_slice(opt);
        // Logits of the positions that predict the option's tokens: the prompt's last onward.
        let split = prompt.len() - 1;
        engine.forward(&tokens[..split], &mut kv, LogitsWanted::None, &mut logits)?;
        engine.forward(
            &tokens[split..tokens.len() - 1],
            &mut kv,
            LogitsWanted::All,
            &mut logits,
        )?;
        let lp: f64 = logits
            .chunks(n_vocab)
            .zip(opt)
            .map(|(row, &t)| {
                let (max, _, shift) = crate::eval::row_softmax(row);
                row[t as usize] as f64 - max as f64 - shift
            })
            .sum();
        if lp > best.0 {
            best = (lp, i);
        }
    }
    Ok(best.1)
}

/// Accuracy over scored requests with its 95% Wilson score interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

impl Accuracy {
    pub fn of(correct: usize, n: usize) -> Option<Accuracy> {
        if n == 0 {
            return None;
        }
        let (nf, p) = (n as f64, correct as f64 / n as f64);
        let z = 1.959_963_984_540_054_f64;
        let z2 = z * z;
        let centre = (p + z2 / (2.0 * nf)) / (1.0 + z2 / nf);
        let half = z / (1.0 + z2 / nf) * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
        Some(Accuracy {
            n,
            correct,
            accuracy: p,
            ci95_low: (centre - half).max(0.0),
            ci95_high: (centre + half).min(1.0),
        })
    }

    /// Over the `correct` flags of the scored requests (None: not scored).
    pub fn over<'a>(flags: impl IntoIterator<Item = &'a Option<bool>>) -> Option<Accuracy> {
        let (mut n, mut c) = (0, 0);
        for f in flags.into_iter().flatten() {
            n += 1;
            c += *f as usize;
        }
        Accuracy::of(c, n)
    }

    /// "12/26 = 46.2% (95% CI 28.8–64.5%)".
    pub fn text(&self) -> String {
        format!(
            "{}/{} = {:.1}% (95% CI {:.1}–{:.1}%)",
            self.correct,
            self.n,
            100.0 * self.accuracy,
            100.0 * self.ci95_low,
            100.0 * self.ci95_high
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: ScoreKind, expected: &str) -> Score {
        Score {
            kind,
            expected: expected.into(),
            options: vec![],
            option_tokens: vec![],
            chosen: None,
        }
    }

    #[test]
    fn each_kind_judges_as_documented() {
        let exact = s(ScoreKind::Exact, "Canberra");
        assert!(exact.judge("  canberra. "));
        assert!(exact.judge("\"Canberra\""));
        assert!(!exact.judge("The capital is Canberra."));
        let contains = s(ScoreKind::Contains, "366");
        assert!(contains.judge("A leap year has 366 days."));
        assert!(
            !contains.judge("It has 1366 days"),
            "a number inside another is no match"
        );
        assert!(!contains.judge("365"));
        assert!(s(ScoreKind::Contains, "Bonsoir").judge("In French: \"bonsoir!\""));
        let re = s(ScoreKind::Regex, r"\b(102|one hundred and two)\b");
        assert!(re.judge("17 x 6 = 102"));
        assert!(!re.judge("1020"));
        let mut choice = s(ScoreKind::Choice, "Paris");
        choice.options = vec!["Lyon".into(), "Paris".into()];
        assert!(
            !choice.judge("Paris"),
            "choice ignores the text: undecided is wrong"
        );
        choice.chosen = Some(1);
        assert!(choice.judge(""));
        choice.chosen = Some(0);
        assert!(!choice.judge("Paris"));
    }

    #[test]
    fn bad_scoring_fields_are_refused_with_a_reason() {
        assert_eq!(validate(None, None, None), Ok(None));
        assert_eq!(
            validate(None, Some("x"), None),
            Ok(Some(ScoreKind::Contains))
        );
        let e = validate(Some("fuzzy"), Some("x"), None).unwrap_err();
        assert!(e.contains("unknown \"score\" kind 'fuzzy'"), "{e}");
        assert!(
            validate(Some("exact"), None, None)
                .unwrap_err()
                .contains("needs an \"expected\"")
        );
        assert!(
            validate(Some("regex"), Some("(unclosed"), None)
                .unwrap_err()
                .contains("not a valid regex")
        );
        let two = ["a".to_string(), "b".to_string()];
        assert_eq!(
            validate(Some("choice"), Some("a"), Some(&two)),
            Ok(Some(ScoreKind::Choice))
        );
        assert!(
            validate(Some("choice"), Some("c"), Some(&two))
                .unwrap_err()
                .contains("not one of")
        );
        assert!(
            validate(Some("choice"), Some("a"), Some(&two[..1]))
                .unwrap_err()
                .contains("at least two")
        );
        assert!(
            validate(Some("exact"), Some("a"), Some(&two))
                .unwrap_err()
                .contains("only for")
        );
    }

    #[test]
    fn wilson_interval() {
        // 8 of 10: Wilson 95% interval 0.490–0.943.
        let a = Accuracy::of(8, 10).unwrap();
        assert!(
            (a.ci95_low - 0.4902).abs() < 1e-3 && (a.ci95_high - 0.9433).abs() < 1e-3,
            "{a:?}"
        );
        let all = Accuracy::of(5, 5).unwrap();
        assert_eq!(all.ci95_high, 1.0);
        assert!(all.ci95_low > 0.5 && all.ci95_low < 0.6, "{all:?}");
        assert!(Accuracy::of(0, 0).is_none());
        let flags = [Some(true), None, Some(false), Some(true)];
        let a = Accuracy::over(&flags).unwrap();
        assert_eq!((a.n, a.correct), (3, 2));
        assert_eq!(
            Accuracy::of(12, 26).unwrap().text(),
            "12/26 = 46.2% (95% CI 28.8–64.5%)"
        );
    }
}
