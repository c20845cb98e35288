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

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
};

use crate::gguf::{Metadata, keys};

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

/// Fx-style hasher (fast, non-cryptographic) for the vocab and merge tables.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // murmur3 fmix64: the multiply above leaves the low bits (which pick
        // the bucket) depending on the low input bits only.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

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
    merges: HashMap<u64, (u32, u32), FxBuild>,
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
            let scores = match md.get_f32s(keys::TOK_SCORES) {
                Some(s) if s.len() == n => s.to_vec(),
                Some(_) => {
                    return Err(TokenizerError::Invalid(format!(
                        "{} length != token count",
                        keys::TOK_SCORES
                    )));
                }
                None => return Err(TokenizerError::MissingKey(keys::TOK_SCORES)),
            };
            let mut byte_tokens = [None; 256];
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                let hex = format!("<0x{b:02X}>");
                *slot = vocab.get(&hex).or_else(|| {
                    std::str::from_utf8(&[b as u8])
                        .ok()
                        .and_then(|s| vocab.get(s))
                });
            }
            Kind::Spm(Box::new(SpmModel {
                scores,
                byte_tokens,
                add_space_prefix: md.get_bool(keys::TOK_ADD_SPACE_PREFIX).unwrap_or(true),
            }))
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

        // End-of-generation set, as llama.cpp builds it.
        let mut eog = HashSet::new();
        for (i, t) in tokens.iter().enumerate() {
            let id = i as u32;
            let s = t.as_str();
            if !(s.starts_with('<') || s.starts_with('_')) {
                continue;
            }
            if eot.is_none() && EOT_TEXTS.contains(&s) {
                eot = Some(id);
            }
            if EOG_TEXTS.contains(&s) || FIM_EOG_TEXTS.contains(&s) {
                eog.insert(id);
                if types[i] != TokenType::Control {
                    // llama.cpp forces these to control tokens.
                    types[i] = TokenType::Control;
                }
            }
        }
        eog.extend(eos);
        eog.extend(eot);
        if let Some(eom) = md
            .get_u64("tokenizer.ggml.eom_token_id")
            .filter(|&v| (v as usize) < n)
        {
            eog.insert(eom as u32);
        }

        let mut specials: Vec<u32> = (0..n as u32)
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

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn build_bpe(md: &Metadata, vocab: &VocabTable, pre: PreType) -> Result<BpeModel, TokenizerError> {
    let merges_raw = md
        .get_strings(keys::TOK_MERGES)
        .ok_or(TokenizerError::MissingKey(keys::TOK_MERGES))?;
    let mut merges: HashMap<u64, (u32, u32), FxBuild> =
        HashMap::with_capacity_and_hasher(merges_raw.len(), FxBuild::default());
    let mut skipped = 0usize;
    let mut joined = String::new();
    for (rank, m) in merges_raw.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte.
        let Some(pos) = m
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&c| c == b' ')
            .map(|p| p + 1)
        else {
            skipped += 1;
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        let (Some(a_id), Some(b_id)) = (vocab.get(a), vocab.get(b)) else {
            // Could only ever apply to a symbol that is not a token itself.
            skipped += 1;
            continue;
        };
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        let new_id = vocab.get(&joined).unwrap_or(EMPTY);
        // First (lowest-rank) occurrence wins, like llama.cpp's bpe_ranks.emplace.
        merges
            .entry(pair_key(a_id, b_id))
            .or_insert((rank as u32, new_id));
    }
    if skipped > 0 {
        log::warn!("tokenizer: ignored {skipped} BPE merges whose parts are not tokens");
    }

    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in pre.regexes() {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(backend)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let (_, byte_inv) = byte_level_tables();
    Ok(BpeModel {
        pre: PreTokenizerWrapper::Sequence(Sequence::new(steps)),
        merges,
        ignore_merges: pre == PreType::Llama3,
        byte_inv,
    })
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[derive(Clone, Copy)]
struct BpeSym {
    start: u32,
    len: u32,
    /// Token id of the symbol's text, EMPTY when it is not a token.
    id: u32,
    prev: i32,
    next: i32,
}

struct BpeBigram {
    rank: u32,
    left: u32,
    right: u32,
    llen: u32,
    rlen: u32,
    new_id: u32,
}

impl PartialEq for BpeBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for BpeBigram {}
impl PartialOrd for BpeBigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for BpeBigram {
    /// Max-heap order: lowest rank first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then_with(|| o.left.cmp(&self.left))
    }
}

