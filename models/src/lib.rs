//! ember model architectures. One file per architecture ([`llama`], [`qwen2`], [`qwen3`],
//! [`phi3`], [`gemma3`]) is an `ArchSpec`: the differences (biases, q/k norms, post-norms, the
//! FFN activation, sliding windows, RoPE style and scaling, tied output head) carried as data
//! rather than as copies of the code.
//!
//! - [`transformer`]: the specs, GGUF tensor names, hyper-parameters and the weights bound to
//!   the mapping (`Transformer`, the CPU model).
//! - `decoder`: the layer order, written once over the `DecoderOps` trait, and the batch plan
//!   (reservation, rows, positions, commit, logits rows) every executor shares.
//! - `host`: the CPU executor (host buffers, mmapped quantized matmuls, paged host KV).
//! - [`device`]: the burn-device executor (`DeviceTransformer`: wgpu, or burn-flex in tests).

mod decoder;
#[cfg(feature = "wgpu")]
pub mod device;
pub mod gemma3;
mod host;
pub mod llama;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod transformer;

use std::sync::Arc;

use ember_runtime::gguf::GgufFile;
use ember_runtime::model::{Model, ModelError};

/// Architectures ember can run, by `general.architecture`.
pub const SUPPORTED: &[&str] = &[
    llama::ARCH,
    qwen2::ARCH,
    qwen3::ARCH,
    phi3::ARCH,
    gemma3::ARCH,
];

/// Bind a mapped GGUF file to its architecture's decoder.
pub fn load_transformer(file: Arc<GgufFile>) -> Result<transformer::Transformer, ModelError> {
    let arch = file
        .require_str(ember_runtime::gguf::keys::ARCHITECTURE)?
        .to_string();
    match arch.as_str() {
        llama::ARCH => llama::load(file),
        qwen2::ARCH => qwen2::load(file),
        qwen3::ARCH => qwen3::load(file),
        phi3::ARCH => phi3::load(file),
        gemma3::ARCH => gemma3::load(file),
        _ => Err(ModelError::UnknownArchitecture {
            path: file.path().display().to_string(),
            arch,
            supported: SUPPORTED.join(", "),
        }),
    }
}

/// Bind a mapped GGUF file to its architecture's implementation, on the CPU.
pub fn load(file: Arc<GgufFile>) -> Result<Box<dyn Model>, ModelError> {
    Ok(Box::new(load_transformer(file)?))
}

/// As [`load`], on the device `placement` names: the CPU fast path, or the burn-tensor decoder
/// ([`device::DeviceTransformer`]) with the weights uploaded to the GPU.
pub fn load_on(
    file: Arc<GgufFile>,
    placement: &ember_runtime::accel::Placement,
) -> Result<Box<dyn Model>, ModelError> {
    match placement {
        ember_runtime::accel::Placement::Cpu { .. } => load(file),
        #[cfg(feature = "wgpu")]
        ember_runtime::accel::Placement::Gpu { device, adapter } => {
            let a = Some((
                format!("{} ({}, {})", adapter.name, adapter.kind, adapter.api),
                adapter.driver.clone(),
            ));
            Ok(Box::new(device::DeviceTransformer::new(
                load_transformer(file)?,
                device.clone(),
                placement.backend(),
                a,
                adapter.kind == "software",
            )?))
        }
    }
}

/// Everything that can go wrong opening a model for generation.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Gguf(#[from] ember_runtime::gguf::GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: String,
        source: ember_runtime::tokenizer::TokenizerError,
    },
    #[error(transparent)]
    Engine(#[from] ember_runtime::engine::EngineError),
}

/// Map a GGUF file, bind its architecture and tokenizer, and build an engine.
/// `cfg` gets the model's training context and returns the engine settings.
pub fn open(
    path: &std::path::Path,
    cfg: impl FnOnce(usize) -> ember_runtime::engine::EngineConfig,
) -> Result<ember_runtime::engine::Engine, OpenError> {
    let cpu = ember_runtime::accel::Placement::Cpu {
        reason: "default".into(),
    };
    open_on(path, &cpu, cfg)
}

/// [`open`] on the device `placement` names.
pub fn open_on(
    path: &std::path::Path,
    placement: &ember_runtime::accel::Placement,
    cfg: impl FnOnce(usize) -> ember_runtime::engine::EngineConfig,
) -> Result<ember_runtime::engine::Engine, OpenError> {
    open_file_on(Arc::new(GgufFile::open(path)?), placement, cfg)
}

/// [`open_on`] for a file already opened (mapped, or read into memory with
/// [`GgufFile::read`]).
pub fn open_file_on(
    file: Arc<GgufFile>,
    placement: &ember_runtime::accel::Placement,
    cfg: impl FnOnce(usize) -> ember_runtime::engine::EngineConfig,
) -> Result<ember_runtime::engine::Engine, OpenError> {
    let model = load_on(file.clone(), placement)?;
    let tokenizer =
        ember_runtime::tokenizer::Tokenizer::from_gguf(&file.metadata).map_err(|source| {
            OpenError::Tokenizer {
                path: file.path().display().to_string(),
                source,
            }
        })?;
    let cfg = cfg(model.config().n_ctx_train);
    Ok(ember_runtime::engine::Engine::new(
        file, model, tokenizer, cfg,
    )?)
}
