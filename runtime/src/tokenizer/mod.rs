//! Tokenizer built from GGUF vocabulary metadata, reproducing llama.cpp's
//! tokenization (`llama-vocab.cpp`) bit for bit on its golden vocab tests.
//!
//! Two model families are supported:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The pre-tokenizer
//!   (regexes chosen by `tokenizer.ggml.pre`, then the GPT-2 byte-to-unicode
//!   mapping) is built programmatically from the `tokenizers` crate's `Split`
//!   and `ByteLevel` pre-tokenizers. The rank-ordered merge loop is llama.cpp's
//!   `llm_tokenizer_bpe_session` written here over a flat vocabulary: the
//!   `tokenizers` `BPE` model needs ~750k string allocations to build for a
//!   150k vocab (≈300-400 ms here), this needs two (≈30 ms), and it can apply
//!   merges whose result is not a token exactly as llama.cpp does.
//! * `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE by token score
//!   with `<0xXX>` byte fallback, `▁` space escaping and `add_space_prefix`.
//!   The `tokenizers` crate has no score-driven merge, so this is implemented
//!   here (it is llama.cpp's `llm_tokenizer_spm` algorithm).
//!
//! Special tokens are split out of the text first, exactly like llama.cpp's
//! `tokenizer_st_partition`: candidates are the control, user-defined and
//! unknown tokens, longest text first. User-defined tokens are always matched;
//! control/unknown ones only with `parse_special`.
//!
//! Decoding follows llama.cpp's `token_to_piece`: normal tokens are
//! byte-level decoded (BPE) or have `▁` turned back into spaces (SPM), byte
//! tokens become their byte, user-defined tokens render as their text, and
//! control / unknown / unused tokens render as nothing unless asked for
//! (see [`Tokenizer::decode_with_special`]).
//!
//! Here: the vocabulary, special-token partition, encode/decode and the
//! [`StreamDecoder`]; `bpe.rs` and `spm.rs` are the two merge loops.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::Hasher;

use rustc_hash::{FxBuildHasher, FxHasher};

use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
};

use crate::gguf::{Metadata, keys};

mod bpe;
mod spm;
#[cfg(test)]
mod tests;

use bpe::{build_bpe, parse_byte_token};
use spm::build_spm;

/// Errors building or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata has no `{0}` (needed by the tokenizer)")]
    MissingKey(&'static str),
    #[error(
        "unsupported tokenizer model `{0}` in tokenizer.ggml.model (supported: \"llama\" (SentencePiece), \"gpt2\" (byte-level BPE))"
    )]
    UnsupportedModel(String),
    #[error(
        "unsupported BPE pre-tokenizer `{0}` in tokenizer.ggml.pre (supported: default, llama-bpe/llama3/llama-v3/falcon3, qwen2/deepseek-r1-qwen, smollm/starcoder/refact/command-r, gpt-2/phi-2/roberta-bpe)"
    )]
    UnsupportedPre(String),
    #[error("inconsistent tokenizer metadata: {0}")]
    Invalid(String),
    #[error("tokenizers backend error: {0}")]
    Backend(String),
}

fn backend(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Backend(e.to_string())
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i32) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            // 0 (undefined) and 1 are treated as normal, as llama.cpp does.
            _ => TokenType::Normal,
        }
    }
}

/// Which BPE pre-tokenizer regex set is in use (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreType {
    Default,
    Llama3,
    Qwen2,
    /// smollm, starcoder, refact, command-r: split digits, then gpt-2.
    DigitsGpt2,
    Gpt2,
}

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreType {
    fn from_name(name: &str) -> Option<PreType> {
        Some(match name {
            "default" => PreType::Default,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => PreType::Llama3,
            "qwen2" | "deepseek-r1-qwen" => PreType::Qwen2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => PreType::DigitsGpt2,
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en"
            | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" => PreType::Gpt2,
            _ => return None,
        })
    }

    /// The regexes llama.cpp applies in sequence; each one splits every
    /// fragment produced by the previous one, keeping both matches and gaps.
    fn regexes(self) -> Vec<&'static str> {
        match self {
            PreType::Default => vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_RE,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            PreType::Llama3 => vec![LLAMA3_RE],
            PreType::Qwen2 => vec![QWEN2_RE],
            PreType::DigitsGpt2 => vec![r"\p{N}", GPT2_RE],
            PreType::Gpt2 => vec![GPT2_RE],
        }
    }
}

