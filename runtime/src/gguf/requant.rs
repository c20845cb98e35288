//! Re-encoding a GGUF's weight matrices as another block type: what `llama-quantize
//! --allow-requantize` does without an importance matrix, with one simple rule for which
//! tensors change. Used to make lower-precision variants of a model for quality evaluations
//! (`ember eval kld` against the original).
//!
//! Each changed tensor is dequantized to f32 and quantized again with ember's reference
//! round-to-nearest quantizer ([`crate::quant::quantize`]); the result is deterministic, the
//! same bytes on every machine.
//!
//! This is not llama-quantize's output: [`super::quantize`] (`ember quantize`) is, byte for
//! byte. This one stays only because `tests/eval.rs`'s llama-perplexity reference figures are
//! for the files it makes (their sha256 is pinned); moving that test to `super::quantize`'s Q4_0
//! means measuring those figures again for llama-quantize's Q4_0 files.

use rayon::prelude::*;

use super::{GgufFile, GgufWriter, Value, keys};
use crate::quant::{self, GgmlType, QuantError};

#[derive(Debug, thiserror::Error)]
pub enum RequantError {
    #[error("ember cannot encode {0} (it encodes: {1})")]
    Unsupported(GgmlType, String),
    #[error("tensor {name}: {source}")]
    Quantize {
        name: String,
        #[source]
        source: QuantError,
    },
}

/// Whether `requantize` re-encodes tensor `name` of type `from` with rows of `dims[0]` as `to`:
/// matrices (2-D, quantized or 16-bit) whose rows are whole blocks of `to`, except the output
/// projection, which llama.cpp keeps at higher precision: `output.weight`, or the token
/// embeddings when the model ties them to the output (`tied`, no `output.weight`). Its Q4_0 of
/// our Qwen keeps `output.weight` as Q8_0; of SmolLM2 (tied), `token_embd.weight` as Q8_0.
/// Norms, biases and other f32 tensors stay as they are.
pub fn changes(name: &str, from: GgmlType, dims: &[u64], to: GgmlType, tied: bool) -> bool {
    let output = name == "output.weight" || (tied && name == "token_embd.weight");
    dims.len() >= 2
        && from != GgmlType::F32
        && from != to
        && !output
        && (dims[0] as usize).is_multiple_of(to.block_len())
}

/// A GGUF like `src` (its metadata, tensor order and alignment) with the tensors [`changes`]
/// picks re-encoded as `to`. `general.file_type` is dropped (the mix is no longer the one it
/// named) and `ember.requantized_to` records `to`.
pub fn requantize(src: &GgufFile, to: GgmlType) -> Result<GgufWriter, RequantError> {
    if !to.is_supported() || matches!(to, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        let names: Vec<String> = GgmlType::SUPPORTED
            .iter()
            .filter(|t| !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16))
            .map(|t| t.to_string())
            .collect();
        return Err(RequantError::Unsupported(to, names.join(", ")));
    }
    let mut w = GgufWriter::new();
    w.alignment = src.alignment;
    w.version = src.version;
    for (k, v) in src.metadata.iter() {
        if k != keys::FILE_TYPE {
            w.kv(k, v.clone());
        }
    }
    w.kv("ember.requantized_to", Value::String(to.to_string()));
    let tied = src.tensor("output.weight").is_none();
    // Tensors in parallel (each is independent; the bytes do not depend on the thread count).
    let encoded: Vec<(GgmlType, Vec<u8>)> = src
        .tensors
        .par_iter()
        .map(|t| {
            let bytes = src.tensor_bytes(t);
            if !changes(&t.name, t.ty, &t.dims, to, tied) {
                return Ok((t.ty, bytes.to_vec()));
            }
            let err = |source| RequantError::Quantize {
                name: t.name.clone(),
                source,
            };
            let mut f = vec![0f32; t.n_elements() as usize];
            quant::dequantize(t.ty, bytes, &mut f).map_err(err)?;
            Ok((to, quant::quantize(to, &f).map_err(err)?))
        })
        .collect::<Result<_, RequantError>>()?;
    for (t, (ty, data)) in src.tensors.iter().zip(encoded) {
        w.tensor(&t.name, &t.dims, ty, data);
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_change_norms_biases_and_the_output_projection_stay() {
        use GgmlType::*;
        assert!(changes(
            "blk.0.ffn_up.weight",
            Q4_K,
            &[896, 4864],
            Q4_0,
            false
        ));
        assert!(changes(
            "token_embd.weight",
            Q5_0,
            &[896, 151936],
            Q4_0,
            false
        ));
        assert!(!changes("output.weight", Q8_0, &[896, 151936], Q4_0, false));
        // Tied embeddings are the output projection.
        assert!(!changes(
            "token_embd.weight",
            Q8_0,
            &[576, 49152],
            Q4_0,
            true
        ));
        assert!(!changes("blk.0.attn_norm.weight", F32, &[896], Q4_0, false));
        assert!(!changes("blk.0.attn_q.bias", F32, &[896], Q4_0, false));
        assert!(!changes(
            "blk.0.ffn_up.weight",
            Q4_0,
            &[896, 4864],
            Q4_0,
            false
        ));
        // 896 is not a multiple of Q4_K's 256: kept as it is.
        assert!(!changes(
            "blk.0.ffn_up.weight",
            Q5_0,
            &[896, 4864],
            Q4_K,
            false
        ));
    }
}
