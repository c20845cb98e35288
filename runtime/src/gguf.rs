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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::quant::GgmlType;

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

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let end = (self.pos as u64)
            .checked_add(n)
            .filter(|&e| e <= self.buf.len() as u64);
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                len: self.buf.len() as u64,
            }),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_STRING_LEN {
            return Err(self.malformed(format!("{what}: string length {n} is implausible")));
        }
        let b = self.take(n, what)?;
        // Tokenizer vocabularies occasionally hold invalid UTF-8 pieces; keep them lossily
        // rather than refusing the whole file.
        Ok(match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        })
    }
    fn malformed(&self, what: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            what,
        }
    }
    fn scalar(&mut self, t: ValueType, what: &str) -> Result<Value, GgufError> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.arr::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            ValueType::Bool => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.malformed(format!("{what}: bool byte {b}"))),
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            ValueType::Array => return Err(self.malformed(format!("{what}: nested array"))),
        })
    }
    fn value(&mut self, t: ValueType, what: &str) -> Result<Value, GgufError> {
        if t != ValueType::Array {
            return self.scalar(t, what);
        }
        let et_raw = self.u32(what)?;
        let et = ValueType::from_u32(et_raw).ok_or_else(|| {
            self.malformed(format!("{what}: unknown array element type {et_raw}"))
        })?;
        let n = self.u64(what)?;
        // Every element takes at least one byte, so a count beyond the remaining bytes is a lie.
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > MAX_ARRAY_LEN || n > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what}: array of {n} elements"),
                offset: self.pos as u64,
                len: self.buf.len() as u64,
            });
        }
        let n = n as usize;
        Ok(Value::Array(match et {
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(what)?);
                }
                Array::Strings(v)
            }
            ValueType::I32 => {
                let b = self.take(n as u64 * 4, what)?;
                Array::I32(
                    b.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }
            ValueType::U32 => {
                let b = self.take(n as u64 * 4, what)?;
                Array::U32(
                    b.chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }
            ValueType::F32 => {
                let b = self.take(n as u64 * 4, what)?;
                Array::F32(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }
            ValueType::Array => return Err(self.malformed(format!("{what}: nested array"))),
            _ => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.scalar(et, what)?);
                }
                Array::Other(v)
            }
        }))
    }
}

/// A model must be a regular file: a directory, a device (`/dev/null`), a FIFO or a socket
/// would otherwise fail later with the OS's less helpful words ("No such device"). Checked on
/// the path before opening it: opening a FIFO would block.
fn check_regular(path: &Path) -> Result<(), GgufError> {
    let ft = std::fs::metadata(path)
        .map_err(|err| GgufError::Io {
            path: path.to_path_buf(),
            err,
        })?
        .file_type();
    if ft.is_file() {
        return Ok(());
    }
    #[cfg(unix)]
    let kind = {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            "a directory"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_fifo() {
            "a pipe"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        }
    };
    #[cfg(not(unix))]
    let kind = if ft.is_dir() {
        "a directory"
    } else {
        "not a file"
    };
    Err(GgufError::NotAFile {
        path: path.to_path_buf(),
        kind,
    })
}

