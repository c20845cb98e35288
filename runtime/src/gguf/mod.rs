//! GGUF v2/v3 reader on a memory mapping, plus a small writer (for the embedded
//! default model and for tests that build files byte by byte).
//!
//! Format (ggml `docs/gguf.md`): magic "GGUF", u32 version, u64 tensor count,
//! u64 metadata kv count, the kvs, the tensor infos, padding to
//! `general.alignment`, then the tensor data. All little-endian.
//!
//! The reader never copies tensor data: [`GgufFile::tensor_bytes`] returns a
//! slice of the mapping. Every length and offset read from the file is checked
//! before it is used, so a hostile file gives an error, never a panic.
//!
//! Here: the errors, metadata values and keys, [`GgufFile`] and its accessors;
//! `read.rs` parses (open, map, check every count, offset and size); `write.rs` is
//! [`GgufWriter`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::quant::GgmlType;

pub mod quantize;
mod read;
pub mod requant;
pub mod synth;
#[cfg(test)]
mod tests;
mod write;

pub use write::GgufWriter;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Defensive bounds: a real file is far below these.
const MAX_STRING_LEN: u64 = 1 << 30;
const MAX_ARRAY_LEN: u64 = 1 << 32;
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // `err`, not `source`: the message already carries the I/O error, and a `source` would
    // make error-chain printers (anyhow's `{:#}`) repeat it.
    #[error("{path}: cannot open: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a regular file ({kind}); give the path of a .gguf file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{path}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (ember reads v2 and v3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error(
        "{path}: truncated: {what} at byte {offset} runs past the end of the file ({len} bytes)"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
    },
    #[error("{path}: malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path}: tensor '{name}' has unknown quant type id {type_id}")]
    UnknownType {
        path: PathBuf,
        name: String,
        type_id: u32,
    },
    #[error("{path}: tensor '{name}': dims {dims:?} overflow")]
    DimsOverflow {
        path: PathBuf,
        name: String,
        dims: Vec<u64>,
    },
    #[error(
        "{path}: tensor '{name}' data [{start}, {end}) runs past the end of the file ({len} bytes)"
    )]
    DataPastEnd {
        path: PathBuf,
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
}

/// GGUF metadata value types (the on-disk ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
}

/// A metadata value. Arrays are typed so that a 150k-entry vocabulary is one
/// `Vec<String>`, not 150k boxed values.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Array),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    Strings(Vec<String>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    F32(Vec<f32>),
    /// Any other element type (kept generic; rare in practice).
    Other(Vec<Value>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::Strings(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Other(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
            Value::Array(Array::Strings(_)) => "array<string>",
            Value::Array(Array::I32(_)) => "array<i32>",
            Value::Array(Array::U32(_)) => "array<u32>",
            Value::Array(Array::F32(_)) => "array<f32>",
            Value::Array(Array::Other(_)) => "array",
        }
    }
    /// Any integer type that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => {
                let short: String = s.chars().take(80).collect();
                if short.len() < s.len() {
                    write!(f, "{short:?}… ({} bytes)", s.len())
                } else {
                    write!(f, "{s:?}")
                }
            }
            Value::Array(a) => write!(f, "[{}; {}]", self.type_name(), a.len()),
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
        }
    }
}

/// Architecture-scoped hyper-parameter keys (`{arch}.{suffix}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchKey {
    ContextLength,
    EmbeddingLength,
    BlockCount,
    FeedForwardLength,
    HeadCount,
    HeadCountKv,
    RopeFreqBase,
    RopeDimensionCount,
    LayerNormRmsEpsilon,
    VocabSize,
}

impl ArchKey {
    pub fn suffix(self) -> &'static str {
        match self {
            ArchKey::ContextLength => "context_length",
            ArchKey::EmbeddingLength => "embedding_length",
            ArchKey::BlockCount => "block_count",
            ArchKey::FeedForwardLength => "feed_forward_length",
            ArchKey::HeadCount => "attention.head_count",
            ArchKey::HeadCountKv => "attention.head_count_kv",
            ArchKey::RopeFreqBase => "rope.freq_base",
            ArchKey::RopeDimensionCount => "rope.dimension_count",
            ArchKey::LayerNormRmsEpsilon => "attention.layer_norm_rms_epsilon",
            ArchKey::VocabSize => "vocab_size",
        }
    }
    pub fn key(self, arch: &str) -> String {
        format!("{arch}.{}", self.suffix())
    }
}

