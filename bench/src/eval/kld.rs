//! KL divergence of a model against a higher-precision base of the same model, token by token
//! on the scored positions of [`Chunks`], with the statistics `llama-perplexity
//! --kl-divergence` reports.
//!
//! The base's distributions are kept compact ([`BaseLogits`]): per scored token, the base's
//! top-k log-probabilities and its negative log-likelihood of the text's token. The KL sum
//! runs over those k tokens exactly and over the rest of the vocabulary as one bin
//! (`p_rest · ln(p_rest / q_rest)`, where `p_rest = 1 − Σ top-k p` and `q_rest` is the
//! model's probability of the same set). The bin is a lower bound of the rest's true share
//! (log-sum inequality), and small models spread real mass over thousands of tokens: on
//! Qwen2.5-Coder-0.5B Q4_K_M against a Q4_0 of it (ctx 128), the mean KLD was 0.0788 with
//! k = 32, 0.0948 with 256, 0.1023 with 4096 and 0.1035 with 40,000. Hence the default
//! k = 4096 (32 KiB per scored token on disk; `llama-perplexity`'s own base file keeps the
//! whole vocabulary, 297 KiB per token for Qwen's 151,936), and `--top-k 0` keeps every token
//! (exact). The mean mass left in the bin is reported (`base_rest_mass`).

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use ember_runtime::engine::Engine;

use super::ppl::NllSums;
use super::{Chunks, EvalError, chunk_logits, mean_and_stderr, quantile, row_softmax};

/// What identifies the base model and the text its logits were computed on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseHeader {
    /// The base model's file name and sha256.
    pub model: String,
    pub model_sha256: String,
    /// [`super::vocab_sha256`] of the base's tokenizer.
    pub vocab_sha256: String,
    pub n_vocab: usize,
    pub ctx: usize,
    pub n_chunks: usize,
    pub top_k: usize,
    /// The BOS each chunk starts with, if the model adds one.
    pub bos: Option<u32>,
    /// Tokens in the whole text the chunks were cut from.
    pub text_tokens: usize,
}

/// A base model's distributions on the scored positions of a text.
#[derive(Clone, Debug)]
pub struct BaseLogits {
    pub header: BaseHeader,
    /// The chunks' tokens (`n_chunks * ctx`).
    pub tokens: Vec<u32>,
    /// Per scored token: the base's negative log-likelihood of the text's next token.
    pub nll: Vec<f32>,
    /// Per scored token, `top_k` (id, log-probability) pairs, most likely first.
    pub top: Vec<(u32, f32)>,
}

const MAGIC: &[u8; 8] = b"EMBERKLD";
const VERSION: u32 = 1;

/// The `k` most likely ids of a row with their log-probabilities (logit − logsumexp), most
/// likely first (ties: lower id first).
fn top_k(row: &[f32], lse: f64, k: usize) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let k = k.min(row.len());
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by);
        ids.truncate(k);
    }
    ids.sort_unstable_by(by);
    ids.iter()
        .map(|&i| (i, (row[i as usize] as f64 - lse) as f32))
        .collect()
}

impl BaseLogits {
    /// Run `engine` (the base model) over `chunks`, keeping the top `k` of each scored row.
    pub fn compute(
        engine: &Engine,
        chunks: &Chunks,
        k: usize,
        batch: usize,
        header: BaseHeader,
        on_chunk: &mut dyn FnMut(usize),
    ) -> Result<BaseLogits, EvalError> {
        let n_vocab = engine.model.config().n_vocab;
        // 0: the whole vocabulary.
        let k = if k == 0 { n_vocab } else { k.min(n_vocab) };
        let (mut nll, mut top) = (Vec::new(), Vec::new());
        let mut logits = Vec::new();
        for i in 0..chunks.n_chunks {
            chunk_logits(engine, chunks, i, batch, &mut logits)?;
            let rows: Vec<(f32, Vec<(u32, f32)>)> = engine.install(|| {
                logits
                    .par_chunks(n_vocab)
                    .zip(chunks.targets(i).par_iter())
                    .map(|(row, &t)| {
                        let (max, _, shift) = row_softmax(row);
                        let lse = max as f64 + shift;
                        ((lse - row[t as usize] as f64) as f32, top_k(row, lse, k))
                    })
                    .collect()
            });
            for (n, t) in rows {
                nll.push(n);
                top.extend(t);
            }
            on_chunk(i);
        }
        Ok(BaseLogits {
            header: BaseHeader { top_k: k, ..header },
            tokens: chunks.tokens.clone(),
            nll,
            top,
        })
    }

