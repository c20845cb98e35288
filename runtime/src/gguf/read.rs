//! Parsing a GGUF image: open (map, or read into anonymous memory), then check every count,
//! offset and size before it is used.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::*;

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

impl Cursor<'_> {
    /// Magic, version, tensor and metadata counts.
    fn header(&mut self) -> Result<(u32, u64, u64), GgufError> {
        let magic: [u8; 4] = self.arr("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: self.path.to_path_buf(),
                found: magic,
            });
        }
        let version = self.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: self.path.to_path_buf(),
                version,
            });
        }
        let n_tensors = self.u64("tensor count")?;
        let n_kv = self.u64("metadata count")?;
        let remaining = self.buf.len() as u64;
        if n_tensors > remaining || n_kv > remaining {
            return Err(self.malformed(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata keys"
            )));
        }
        Ok((version, n_tensors, n_kv))
    }

    /// Tensor info `#i`: name, dims, type, offset, checked (dims, size, alignment).
    fn tensor_info(&mut self, i: u64, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string(&format!("tensor #{i} name"))?;
        let n_dims = self.u32(&format!("tensor '{name}' n_dims"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.malformed(format!(
                "tensor '{name}': {n_dims} dims (1..={MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(&format!("tensor '{name}' dims"))?);
        }
        let type_id = self.u32(&format!("tensor '{name}' type"))?;
        let offset = self.u64(&format!("tensor '{name}' offset"))?;
        let ty = GgmlType::from_u32(type_id).ok_or_else(|| GgufError::UnknownType {
            path: self.path.to_path_buf(),
            name: name.clone(),
            type_id,
        })?;
        let overflow = || GgufError::DimsOverflow {
            path: self.path.to_path_buf(),
            name: name.clone(),
            dims: dims.clone(),
        };
        let n_el = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(overflow)?;
        let bl = ty.block_len() as u64;
        if dims[0] % bl != 0 {
            return Err(self.malformed(format!(
                "tensor '{name}': row length {} is not a multiple of the {} block size {bl}",
                dims[0],
                ty.name()
            )));
        }
        let n_bytes = (n_el / bl)
            .checked_mul(ty.block_bytes() as u64)
            .ok_or_else(overflow)?;
        if offset % alignment != 0 {
            return Err(self.malformed(format!(
                "tensor '{name}': offset {offset} not aligned to {alignment}"
            )));
        }
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
        })
    }
}

/// Every tensor's data lies inside the file (`len` bytes), from `data_offset` on.
fn check_data_in_file(
    path: &Path,
    tensors: &[TensorInfo],
    data_offset: u64,
    len: u64,
) -> Result<(), GgufError> {
    for t in tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(e)) if e <= len => {}
            _ => {
                return Err(GgufError::DataPastEnd {
                    path: path.to_path_buf(),
                    name: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    len,
                });
            }
        }
    }
    Ok(())
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
    pub(super) fn parse_anon(
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
        let (version, n_tensors, n_kv) = c.header()?;
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
            let t = c.tensor_info(i, alignment)?;
            if index.insert(t.name.clone(), tensors.len()).is_some() {
                return Err(c.malformed(format!("duplicate tensor '{}'", t.name)));
            }
            tensors.push(t);
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        check_data_in_file(&path, &tensors, data_offset, buf.len() as u64)?;
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
}