/// GPT-2 byte-to-unicode table: byte -> char, and the inverse for decoding.
fn byte_level_tables() -> ([char; 256], Vec<i16>) {
    let mut fwd = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        fwd[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    let mut inv = vec![-1i16; 512];
    for (b, c) in fwd.iter().enumerate() {
        inv[*c as usize] = b as i16;
    }
    (fwd, inv)
}

/// The hash of the vocabulary table's probes: rustc's Fx hash (fast, not DoS-resistant, which a
/// table built from the model file's own tokens does not need). Its `finish` rotates the
/// well-mixed high bits down to the low bits the table's mask keeps.
fn str_hash(s: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(s.as_bytes());
    h.finish()
}

/// All token texts in one buffer plus an open-addressing text -> id table.
/// Later duplicates win, as in llama.cpp's `token_to_id`.
struct VocabTable {
    arena: String,
    offs: Vec<u32>,
    slots: Vec<u32>,
    mask: usize,
}

const EMPTY: u32 = u32::MAX;

impl VocabTable {
    fn new(tokens: &[String]) -> VocabTable {
        let total: usize = tokens.iter().map(String::len).sum();
        let mut arena = String::with_capacity(total);
        let mut offs = Vec::with_capacity(tokens.len() + 1);
        offs.push(0u32);
        for t in tokens {
            arena.push_str(t);
            offs.push(arena.len() as u32);
        }
        let cap = (tokens.len() * 2).next_power_of_two().max(16);
        let mut v = VocabTable {
            arena,
            offs,
            slots: vec![EMPTY; cap],
            mask: cap - 1,
        };
        for id in 0..tokens.len() as u32 {
            let t = v.text(id);
            let mut i = str_hash(t) as usize & v.mask;
            loop {
                let cur = v.slots[i];
                if cur == EMPTY {
                    v.slots[i] = id;
                    break;
                }
                if v.text(cur) == t {
                    v.slots[i] = id;
                    break;
                }
                i = (i + 1) & v.mask;
            }
        }
        v
    }

    fn len(&self) -> usize {
        self.offs.len() - 1
    }

    #[inline]
    fn text(&self, id: u32) -> &str {
        let i = id as usize;
        &self.arena[self.offs[i] as usize..self.offs[i + 1] as usize]
    }

    #[inline]
    fn get(&self, s: &str) -> Option<u32> {
        let mut i = str_hash(s) as usize & self.mask;
        loop {
            let cur = self.slots[i];
            if cur == EMPTY {
                return None;
            }
            if self.text(cur) == s {
                return Some(cur);
            }
            i = (i + 1) & self.mask;
        }
    }
}

struct BpeModel {
    pre: PreTokenizerWrapper,
    /// (left id, right id) -> (rank, merged id or EMPTY when the result is not a token).
    merges: HashMap<u64, (u32, u32), FxBuildHasher>,
    ignore_merges: bool,
    /// Inverse byte-level table, indexed by char code (< 512).
    byte_inv: Vec<i16>,
}

struct SpmModel {
    scores: Vec<f32>,
    /// `<0xXX>` token (or the raw one-byte token) per byte.
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
}

enum Kind {
    Spm(Box<SpmModel>),
    Bpe(Box<BpeModel>),
}

/// A GGUF-described tokenizer (see the module docs).
pub struct Tokenizer {
    kind: Kind,
    model_name: String,
    pre_name: String,
    vocab: VocabTable,
    types: Vec<TokenType>,
    /// Special-token partition candidates, longest text first.
    specials: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name)
            .field("pre", &self.pre_name)
            .field("n_vocab", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// Token texts llama.cpp treats as end-of-generation (besides eos/eot ids).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
/// Texts llama.cpp uses to find the EOT token when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
/// FIM pad / repo / file-separator tokens: llama.cpp also stops on these.
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

enum Frag<'a> {
    Text(&'a str),
    Token(u32),
}

impl Tokenizer {
    /// Build from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(md: &Metadata) -> Result<Self, TokenizerError> {
        let model_name = md
            .get_str(keys::TOK_MODEL)
            .ok_or(TokenizerError::MissingKey(keys::TOK_MODEL))?
            .to_string();
        let tokens: &[String] = md
            .get_strings(keys::TOK_TOKENS)
            .ok_or(TokenizerError::MissingKey(keys::TOK_TOKENS))?;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid(
                "empty tokenizer.ggml.tokens".into(),
            ));
        }
        let mut types: Vec<TokenType> = match md.get_i32s(keys::TOK_TYPES) {
            Some(t) if t.len() == n => t.iter().map(|&v| TokenType::from_gguf(v)).collect(),
            Some(t) => {
                return Err(TokenizerError::Invalid(format!(
                    "{} has {} entries for {} tokens",
                    keys::TOK_TYPES,
                    t.len(),
                    n
                )));
            }
            None => vec![TokenType::Normal; n],
        };
        let id_key = |k: &str| {
            md.get_u64(k)
                .filter(|&v| (v as usize) < n)
                .map(|v| v as u32)
        };

        let is_spm = match model_name.as_str() {
            "llama" => true,
            "gpt2" => false,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        let vocab = VocabTable::new(tokens);
        let mut pre_name = md.get_str(keys::TOK_PRE).unwrap_or("default").to_string();
        let add_bos_default;
        let kind = if is_spm {
            add_bos_default = true;
            Kind::Spm(Box::new(build_spm(md, &vocab, n)?))
        } else {
            let pre = PreType::from_name(&pre_name)
                .ok_or_else(|| TokenizerError::UnsupportedPre(pre_name.clone()))?;
            if md.get_str(keys::TOK_PRE).is_none() {
                log::warn!(
                    "tokenizer: no tokenizer.ggml.pre, using llama.cpp's 'default' pre-tokenizer"
                );
                pre_name = "default".into();
            }
            add_bos_default = pre == PreType::Llama3;
            Kind::Bpe(Box::new(build_bpe(md, &vocab, pre)?))
        };

        let (bos, eos, unk) = if is_spm {
            (
                id_key(keys::TOK_BOS).or(Some(1).filter(|&v| (v as usize) < n)),
                id_key(keys::TOK_EOS).or(Some(2).filter(|&v| (v as usize) < n)),
                id_key(keys::TOK_UNK).or(Some(0)),
            )
        } else {
            (
                id_key(keys::TOK_BOS),
                id_key(keys::TOK_EOS),
                id_key(keys::TOK_UNK),
            )
        };
        let mut eot = id_key(keys::TOK_EOT);
        let mut eog = end_of_generation(tokens, &mut types, &mut eot);
        eog.extend(eos);
        eog.extend(eot);
        if let Some(eom) = md
            .get_u64("tokenizer.ggml.eom_token_id")
            .filter(|&v| (v as usize) < n)
        {
            eog.insert(eom as u32);
        }
        let specials = special_tokens(tokens, &types);

        let add_bos = md.get_bool(keys::TOK_ADD_BOS).unwrap_or(add_bos_default);
        let add_eos = md.get_bool(keys::TOK_ADD_EOS).unwrap_or(false);

        Ok(Tokenizer {
            kind,
            model_name,
            pre_name,
            vocab,
            types,
            specials,
            bos,
            eos,
            eot,
            unk,
            eog,
            add_bos,
            add_eos,
        })
    }

    /// Encode `text`. `add_bos` prepends BOS (callers pass
    /// [`Self::add_bos_default`] unless told otherwise); `parse_special` lets
    /// text such as `<|im_start|>` become the control token. User-defined
    /// tokens are always recognised (llama.cpp behaviour). EOS is never appended.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            match self.bos {
                Some(b) => out.push(b),
                None => {
                    return Err(TokenizerError::Invalid(
                        "BOS requested but the vocab has no BOS token".into(),
                    ));
                }
            }
        }
        if text.is_empty() {
            return Ok(out);
        }
        let frags = self.partition(text, parse_special);
        match &self.kind {
            Kind::Spm(spm) => {
                let mut prev_special = true;
                let mut buf = String::new();
                for f in frags {
                    match f {
                        Frag::Text(s) => {
                            buf.clear();
                            if spm.add_space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in s.chars() {
                                if c == ' ' {
                                    buf.push('▁');
                                } else {
                                    buf.push(c);
                                }
                            }
                            spm.tokenize(&self.vocab, &buf, &mut out);
                            prev_special = false;
                        }
                        Frag::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Kind::Bpe(bpe) => {
                for f in frags {
                    match f {
                        Frag::Text(s) => bpe.tokenize(&self.vocab, s, &mut out)?,
                        Frag::Token(id) => out.push(id),
                    }
                }
            }
        }
        Ok(out)
    }

    /// llama.cpp's `tokenizer_st_partition`: split out special tokens, longest first.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Frag<'a>> {
        let mut frags = vec![Frag::Text(text)];
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let pat = self.vocab.text(id);
            if !frags
                .iter()
                .any(|f| matches!(f, Frag::Text(s) if s.contains(pat)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Frag::Text(mut s) => {
                        while let Some(pos) = s.find(pat) {
                            if pos > 0 {
                                next.push(Frag::Text(&s[..pos]));
                            }
                            next.push(Frag::Token(id));
                            s = &s[pos + pat.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Frag::Text(s));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// BOS default: `tokenizer.ggml.add_bos_token`, else llama.cpp's default
    /// (SPM: true; BPE: false, except the llama3 pre-tokenizer: true).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// `tokenizer.ggml.add_eos_token` (default false). [`Self::encode`] never appends EOS.
    pub fn add_eos_default(&self) -> bool {
        self.add_eos
    }

    /// Raw bytes of one token piece; control/unknown tokens give their text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.piece(id, true).into_owned()
    }

    /// The piece llama.cpp's `token_to_piece` produces (with `special` rendering control tokens).
    fn piece(&self, id: u32, special: bool) -> Cow<'_, [u8]> {
        if id as usize >= self.vocab.len() {
            return Cow::Borrowed(&[]);
        }
        let text = self.vocab.text(id);
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown => {
                if special {
                    Cow::Borrowed(text.as_bytes())
                } else {
                    Cow::Borrowed(&[])
                }
            }
            TokenType::Unused => Cow::Borrowed(&[]),
            TokenType::UserDefined => Cow::Borrowed(text.as_bytes()),
            TokenType::Byte => match parse_byte_token(text) {
                Some(b) => Cow::Owned(vec![b]),
                None => Cow::Borrowed(text.as_bytes()),
            },
            TokenType::Normal => match &self.kind {
                Kind::Spm(_) => {
                    if text.contains('▁') {
                        Cow::Owned(text.replace('▁', " ").into_bytes())
                    } else {
                        Cow::Borrowed(text.as_bytes())
                    }
                }
                Kind::Bpe(bpe) => Cow::Owned(bpe.decode_piece(text)),
            },
        }
    }

    /// Whole-sequence decode for generated text (llama.cpp's behaviour with
    /// `special = false`): control, unknown and unused tokens render as
    /// nothing; user-defined tokens as their text. For SentencePiece vocabs
    /// with `add_space_prefix`, the leading space of the first piece after an
    /// optional BOS is removed (so `decode(encode(s, ..))` gives `s` back).
    /// Invalid UTF-8 is replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with_special(ids, false)
    }

    /// Like [`Self::decode`], but with `render_special` control tokens are
    /// rendered as their text (e.g. `<|im_start|>`), like llama.cpp's
    /// `unparse_special`.
    pub fn decode_with_special(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip = matches!(&self.kind, Kind::Spm(s) if s.add_space_prefix);
        for (i, &id) in ids.iter().enumerate() {
            let p = self.piece(id, render_special);
            if strip && !(i == 0 && Some(id) == self.bos) {
                strip = false;
                if p.first() == Some(&b' ') {
                    bytes.extend_from_slice(&p[1..]);
                    continue;
                }
            }
            bytes.extend_from_slice(&p);
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }
    /// `tokenizer.ggml.eot_token_id`, else the first token named like an EOT token.
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }
    /// End of generation: eos, eot, eom and llama.cpp's named set
    /// (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<end_of_turn>`, FIM pad/repo/sep, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
    /// The sorted end-of-generation ids.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }
    /// The token's text as stored in the GGUF (byte-level / `▁`-escaped form); "" if out of range.
    pub fn token_text(&self, id: u32) -> &str {
        if (id as usize) < self.vocab.len() {
            self.vocab.text(id)
        } else {
            ""
        }
    }
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
    /// `tokenizer.ggml.model`: "llama" or "gpt2".
    pub fn model_kind(&self) -> &str {
        &self.model_name
    }
    /// `tokenizer.ggml.pre` ("default" when absent).
    pub fn pre_kind(&self) -> &str {
        &self.pre_name
    }
}

/// The end-of-generation tokens found by their text, as llama.cpp builds the set (it forces
/// them to control tokens); the first end-of-turn text found fills `eot` when the file has none.
fn end_of_generation(
    tokens: &[String],
    types: &mut [TokenType],
    eot: &mut Option<u32>,
) -> HashSet<u32> {
    let mut eog = HashSet::new();
    for (i, t) in tokens.iter().enumerate() {
        let id = i as u32;
        let s = t.as_str();
        if !(s.starts_with('<') || s.starts_with('_')) {
            continue;
        }
        if eot.is_none() && EOT_TEXTS.contains(&s) {
            *eot = Some(id);
        }
        if EOG_TEXTS.contains(&s) || FIM_EOG_TEXTS.contains(&s) {
            eog.insert(id);
            types[i] = TokenType::Control;
        }
    }
    eog
}

/// The tokens split out of text before tokenization (control, user-defined, unknown), longest
/// text first, as llama.cpp's `tokenizer_st_partition` tries them.
fn special_tokens(tokens: &[String], types: &[TokenType]) -> Vec<u32> {
    let mut specials: Vec<u32> = (0..tokens.len() as u32)
        .filter(|&i| {
            matches!(
                types[i as usize],
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            ) && !tokens[i as usize].is_empty()
        })
        .collect();
    specials.sort_by(|&a, &b| {
        tokens[b as usize]
            .len()
            .cmp(&tokens[a as usize].len())
            .then(a.cmp(&b))
    });
    specials
}

/// Incremental, UTF-8-safe detokenizer for streaming output: bytes of a
/// character split across byte tokens are held back until complete.
/// Pieces are rendered as in [`Tokenizer::decode`] (control tokens render as
/// nothing) but no leading space is stripped: the stream continues a prompt.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(t: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok: t,
            pending: Vec::new(),
        }
    }

    /// Add one token; returns the text that became complete (maybe empty).
    pub fn push(&mut self, id: u32) -> String {
        let p = self.tok.piece(id, false);
        self.pending.extend_from_slice(&p);
        self.drain(false)
    }

    /// Flush whatever is held back (incomplete sequences become U+FFFD).
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, flush: bool) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&rest[..good]).unwrap());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &rest[good + bad..];
                        }
                        None => {
                            // Incomplete sequence at the end.
                            rest = &rest[good..];
                            if flush {
                                out.push('\u{FFFD}');
                                rest = &[];
                            }
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }
}