    /// The chunks these logits were computed on.
    pub fn chunks(&self) -> Result<Chunks, EvalError> {
        let mut c = Chunks::from_saved(self.tokens.clone(), self.header.ctx, self.header.bos)?;
        c.text_tokens = self.header.text_tokens;
        Ok(c)
    }

    /// Write as: magic, version (u32 LE), header length (u32 LE) and JSON header, the tokens
    /// (u32 LE), then per scored token its nll (f32 LE) and `top_k` (id u32, log-prob f32).
    pub fn save(&self, path: &Path) -> Result<(), EvalError> {
        let io = |source| EvalError::Io {
            path: path.display().to_string(),
            source,
        };
        let header = serde_json::to_vec(&self.header).expect("a header serializes");
        let tmp = path.with_extension("partial");
        let mut w = BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let write = |w: &mut BufWriter<std::fs::File>| -> std::io::Result<()> {
            w.write_all(MAGIC)?;
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&(header.len() as u32).to_le_bytes())?;
            w.write_all(&header)?;
            for t in &self.tokens {
                w.write_all(&t.to_le_bytes())?;
            }
            let k = self.header.top_k;
            for (i, n) in self.nll.iter().enumerate() {
                w.write_all(&n.to_le_bytes())?;
                for (id, lp) in &self.top[i * k..(i + 1) * k] {
                    w.write_all(&id.to_le_bytes())?;
                    w.write_all(&lp.to_le_bytes())?;
                }
            }
            w.flush()
        };
        write(&mut w).map_err(io)?;
        // Whole or not at all: a crash never leaves a truncated base behind the final name.
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn load(path: &Path) -> Result<BaseLogits, EvalError> {
        let name = path.display().to_string();
        let io = |source| EvalError::Io {
            path: name.clone(),
            source,
        };
        let bad = |what: &str| EvalError::Base(format!("{name}: {what}"));
        let mut r = BufReader::new(std::fs::File::open(path).map_err(io)?);
        let mut magic = [0u8; 8];
        if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
            return Err(bad(
                "not a base-logits file written by `ember eval kld --save-base`",
            ));
        }
        let u32s = |r: &mut BufReader<std::fs::File>, n: usize| -> Result<Vec<u32>, EvalError> {
            let mut b = vec![0u8; n * 4];
            r.read_exact(&mut b)
                .map_err(|_| bad("truncated (the file ends early)"))?;
            Ok(b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect())
        };
        let v = u32s(&mut r, 2)?;
        if v[0] != VERSION {
            return Err(bad(&format!(
                "format version {} (this ember reads {VERSION})",
                v[0]
            )));
        }
        let mut hb = vec![0u8; v[1] as usize];
        r.read_exact(&mut hb)
            .map_err(|_| bad("truncated (the file ends early)"))?;
        let header: BaseHeader =
            serde_json::from_slice(&hb).map_err(|e| bad(&format!("bad header: {e}")))?;
        if header.top_k == 0 || header.ctx < 4 || header.n_chunks == 0 {
            return Err(bad("bad header: empty"));
        }
        let tokens = u32s(&mut r, header.n_chunks * header.ctx)?;
        let scored = header.n_chunks * (header.ctx - 1 - header.ctx / 2);
        let k = header.top_k;
        let words = u32s(&mut r, scored * (1 + 2 * k))?;
        let mut nll = Vec::with_capacity(scored);
        let mut top = Vec::with_capacity(scored * k);
        for rec in words.chunks_exact(1 + 2 * k) {
            nll.push(f32::from_bits(rec[0]));
            for p in rec[1..].chunks_exact(2) {
                if p[0] as usize >= header.n_vocab {
                    return Err(bad("a token id outside the vocabulary"));
                }
                top.push((p[0], f32::from_bits(p[1])));
            }
        }
        if r.read(&mut [0u8; 1]).map_err(io)? != 0 {
            return Err(bad("trailing bytes after the last record"));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= header.n_vocab) {
            return Err(bad(&format!("token {t} outside the vocabulary")));
        }
        Ok(BaseLogits {
            header,
            tokens,
            nll,
            top,
        })
    }

    /// Read a base file written by `llama-perplexity --kl-divergence-base` (magic
    /// `_logits_`): its tokens, and per scored position every token's log-probability as 16
    /// bits over the 16 nats below the maximum. Kept as the top `k` of each position (0: all,
    /// as llama.cpp keeps them), like ember's own base. It names no model and no vocabulary
    /// hash: only the vocabulary size can be checked, and the text through its tokens.
    pub fn load_llama_cpp(path: &Path, k: usize) -> Result<BaseLogits, EvalError> {
        let name = path.display().to_string();
        let bad = |what: &str| EvalError::Base(format!("{name}: {what}"));
        let bytes = std::fs::read(path).map_err(|source| EvalError::Io {
            path: name.clone(),
            source,
        })?;
        if bytes.len() < 20 || &bytes[..8] != b"_logits_" {
            return Err(bad("not a llama-perplexity base file (no _logits_ magic)"));
        }
        let i32_at = |o: usize| i32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let (n_ctx, n_vocab, n_chunk) = (i32_at(8), i32_at(12), i32_at(16));
        if n_ctx < 4 || n_vocab < 2 || n_chunk < 1 {
            return Err(bad(&format!(
                "bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})"
            )));
        }
        let (n_ctx, n_vocab, n_chunk) = (n_ctx as usize, n_vocab as usize, n_chunk as usize);
        let first = n_ctx / 2;
        let per_chunk = n_ctx - 1 - first;
        let nv = 2 * n_vocab.div_ceil(2) + 4;
        let tok_off = 20;
        let rec_off = tok_off + 4 * n_ctx * n_chunk;
        let want = rec_off + 2 * nv * per_chunk * n_chunk;
        if bytes.len() != want {
            return Err(bad(&format!(
                "{} bytes where its header says {want}: truncated or not this format",
                bytes.len()
            )));
        }
        let tokens: Vec<u32> = (0..n_ctx * n_chunk)
            .map(|i| i32_at(tok_off + 4 * i) as u32)
            .collect();
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(bad(&format!("token {t} outside the vocabulary")));
        }
        let k = if k == 0 { n_vocab } else { k.min(n_vocab) };
        let mut nll = Vec::with_capacity(per_chunk * n_chunk);
        let mut top = Vec::with_capacity(per_chunk * n_chunk * k);
        for c in 0..n_chunk {
            for j in 0..per_chunk {
                let o = rec_off + 2 * nv * (c * per_chunk + j);
                let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
                let (scale, min_lp) = (f32_at(o), f32_at(o + 4));
                let q = |v: usize| u16::from_le_bytes([bytes[o + 8 + 2 * v], bytes[o + 9 + 2 * v]]);
                let lp = |v: usize| scale * q(v) as f32 + min_lp;
                let target = tokens[c * n_ctx + first + j + 1] as usize;
                nll.push(-lp(target));
                // Already log-probabilities. Those at the file's floor (clamped 16 nats below
                // the maximum) or under −16 are left out, as llama-perplexity leaves them out
                // of its sum: they fall into the one-bin rest.
                let row: Vec<f32> = (0..n_vocab)
                    .map(|v| {
                        let x = lp(v);
                        if q(v) == 0 || x <= -16.0 {
                            f32::NEG_INFINITY
                        } else {
                            x
                        }
                    })
                    .collect();
                top.extend(top_k(&row, 0.0, k));
            }
        }
        let file = path
            .file_name()
            .map_or(name.clone(), |n| n.to_string_lossy().into_owned());
        Ok(BaseLogits {
            header: BaseHeader {
                model: format!("llama.cpp base file {file}"),
                model_sha256: String::new(),
                vocab_sha256: String::new(),
                n_vocab,
                ctx: n_ctx,
                n_chunks: n_chunk,
                top_k: k,
                bos: None,
                text_tokens: n_ctx * n_chunk,
            },
            tokens,
            nll,
            top,
        })
    }

    /// Refuse to score a model whose vocabulary differs from the base's: its logits index
    /// other tokens, and any figure would be wrong.
    pub fn check_model(&self, n_vocab: usize, vocab_sha256: &str) -> Result<(), EvalError> {
        let h = &self.header;
        if h.n_vocab != n_vocab {
            return Err(EvalError::Base(format!(
                "the base ({}) has a vocabulary of {} tokens, the model {n_vocab}: KL divergence needs the same model family",
                h.model, h.n_vocab
            )));
        }
        // A llama.cpp base file names no vocabulary: its size is all there is to check.
        if !h.vocab_sha256.is_empty() && h.vocab_sha256 != vocab_sha256 {
            return Err(EvalError::Base(format!(
                "the base ({}) tokenizes differently from the model (vocabularies of the same size, different tokens): KL divergence needs the same model family",
                h.model
            )));
        }
        Ok(())
    }
}

