//! [`GgufWriter`]: builds a GGUF file in memory.

use super::*;

/// A GGUF writer. Builds the whole file in memory: it is used for the embedded
/// default model (a few MB), test files and requantized test models (the whole file is
/// built in memory: hundreds of MB for a 0.5B model).
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