impl BpeModel {
    fn tokenize(
        &self,
        vocab: &VocabTable,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut pts = PreTokenizedString::from(text);
        self.pre.pre_tokenize(&mut pts).map_err(backend)?;
        let mut syms: Vec<BpeSym> = Vec::new();
        let mut heap: BinaryHeap<BpeBigram> = BinaryHeap::new();
        for (word, _, _) in pts.get_splits(OffsetReferential::Normalized, OffsetType::None) {
            if word.is_empty() {
                continue;
            }
            if self.ignore_merges
                && let Some(id) = vocab.get(word)
            {
                out.push(id);
                continue;
            }
            self.merge_word(vocab, word, &mut syms, &mut heap, out);
        }
        Ok(())
    }

    /// llama.cpp's `llm_tokenizer_bpe_session::tokenize` for one pre-tokenized word.
    fn merge_word(
        &self,
        vocab: &VocabTable,
        word: &str,
        syms: &mut Vec<BpeSym>,
        heap: &mut BinaryHeap<BpeBigram>,
        out: &mut Vec<u32>,
    ) {
        syms.clear();
        heap.clear();
        let n_chars = word.chars().count() as i32;
        let mut buf = [0u8; 4];
        for (i, (start, c)) in word.char_indices().enumerate() {
            let i = i as i32;
            let id = vocab.get(c.encode_utf8(&mut buf)).unwrap_or(EMPTY);
            syms.push(BpeSym {
                start: start as u32,
                len: c.len_utf8() as u32,
                id,
                prev: i - 1,
                next: if i + 1 == n_chars { -1 } else { i + 1 },
            });
        }
        let add = |syms: &[BpeSym], heap: &mut BinaryHeap<BpeBigram>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            if ls.id == EMPTY || rs.id == EMPTY {
                return;
            }
            if let Some(&(rank, new_id)) = self.merges.get(&pair_key(ls.id, rs.id)) {
                heap.push(BpeBigram {
                    rank,
                    left: l as u32,
                    right: r as u32,
                    llen: ls.len,
                    rlen: rs.len,
                    new_id,
                });
            }
        };
        for i in 1..syms.len() as i32 {
            add(syms, heap, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left as usize], syms[bg.right as usize]);
            if l.len == 0 || r.len == 0 || l.len != bg.llen || r.len != bg.rlen {
                continue; // outdated
            }
            {
                let ls = &mut syms[bg.left as usize];
                ls.len += r.len;
                ls.id = bg.new_id;
                ls.next = r.next;
            }
            syms[bg.right as usize].len = 0;
            if r.next >= 0 {
                syms[r.next as usize].prev = bg.left as i32;
            }
            add(syms, heap, l.prev, bg.left as i32);
            add(syms, heap, bg.left as i32, r.next);
        }
        let mut i = 0i32;
        while i >= 0 {
            let s = syms[i as usize];
            if s.id != EMPTY {
                out.push(s.id);
            } else {
                // Not a token: fall back to one token per (byte-level) char.
                let t = &word[s.start as usize..(s.start + s.len) as usize];
                for c in t.chars() {
                    if let Some(id) = vocab.get(c.encode_utf8(&mut buf)) {
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
    }

    /// llama.cpp's `llama_decode_text`: byte-level chars back to bytes; chars
    /// outside the table pass through as UTF-8.
    fn decode_piece(&self, text: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(text.len());
        for c in text.chars() {
            let cp = c as usize;
            match self.byte_inv.get(cp) {
                Some(&b) if b >= 0 => v.push(b as u8),
                _ => {
                    let mut buf = [0u8; 4];
                    v.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        v
    }
}

#[derive(Clone, Copy)]
struct SpmSym {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

struct SpmBigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for SpmBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for SpmBigram {}
impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for SpmBigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl SpmModel {
    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on already-escaped text.
    fn tokenize(&self, vocab: &VocabTable, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<SpmSym> = Vec::with_capacity(text.len());
        for (idx, (start, c)) in text.char_indices().enumerate() {
            let idx = idx as isize;
            let len = c.len_utf8();
            let end = start + len;
            syms.push(SpmSym {
                start,
                len,
                prev: idx - 1,
                next: if end == text.len() { -1 } else { idx + 1 },
            });
        }
        if syms.is_empty() {
            return;
        }
        let mut heap = BinaryHeap::new();
        let try_add =
            |syms: &[SpmSym], heap: &mut BinaryHeap<SpmBigram>, left: isize, right: isize| {
                if left < 0 || right < 0 {
                    return;
                }
                let (l, r) = (syms[left as usize], syms[right as usize]);
                let s = &text[l.start..l.start + l.len + r.len];
                if let Some(id) = vocab.get(s) {
                    heap.push(SpmBigram {
                        left: left as usize,
                        right: right as usize,
                        score: self.scores[id as usize],
                        size: s.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(&syms, &mut heap, i as isize - 1, i as isize);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if r.next >= 0 {
                syms[r.next as usize].prev = bg.left as isize;
            }
            let prev = syms[bg.left].prev;
            let next = syms[bg.left].next;
            try_add(&syms, &mut heap, prev, bg.left as isize);
            try_add(&syms, &mut heap, bg.left as isize, next);
        }
        let mut i = 0isize;
        while i != -1 {
            let s = syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match vocab.get(piece) {
                Some(id) => out.push(id),
                None => {
                    // Merged symbols are always tokens, so only single chars
                    // land here: emit their bytes.
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize] {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Array, Value};

    /// A tiny SPM vocab: pieces with scores, bytes, control tokens.
    fn spm_md() -> Metadata {
        let mut toks: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u32 {
            toks.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (t, s) in [
            ("▁", -1.0f32),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("he", -3.0),
            ("ll", -3.5),
            ("▁he", -4.0),
            ("llo", -4.5),
            ("▁hello", -5.0),
            ("hello", -6.0),
        ] {
            toks.push(t.into());
            types.push(1);
            scores.push(s);
        }
        let mut md = Metadata::default();
        md.insert(keys::TOK_MODEL, Value::String("llama".into()));
        md.insert(keys::TOK_TOKENS, Value::Array(Array::Strings(toks)));
        md.insert(keys::TOK_TYPES, Value::Array(Array::I32(types)));
        md.insert(keys::TOK_SCORES, Value::Array(Array::F32(scores)));
        md
    }

    fn id(t: &Tokenizer, s: &str) -> u32 {
        (0..t.vocab_size() as u32)
            .find(|&i| t.token_text(i) == s)
            .unwrap()
    }

    #[test]
    fn tokenizer_spm_merges_by_score_and_byte_fallback() {
        let t = Tokenizer::from_gguf(&spm_md()).unwrap();
        assert_eq!(t.model_kind(), "llama");
        assert!(t.add_bos_default());
        assert_eq!(t.bos_id(), Some(1));
        let ids = t.encode("hello", false, false).unwrap();
        assert_eq!(ids, vec![id(&t, "▁hello")]);
        // "!" is not a piece: byte fallback 0x21.
        let ids = t.encode("hello!", true, false).unwrap();
        assert_eq!(ids, vec![1, id(&t, "▁hello"), 3 + 0x21]);
        assert_eq!(t.decode(&ids), "hello!");
        // Control text is literal unless parse_special.
        let lit = t.encode("</s>", false, false).unwrap();
        assert!(!lit.contains(&2));
        assert_eq!(
            t.encode("hello</s>", false, true).unwrap(),
            vec![id(&t, "▁hello"), 2]
        );
        assert!(t.is_eog(2));
    }

    #[test]
    fn tokenizer_stream_decoder_holds_partial_utf8() {
        let t = Tokenizer::from_gguf(&spm_md()).unwrap();
        // "é" = C3 A9, sent as two byte tokens.
        let mut d = StreamDecoder::new(&t);
        assert_eq!(d.push(3 + 0xC3), "");
        assert_eq!(d.push(3 + 0xA9), "é");
        assert_eq!(d.push(3 + 0xF0), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn tokenizer_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder<'static>>();
    }

    #[test]
    fn tokenizer_byte_level_table_roundtrip() {
        let (fwd, inv) = byte_level_tables();
        assert_eq!(fwd[b' ' as usize], 'Ġ');
        assert_eq!(fwd[b'\n' as usize], 'Ċ');
        for b in 0..256usize {
            assert_eq!(inv[fwd[b] as usize], b as i16);
        }
    }

    #[test]
    fn tokenizer_rejects_unknown_model_and_pre() {
        let mut md = spm_md();
        md.insert(keys::TOK_MODEL, Value::String("bert".into()));
        assert!(
            matches!(Tokenizer::from_gguf(&md), Err(TokenizerError::UnsupportedModel(m)) if m == "bert")
        );
        let mut md = spm_md();
        md.insert(keys::TOK_MODEL, Value::String("gpt2".into()));
        md.insert(keys::TOK_PRE, Value::String("mystery".into()));
        md.insert(keys::TOK_MERGES, Value::Array(Array::Strings(vec![])));
        let e = Tokenizer::from_gguf(&md).unwrap_err();
        assert!(e.to_string().contains("mystery"), "{e}");
    }
}