/// Well-known global keys.
pub mod keys {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const ALIGNMENT: &str = "general.alignment";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const TOK_MODEL: &str = "tokenizer.ggml.model";
    pub const TOK_PRE: &str = "tokenizer.ggml.pre";
    pub const TOK_TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOK_TYPES: &str = "tokenizer.ggml.token_type";
    pub const TOK_SCORES: &str = "tokenizer.ggml.scores";
    pub const TOK_MERGES: &str = "tokenizer.ggml.merges";
    pub const TOK_BOS: &str = "tokenizer.ggml.bos_token_id";
    pub const TOK_EOS: &str = "tokenizer.ggml.eos_token_id";
    pub const TOK_EOT: &str = "tokenizer.ggml.eot_token_id";
    pub const TOK_UNK: &str = "tokenizer.ggml.unknown_token_id";
    pub const TOK_PAD: &str = "tokenizer.ggml.padding_token_id";
    pub const TOK_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const TOK_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const TOK_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// Ordered metadata map with typed accessors.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    map: BTreeMap<String, Value>,
    order: Vec<String>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }
    pub fn insert(&mut self, key: impl Into<String>, v: Value) {
        let key = key.into();
        if self.map.insert(key.clone(), v).is_none() {
            self.order.push(key);
        }
    }
    /// Keys in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.order.iter().map(|k| (k.as_str(), &self.map[k]))
    }
    pub fn len(&self) -> usize {
        self.order.len()
    }
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }
    pub fn get_strings(&self, key: &str) -> Option<&[String]> {
        match self.get(key) {
            Some(Value::Array(Array::Strings(v))) => Some(v),
            _ => None,
        }
    }
    pub fn get_i32s(&self, key: &str) -> Option<&[i32]> {
        match self.get(key) {
            Some(Value::Array(Array::I32(v))) => Some(v),
            _ => None,
        }
    }
    pub fn get_f32s(&self, key: &str) -> Option<&[f32]> {
        match self.get(key) {
            Some(Value::Array(Array::F32(v))) => Some(v),
            _ => None,
        }
    }
    pub fn architecture(&self) -> Option<&str> {
        self.get_str(keys::ARCHITECTURE)
    }
    pub fn arch_u64(&self, arch: &str, k: ArchKey) -> Option<u64> {
        self.get_u64(&k.key(arch))
    }
    pub fn arch_f64(&self, arch: &str, k: ArchKey) -> Option<f64> {
        self.get_f64(&k.key(arch))
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous (column) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// (rows, cols) for a matrix; a vector is one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        let rows = self.dims.iter().skip(1).product::<u64>() as usize;
        (rows, cols)
    }
}

/// A GGUF file mapped into memory.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// The bytes are the file's own pages (`open`), not a copy in anonymous memory (`read`).
    mapped: bool,
    pub version: u32,
    pub alignment: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether the weights are the file's mapped pages ([`GgufFile::open`]) rather than a copy
    /// in anonymous memory ([`GgufFile::read`], `--no-mmap`).
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }
    /// Zero-copy view of a tensor's bytes inside the mapping (bounds were checked at open).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let s = (self.data_offset + t.offset) as usize;
        &self.mmap[s..s + t.n_bytes as usize]
    }
    /// All of the mapping (for hashing).
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key, "unsigned integer", Value::as_u64)
    }
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.require(key, "string", Value::as_str)
    }
    /// Metadata `key` through `get`: missing, or of another type than `expected`, is an error.
    fn require<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        get: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T, GgufError> {
        let v = self
            .metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            })?;
        get(v).ok_or_else(|| GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            found: v.type_name(),
            expected,
        })
    }
    /// Advise the kernel about the access pattern of the whole mapping.
    pub fn advise_willneed(&self) {
        let _ = self.mmap.advise(memmap2::Advice::WillNeed);
    }
}

/// Parse a GGUF image held in memory (used by the fuzz target and tests).
pub fn parse_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    GgufFile::parse_anon(PathBuf::from("<memory>"), bytes.len(), |buf| {
        buf.copy_from_slice(bytes);
        Ok(())
    })
}
