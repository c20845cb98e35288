//! Synthetic GGUFs: a real model's metadata (its tokenizer and chat template included), tensor
//! names, shapes and block types, with made-up weights. For measuring speed where the real file
//! cannot go, such as a lent GPU machine that takes at most 64 MiB: speed does not depend on the
//! weights' values, and llama.cpp reads the same file, so comparisons stay side by side. The
//! outputs are meaningless.
//!
//! Each tensor is one seeded random row, quantized to the tensor's own type, and repeated for
//! every row. The arithmetic is realistic (real scales, every quant value in play), and the file
//! compresses to about one row per tensor (`xz`).

use super::{GgufFile, GgufWriter, Value};
use crate::quant::{self, GgmlType, QuantError};

/// Why a file could not be synthesised.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("tensor {name}: {source}")]
    Quantize {
        name: String,
        #[source]
        source: QuantError,
    },
    #[error(
        "tensor {name} has type {ty}, which ember cannot encode; nothing to synthesise it from"
    )]
    Unsupported { name: String, ty: GgmlType },
}

/// Metadata key set to true in every synthetic file, so that no run mistakes it for the model.
pub const SYNTHETIC_KEY: &str = "ember.synthetic";

/// A GGUF like `src`: the same metadata (plus [`SYNTHETIC_KEY`], and "(synthetic)" after
/// `general.name`) and the same tensors, in the same order and alignment, with weights from
/// `seed`.
pub fn synth_like(src: &GgufFile, seed: u64) -> Result<GgufWriter, SynthError> {
    let mut w = GgufWriter::new();
    // `general.alignment`, when the source has it, is copied with the rest of the metadata.
    w.alignment = src.alignment;
    w.version = src.version;
    let mut named = false;
    for (k, v) in src.metadata.iter() {
        let v = match (k, v) {
            ("general.name", Value::String(n)) => {
                named = true;
                Value::String(format!("{n} (synthetic)"))
            }
            _ => v.clone(),
        };
        w.kv(k, v);
    }
    if !named {
        w.kv("general.name", Value::String("synthetic".into()));
    }
    w.kv(SYNTHETIC_KEY, Value::Bool(true));
    for (i, t) in src.tensors.iter().enumerate() {
        let cols = t.dims.first().copied().unwrap_or(1).max(1) as usize;
        let rows = (t.n_elements() as usize / cols).max(1);
        let norm = t.name.ends_with("norm.weight");
        let row = random_row(
            cols,
            seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            norm,
        );
        if !t.ty.is_supported() {
            return Err(SynthError::Unsupported {
                name: t.name.clone(),
                ty: t.ty,
            });
        }
        let one = quant::quantize(t.ty, &row).map_err(|source| SynthError::Quantize {
            name: t.name.clone(),
            source,
        })?;
        w.tensor(&t.name, &t.dims, t.ty, one.repeat(rows));
    }
    Ok(w)
}

/// `n` values from `seed`: near 1 for a norm's weight (as trained norms are), else small and
/// centred, as trained matrices are.
fn random_row(n: usize, seed: u64, norm: bool) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5; // [-0.5, 0.5)
            if norm { 1.0 + 0.1 * u } else { 0.1 * u }
        })
        .collect()
}