/// One token's figures.
#[derive(Clone, Copy, Debug)]
pub struct TokenKld {
    pub kld: f64,
    /// −ln p(token) under the model and under the base.
    pub nll: f64,
    pub nll_base: f64,
    /// The model's most likely token is the base's.
    pub same_top: bool,
    /// p(token) under the model minus under the base.
    pub p_diff: f64,
    /// The base's probability mass outside its kept top-k (summed as one bin).
    pub rest_mass: f64,
}

/// KL(base ‖ model) of one row against the base's compact record.
fn token_kld(row: &[f32], target: u32, nll_base: f32, top: &[(u32, f32)]) -> TokenKld {
    let (max, arg, shift) = row_softmax(row);
    let lse = max as f64 + shift;
    let (mut kld, mut p_in, mut q_in) = (0.0f64, 0.0f64, 0.0f64);
    for &(id, lp) in top {
        if lp == f32::NEG_INFINITY {
            continue; // left out of the base (a llama.cpp file's floor): part of the rest
        }
        let lp = lp as f64;
        let lq = row[id as usize] as f64 - lse;
        let p = lp.exp();
        kld += p * (lp - lq);
        p_in += p;
        q_in += lq.exp();
    }
    let p_rest = 1.0 - p_in;
    if p_rest > 1e-12 {
        // The rest of the vocabulary as one bin; never below a float's resolution of it.
        let q_rest = (1.0 - q_in).max(1e-30);
        kld += p_rest * (p_rest / q_rest).ln();
    }
    let nll = lse - row[target as usize] as f64;
    let nll_base = nll_base as f64;
    TokenKld {
        kld,
        nll,
        nll_base,
        same_top: top.first().is_some_and(|&(id, _)| id as usize == arg),
        p_diff: (-nll).exp() - (-nll_base).exp(),
        rest_mass: p_rest.max(0.0),
    }
}