impl GgufFile {
    /// Map and parse a GGUF file. Tensor data is not touched.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |err| GgufError::Io {
            path: path.clone(),
            err,
        };
        check_regular(&path)?;
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. A file
        // truncated by another process while mapped would fault; that is the same
        // contract llama.cpp and every mmap-based loader accept.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(io)?;
        Self::parse(path, mmap, true)
    }

    /// Read a whole GGUF file into anonymous memory (asking the kernel for transparent huge
    /// pages) and parse it: `--no-mmap`. The weights then sit on 2 MiB pages where the kernel
    /// grants them, not on the 4 KiB pages of a file mapping, which costs a TLB miss per 4 KiB
    /// of weights streamed in every decode step; the price is a copy at load (RAM the kernel
    /// cannot reclaim as it can clean file pages).
    pub fn read(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        use std::io::Read;
        let path = path.as_ref().to_path_buf();
        let io = |err| GgufError::Io {
            path: path.clone(),
            err,
        };
        check_regular(&path)?;
        let mut file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len() as usize;
        Self::parse_anon(path, len, |buf| file.read_exact(buf))
    }

    /// Parse the `len`-byte GGUF image that `fill` writes into fresh anonymous memory (on huge
    /// pages where the kernel grants them); `path` names it in errors.
    fn parse_anon(
        path: PathBuf,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<Self, GgufError> {
        let io = |err| GgufError::Io {
            path: path.clone(),
            err,
        };
        let mut anon = memmap2::MmapMut::map_anon(len.max(1)).map_err(io)?;
        #[cfg(target_os = "linux")]
        let _ = anon.advise(memmap2::Advice::HugePage);
        fill(&mut anon[..len]).map_err(io)?;
        // `ro.len()` is `len` (memmap2 hides the page rounding), except the 1 byte mapped for an
        // empty image, which is refused here.
        let ro = anon.make_read_only().map_err(io)?;
        if len == 0 {
            return Err(GgufError::Truncated {
                path,
                what: "magic".into(),
                offset: 0,
                len: 0,
            });
        }
        Self::parse(path, ro, false)
    }

    fn parse(path: PathBuf, mmap: memmap2::Mmap, mapped: bool) -> Result<Self, GgufError> {
        let buf: &[u8] = &mmap;
        let mut c = Cursor {
            buf,
            pos: 0,
            path: &path,
        };
        let magic: [u8; 4] = c.arr("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let remaining = buf.len() as u64;
        if n_tensors > remaining || n_kv > remaining {
            return Err(c.malformed(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata keys"
            )));
        }
        let mut metadata = Metadata::default();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let t_raw = c.u32(&format!("type of '{key}'"))?;
            let t = ValueType::from_u32(t_raw).ok_or_else(|| {
                c.malformed(format!("metadata '{key}': unknown value type {t_raw}"))
            })?;
            let v = c.value(t, &format!("value of '{key}'"))?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get(keys::ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(c.malformed(format!("general.alignment {v} is not a power of two")));
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&format!("tensor '{name}' n_dims"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.malformed(format!(
                    "tensor '{name}': {n_dims} dims (1..={MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("tensor '{name}' dims"))?);
            }
            let type_id = c.u32(&format!("tensor '{name}' type"))?;
            let offset = c.u64(&format!("tensor '{name}' offset"))?;
            let ty = GgmlType::from_u32(type_id).ok_or_else(|| GgufError::UnknownType {
                path: path.clone(),
                name: name.clone(),
                type_id,
            })?;
            let overflow = || GgufError::DimsOverflow {
                path: path.clone(),
                name: name.clone(),
                dims: dims.clone(),
            };
            let n_el = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(overflow)?;
            let bl = ty.block_len() as u64;
            if dims[0] % bl != 0 {
                return Err(c.malformed(format!(
                    "tensor '{name}': row length {} is not a multiple of the {} block size {bl}",
                    dims[0],
                    ty.name()
                )));
            }
            let n_bytes = (n_el / bl)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(overflow)?;
            if offset % alignment != 0 {
                return Err(c.malformed(format!(
                    "tensor '{name}': offset {offset} not aligned to {alignment}"
                )));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.malformed(format!("duplicate tensor '{name}'")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let len = buf.len() as u64;
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(_), Some(e)) if e <= len => {}
                _ => {
                    return Err(GgufError::DataPastEnd {
                        path: path.clone(),
                        name: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        len,
                    });
                }
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            mapped,
            version,
            alignment,
            metadata,
            tensors,
            index,
            data_offset,
        })
    }

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
        match self.metadata.get(key) {
            None => Err(GgufError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            }),
            Some(v) => v.as_u64().ok_or_else(|| GgufError::WrongType {
                path: self.path.clone(),
                key: key.to_string(),
                found: v.type_name(),
                expected: "unsigned integer",
            }),
        }
    }
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.metadata.get(key) {
            None => Err(GgufError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            }),
            Some(v) => v.as_str().ok_or_else(|| GgufError::WrongType {
                path: self.path.clone(),
                key: key.to_string(),
                found: v.type_name(),
                expected: "string",
            }),
        }
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