/// A statistic with its standard error.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Est {
    pub value: f64,
    pub stderr: f64,
}

/// What `ember eval kld` reports (and stores): `llama-perplexity --kl-divergence`'s figures.
#[derive(Clone, Debug, Serialize)]
pub struct Kld {
    pub base_model: String,
    pub base_sha256: String,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub top_k: usize,
    /// Mean base probability mass outside the kept top-k (the one-bin share; 0 = exact).
    pub base_rest_mass: f64,
    pub ppl: Est,
    pub ppl_base: Est,
    /// Correlation of the per-token ln-likelihoods of model and base.
    pub ln_ppl_correlation: f64,
    /// ln(PPL(Q)/PPL(base)).
    pub ln_ppl_ratio: Est,
    pub ppl_ratio: Est,
    /// PPL(Q) − PPL(base) ("Δppl").
    pub ppl_diff: Est,
    pub kld_mean: Est,
    pub kld_max: f64,
    pub kld_p99_9: f64,
    pub kld_p99: f64,
    pub kld_p95: f64,
    pub kld_p90: f64,
    pub kld_median: f64,
    pub kld_p10: f64,
    pub kld_p5: f64,
    pub kld_p1: f64,
    pub kld_p0_1: f64,
    pub kld_min: f64,
    /// Mean and RMS of Δp = p(token | model) − p(token | base) (fractions, not percent).
    pub dp_mean: Est,
    pub dp_rms: Est,
    pub dp_max: f64,
    pub dp_p99: f64,
    pub dp_p95: f64,
    pub dp_median: f64,
    pub dp_p5: f64,
    pub dp_p1: f64,
    pub dp_min: f64,
    /// Fraction of tokens where the model's most likely token is the base's ("same top p").
    pub same_top: Est,
    /// Each scored token's figures, in text order (stored, not printed).
    #[serde(skip)]
    pub per_token: Vec<TokenKld>,
}

/// Score `engine` (the model) against `base` on its chunks; `on_chunk(i, running mean KLD)`.
pub fn kl_divergence(
    engine: &Engine,
    base: &BaseLogits,
    batch: usize,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<Kld, EvalError> {
    let chunks = base.chunks()?;
    let n_vocab = engine.model.config().n_vocab;
    let k = base.header.top_k;
    let per = chunks.scored_per_chunk();
    let mut all: Vec<TokenKld> = Vec::with_capacity(chunks.scored());
    let mut logits = Vec::new();
    for i in 0..chunks.n_chunks {
        chunk_logits(engine, &chunks, i, batch, &mut logits)?;
        let done = all.len();
        let tokens: Vec<TokenKld> = engine.install(|| {
            logits
                .par_chunks(n_vocab)
                .zip(chunks.targets(i).par_iter())
                .enumerate()
                .map(|(j, (row, &t))| {
                    let r = done + j;
                    token_kld(row, t, base.nll[r], &base.top[r * k..(r + 1) * k])
                })
                .collect()
        });
        debug_assert_eq!(tokens.len(), per);
        all.extend(tokens);
        let mean = all.iter().map(|t| t.kld).sum::<f64>() / all.len() as f64;
        on_chunk(i, mean);
    }
    Ok(summarize(&all, base, &chunks))
}

fn summarize(all: &[TokenKld], base: &BaseLogits, chunks: &Chunks) -> Kld {
    let n = all.len();
    let (mut q, mut b) = (NllSums::default(), NllSums::default());
    let (mut sum_qb, mut kld, mut kld2) = (0.0, 0.0, 0.0);
    let (mut dp, mut dp2, mut dp4, mut same) = (0.0, 0.0, 0.0, 0usize);
    for t in all {
        q.add(t.nll);
        b.add(t.nll_base);
        sum_qb += t.nll * t.nll_base;
        kld += t.kld;
        kld2 += t.kld * t.kld;
        dp += t.p_diff;
        dp2 += t.p_diff * t.p_diff;
        dp4 += t.p_diff.powi(4);
        same += t.same_top as usize;
    }
    let nf = n as f64;
    let (lq, lq_err) = q.ln_ppl();
    let (lb, lb_err) = b.ln_ppl();
    // Covariance of the two means (llama-perplexity's), hence the correlation.
    let cov = if n > 1 {
        (sum_qb / nf - (q.sum / nf) * (b.sum / nf)) / (nf - 1.0)
    } else {
        0.0
    };
    let cor = if lq_err > 0.0 && lb_err > 0.0 {
        cov / (lq_err * lb_err)
    } else {
        0.0
    };
    let (ppl_q, ppl_b) = (lq.exp(), lb.exp());
    let ratio_err = (lq_err * lq_err + lb_err * lb_err - 2.0 * cov)
        .max(0.0)
        .sqrt();
    let ln_ratio = lq - lb;
    let ppl_q_err = ppl_q * lq_err;
    let ppl_b_err = ppl_b * lb_err;
    let diff_err = (ppl_q_err * ppl_q_err + ppl_b_err * ppl_b_err - 2.0 * ppl_q * ppl_b * cov)
        .max(0.0)
        .sqrt();
    let mut klds: Vec<f64> = all.iter().map(|t| t.kld).collect();
    klds.sort_by(f64::total_cmp);
    let mut dps: Vec<f64> = all.iter().map(|t| t.p_diff).collect();
    dps.sort_by(f64::total_cmp);
    let (kld_mean, kld_err) = mean_and_stderr(kld, kld2, n);
    let (dp_mean, dp_err) = mean_and_stderr(dp, dp2, n);
    let (mse, mse_err) = mean_and_stderr(dp2, dp4, n);
    let rms = mse.sqrt();
    let same_top = same as f64 / nf;
    let est = |value, stderr| Est { value, stderr };
    Kld {
        base_model: base.header.model.clone(),
        base_sha256: base.header.model_sha256.clone(),
        ctx: chunks.ctx,
        chunks: chunks.n_chunks,
        tokens_scored: n,
        top_k: base.header.top_k,
        base_rest_mass: all.iter().map(|t| t.rest_mass).sum::<f64>() / nf,
        ppl: est(ppl_q, ppl_q_err),
        ppl_base: est(ppl_b, ppl_b_err),
        ln_ppl_correlation: cor,
        ln_ppl_ratio: est(ln_ratio, ratio_err),
        ppl_ratio: est(ln_ratio.exp(), ln_ratio.exp() * ratio_err),
        ppl_diff: est(ppl_q - ppl_b, diff_err),
        kld_mean: est(kld_mean, kld_err),
        kld_max: quantile(&klds, 1.0),
        kld_p99_9: quantile(&klds, 0.999),
        kld_p99: quantile(&klds, 0.99),
        kld_p95: quantile(&klds, 0.95),
        kld_p90: quantile(&klds, 0.90),
        kld_median: quantile(&klds, 0.5),
        kld_p10: quantile(&klds, 0.10),
        kld_p5: quantile(&klds, 0.05),
        kld_p1: quantile(&klds, 0.01),
        kld_p0_1: quantile(&klds, 0.001),
        kld_min: quantile(&klds, 0.0),
        dp_mean: est(dp_mean, dp_err),
        dp_rms: est(rms, if rms > 0.0 { 0.5 / rms * mse_err } else { 0.0 }),
        dp_max: quantile(&dps, 1.0),
        dp_p99: quantile(&dps, 0.99),
        dp_p95: quantile(&dps, 0.95),
        dp_median: quantile(&dps, 0.5),
        dp_p5: quantile(&dps, 0.05),
        dp_p1: quantile(&dps, 0.01),
        dp_min: quantile(&dps, 0.0),
        same_top: est(
            same_top,
            if n > 1 {
                (same_top * (1.0 - same_top) / (nf - 1.0)).sqrt()
            } else {
                0.0
            },
        ),
        per_token: all.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lse(row: &[f32]) -> f64 {
        let (m, _, s) = row_softmax(row);
        m as f64 + s
    }

    /// Exact KL(p ‖ q) over whole rows, for checking the compact form.
    fn exact(p: &[f32], q: &[f32]) -> f64 {
        let (lp, lq) = (lse(p), lse(q));
        p.iter()
            .zip(q)
            .map(|(&a, &b)| {
                let la = a as f64 - lp;
                la.exp() * (la - (b as f64 - lq))
            })
            .sum()
    }

    #[test]
    fn compact_kld_is_exact_with_the_whole_vocabulary_and_close_with_the_top_few() {
        let p: Vec<f32> = (0..50)
            .map(|i| ((i * 37 % 11) as f32) * 0.7 - 2.0)
            .collect();
        let q: Vec<f32> = p
            .iter()
            .enumerate()
            .map(|(i, &x)| x + ((i % 5) as f32 - 2.0) * 0.05)
            .collect();
        let want = exact(&p, &q);
        let full = top_k(&p, lse(&p), 50);
        let t = token_kld(&q, 3, 1.0, &full);
        // Log-probabilities are kept as f32: ~1e-7 each, far finer than llama.cpp's 16-bit ones.
        assert!((t.kld - want).abs() < 1e-5, "{} vs {want}", t.kld);
        // With the top 10 the rest is one bin: a lower bound (log-sum inequality), close here.
        let few = token_kld(&q, 3, 1.0, &top_k(&p, lse(&p), 10));
        assert!(
            few.kld <= want + 1e-5 && few.kld > 0.5 * want,
            "{} vs {want}",
            few.kld
        );
        // Identical rows: zero divergence and the same top token.
        let same = token_kld(&p, 3, 1.0, &top_k(&p, lse(&p), 10));
        assert!(same.kld.abs() < 1e-5 && same.same_top);
    }

    #[test]
    fn top_k_is_sorted_and_normalized() {
        let row = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let t = top_k(&row, lse(&row), 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let all: f64 = top_k(&row, lse(&row), 5)
            .iter()
            .map(|x| (x.1 as f64).exp())
            .sum();
        assert!((all - 1.0).abs() < 1e-6);
    }

    fn sample_base() -> BaseLogits {
        BaseLogits {
            header: BaseHeader {
                model: "base.gguf".into(),
                model_sha256: "ab".into(),
                vocab_sha256: "cd".into(),
                n_vocab: 10,
                ctx: 4,
                n_chunks: 2,
                top_k: 2,
                bos: Some(1),
                text_tokens: 9,
            },
            tokens: vec![1, 2, 3, 4, 5, 6, 7, 8],
            nll: vec![0.5, 1.5],
            top: vec![(3, -0.1), (4, -2.5), (9, -0.2), (0, -3.0)],
        }
    }

    #[test]
    fn a_saved_base_reads_back_whole_and_a_damaged_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("ember-kld-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.kld");
        let b = sample_base();
        b.save(&path).unwrap();
        let r = BaseLogits::load(&path).unwrap();
        assert_eq!(r.header, b.header);
        assert_eq!((r.tokens, r.nll, r.top), (b.tokens, b.nll, b.top));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = BaseLogits::load(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&path, b"GGUF\x03\0\0\0rest").unwrap();
        let e = BaseLogits::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a base-logits file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A base file in llama-perplexity's format: ctx 4 (one scored position per chunk), a
    /// vocabulary of 5, one chunk, log-probabilities quantized as llama.cpp does.
    fn llama_base_bytes(lps: &[f32; 5], tokens: [i32; 4]) -> Vec<u8> {
        let mut b = b"_logits_".to_vec();
        for v in [4i32, 5, 1] {
            b.extend(v.to_le_bytes());
        }
        for t in tokens {
            b.extend(t.to_le_bytes());
        }
        let max = lps.iter().cloned().fold(f32::MIN, f32::max);
        let min = lps.iter().cloned().fold(f32::MAX, f32::min).max(max - 16.0);
        let scale = (max - min) / 65535.0;
        b.extend(scale.to_le_bytes());
        b.extend(min.to_le_bytes());
        for &lp in lps {
            b.extend((((lp - min) / scale).round() as u16).to_le_bytes());
        }
        b.extend(0u16.to_le_bytes()); // padding to an even count
        b
    }

    #[test]
    fn a_llama_cpp_base_file_reads_back_its_log_probabilities() {
        let dir = std::env::temp_dir().join(format!("ember-llama-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.bin");
        let lps = [-0.5f32, -1.5, -3.0, -2.0, -6.0];
        // Position 2 predicts token 3 (the chunk's last).
        std::fs::write(&path, llama_base_bytes(&lps, [1, 2, 0, 3])).unwrap();
        let b = BaseLogits::load_llama_cpp(&path, 3).unwrap();
        assert_eq!(
            (b.header.ctx, b.header.n_vocab, b.header.n_chunks),
            (4, 5, 1)
        );
        assert_eq!(b.tokens, vec![1, 2, 0, 3]);
        assert!((b.nll[0] - 2.0).abs() < 1e-3, "{:?}", b.nll);
        let ids: Vec<u32> = b.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![0, 1, 3]);
        assert!((b.top[1].1 - -1.5).abs() < 1e-3);
        assert!(b.check_model(5, "any vocabulary hash").is_ok());
        assert!(b.check_model(6, "").is_err());
        // Cut short: refused with the size it expected.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 2);
        std::fs::write(&path, &bytes).unwrap();
        let e = BaseLogits::load_llama_cpp(&path, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_model_of_another_vocabulary_is_refused() {
        let b = sample_base();
        assert!(b.check_model(10, "cd").is_ok());
        let e = b.check_model(11, "cd").unwrap_err().to_string();
        assert!(e.contains("vocabulary of 10 tokens, the model 11"), "{e}");
        let e = b.check_model(10, "ef").unwrap_err().to_string();
        assert!(e.contains("tokenizes differently"), "{e}");
    }
}