/// A GGUF writer. Builds the whole file in memory: it is used for the embedded
/// default model (a few MB) and for test files, never for real checkpoints.
#[derive(Default)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    pub alignment: u64,
    pub version: u32,
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            kvs: vec![],
            tensors: vec![],
            alignment: DEFAULT_ALIGNMENT,
            version: 3,
        }
    }
    pub fn kv(&mut self, key: impl Into<String>, v: Value) -> &mut Self {
        self.kvs.push((key.into(), v));
        self
    }
    /// `dims` in GGUF order (dims[0] contiguous). `data` must be the encoded blocks.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_scalar(out: &mut Vec<u8>, v: &Value) -> u32 {
        match v {
            Value::U8(x) => {
                out.push(*x);
                0
            }
            Value::I8(x) => {
                out.push(*x as u8);
                1
            }
            Value::U16(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                2
            }
            Value::I16(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                3
            }
            Value::U32(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                4
            }
            Value::I32(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                5
            }
            Value::F32(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                6
            }
            Value::Bool(x) => {
                out.push(*x as u8);
                7
            }
            Value::String(s) => {
                Self::put_str(out, s);
                8
            }
            Value::U64(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                10
            }
            Value::I64(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                11
            }
            Value::F64(x) => {
                out.extend_from_slice(&x.to_le_bytes());
                12
            }
            Value::Array(_) => unreachable!("arrays handled by put_value"),
        }
    }
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        let type_pos = out.len();
        out.extend_from_slice(&[0u8; 4]);
        let t = match v {
            Value::Array(a) => {
                let (et, n): (u32, usize) = match a {
                    Array::Strings(x) => (8, x.len()),
                    Array::I32(x) => (5, x.len()),
                    Array::U32(x) => (4, x.len()),
                    Array::F32(x) => (6, x.len()),
                    Array::Other(x) => (
                        x.first()
                            .map(|e| Self::put_scalar(&mut Vec::new(), e))
                            .unwrap_or(0),
                        x.len(),
                    ),
                };
                out.extend_from_slice(&et.to_le_bytes());
                out.extend_from_slice(&(n as u64).to_le_bytes());
                match a {
                    Array::Strings(x) => x.iter().for_each(|s| Self::put_str(out, s)),
                    Array::I32(x) => x
                        .iter()
                        .for_each(|e| out.extend_from_slice(&e.to_le_bytes())),
                    Array::U32(x) => x
                        .iter()
                        .for_each(|e| out.extend_from_slice(&e.to_le_bytes())),
                    Array::F32(x) => x
                        .iter()
                        .for_each(|e| out.extend_from_slice(&e.to_le_bytes())),
                    Array::Other(x) => x.iter().for_each(|e| {
                        Self::put_scalar(out, e);
                    }),
                }
                9
            }
            s => Self::put_scalar(out, s),
        };
        out[type_pos..type_pos + 4].copy_from_slice(&t.to_le_bytes());
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            Self::put_str(&mut out, k);
            Self::put_value(&mut out, v);
        }
        let al = self.alignment.max(1);
        let mut offset = 0u64;
        let mut offsets = vec![];
        for (name, dims, ty, data) in &self.tensors {
            Self::put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(al) * al;
        }
        let data_start = (out.len() as u64).div_ceil(al) * al;
        out.resize(data_start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.kv(keys::ARCHITECTURE, Value::String("llama".into()))
            .kv("llama.block_count", Value::U32(2))
            .kv("llama.rope.freq_base", Value::F32(10000.0))
            .kv(
                keys::TOK_TOKENS,
                Value::Array(Array::Strings(vec!["a".into(), "b".into()])),
            )
            .kv(keys::TOK_ADD_BOS, Value::Bool(true))
            .tensor(
                "w",
                &[4, 2],
                GgmlType::F32,
                f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
            )
            .tensor("v", &[3], GgmlType::F32, f32_bytes(&[9., 10., 11.]));
        w
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        let g = parse_bytes(&sample().to_bytes()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.metadata.architecture(), Some("llama"));
        assert_eq!(g.metadata.arch_u64("llama", ArchKey::BlockCount), Some(2));
        assert_eq!(
            g.metadata.arch_f64("llama", ArchKey::RopeFreqBase),
            Some(10000.0)
        );
        assert_eq!(
            g.metadata.get_strings(keys::TOK_TOKENS).unwrap(),
            &["a".to_string(), "b".to_string()]
        );
        assert_eq!(g.metadata.get_bool(keys::TOK_ADD_BOS), Some(true));
        let w = g.tensor("w").unwrap();
        assert_eq!(w.rows_cols(), (2, 4));
        assert_eq!(
            g.tensor_bytes(w),
            &f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.])[..]
        );
        let v = g.tensor("v").unwrap();
        assert_eq!(v.offset % 32, 0);
        assert_eq!(g.tensor_bytes(v), &f32_bytes(&[9., 10., 11.])[..]);
        assert!(g.tensor("missing").is_none());
        assert!(matches!(
            g.require_tensor("missing"),
            Err(GgufError::MissingTensor { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().to_bytes();
        for cut in 0..bytes.len() - 1 {
            match parse_bytes(&bytes[..cut]) {
                Err(GgufError::Truncated { .. }) | Err(GgufError::DataPastEnd { .. }) => {}
                Err(e) => panic!("cut at {cut}: unexpected error kind {e}"),
                Ok(_) => {
                    // Only acceptable if the cut fell in trailing tensor padding: not here,
                    // the last tensor ends the file.
                    panic!("cut at {cut} parsed")
                }
            }
        }
    }

    /// A cheap stable-toolchain cousin of the cargo-fuzz target: thousands of
    /// seeded byte mutations of a valid file must each parse or fail cleanly.
    #[test]
    fn mutated_files_never_panic() {
        let base = sample().to_bytes();
        let mut rng = crate::sample::Rng::new(7);
        let mut parsed = 0;
        for _ in 0..5000 {
            let mut b = base.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let i = (rng.next_u64() % b.len() as u64) as usize;
                b[i] = match rng.next_u64() % 3 {
                    0 => rng.next_u64() as u8,
                    1 => 0xff,
                    _ => 0,
                };
            }
            if let Ok(g) = parse_bytes(&b) {
                parsed += 1;
                for t in &g.tensors {
                    assert_eq!(g.tensor_bytes(t).len() as u64, t.n_bytes);
                }
            }
        }
        // Mutations in tensor data leave the file valid; most others do not.
        assert!(parsed > 0 && parsed < 5000, "{parsed}");
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample().to_bytes();
        b[0] = b'X';
        assert!(matches!(parse_bytes(&b), Err(GgufError::BadMagic { .. })));
        let mut b = sample().to_bytes();
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        let e = parse_bytes(&b).unwrap_err();
        assert!(matches!(
            e,
            GgufError::UnsupportedVersion { version: 7, .. }
        ));
        assert!(e.to_string().contains("unsupported GGUF version 7"));
        let mut w = sample();
        w.version = 2;
        assert_eq!(parse_bytes(&w.to_bytes()).unwrap().version, 2);
    }

    #[test]
    fn dims_overflow_and_unknown_type() {
        let mut w = GgufWriter::new();
        w.tensor("big", &[u64::MAX / 2, 4], GgmlType::F32, vec![]);
        assert!(matches!(
            parse_bytes(&w.to_bytes()),
            Err(GgufError::DimsOverflow { .. })
        ));
        let mut w = GgufWriter::new();
        w.tensor("t", &[32], GgmlType::F32, vec![0; 128]);
        let mut b = w.to_bytes();
        // The type id sits right after name (8+1), n_dims (4) and one dim (8).
        let p = 24 + 8 + 1 + 4 + 8;
        b[p..p + 4].copy_from_slice(&999u32.to_le_bytes());
        assert!(matches!(
            parse_bytes(&b),
            Err(GgufError::UnknownType { type_id: 999, .. })
        ));
    }

    #[test]
    fn data_past_end() {
        let mut w = GgufWriter::new();
        w.tensor("t", &[64], GgmlType::F32, vec![0; 64]); // 256 bytes declared, 64 present
        let e = parse_bytes(&w.to_bytes()).unwrap_err();
        assert!(matches!(e, GgufError::DataPastEnd { .. }), "{e}");
    }
}
