//! Opening a model and an engine, as `run` and `bench` do: the model path (or the embedded
//! model), where to run it (`--backend`), threads, context and prefill batch.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use ember_runtime::accel::Placement;
use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::gguf::GgufFile;
use ember_runtime::model::Model;

/// The model file to use: the one given, else the embedded default model (written to the cache
/// on first use, and said so on stderr).
pub fn model_path(p: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = p {
        return Ok(p);
    }
    let dir = ember_runtime::embedded::default_dir();
    let (path, written) = ember_runtime::embedded::ensure_in(&dir)
        .with_context(|| format!("cannot write the embedded model under {}", dir.display()))?;
    eprintln!(
        "ember: no --model given; using the embedded default model '{}' ({}{})",
        ember_runtime::embedded::NAME,
        path.display(),
        if written { ", just written" } else { "" }
    );
    Ok(path)
}

/// How to open the engine (the flags `run` and `bench` share).
#[derive(Clone, Debug, Default)]
pub struct EngineOpts {
    /// GGUF file (None: the embedded model).
    pub model: Option<PathBuf>,
    /// `--backend` (None: auto).
    pub backend: Option<String>,
    /// Worker threads (None: all cores).
    pub threads: Option<usize>,
    /// Context size (None: min(training context, 4096)); clamped to the training context.
    pub ctx: Option<usize>,
    /// Prompt tokens per prefill pass.
    pub batch: usize,
    /// Read the weights into memory instead of mapping the file.
    pub no_mmap: bool,
}

/// A model file opened and bound on the CPU before its engine, so that its sizes can decide
/// the engine's settings (`bench --target` sizes the context to a KV budget);
/// [`open_engine`] then uses it instead of opening the file again.
pub struct OpenedModel {
    path: PathBuf,
    file: Arc<GgufFile>,
    pub model: Box<dyn Model>,
}

impl OpenedModel {
    pub fn open(model: Option<PathBuf>, no_mmap: bool) -> Result<OpenedModel> {
        let path = model_path(model)?;
        let file = Arc::new(open_file(&path, no_mmap)?);
        let model = ember_models::load(file.clone())
            .with_context(|| format!("{}: cannot load the model", path.display()))?;
        Ok(OpenedModel { path, file, model })
    }

    /// The engine over this model: on the CPU as it is; on a device, bound there from the
    /// same opened file.
    fn into_engine(
        self,
        placement: &Placement,
        cfg: impl FnOnce(usize) -> EngineConfig,
    ) -> Result<Engine> {
        let model = match placement {
            Placement::Cpu { .. } => self.model,
            #[cfg(feature = "wgpu")]
            Placement::Gpu { .. } => ember_models::load_on(self.file.clone(), placement)?,
        };
        let tokenizer = ember_runtime::tokenizer::Tokenizer::from_gguf(&self.file.metadata)
            .map_err(|source| ember_models::OpenError::Tokenizer {
                path: self.file.path().display().to_string(),
                source,
            })?;
        let cfg = cfg(model.config().n_ctx_train);
        Ok(Engine::new(self.file, model, tokenizer, cfg)?)
    }
}

fn open_file(path: &std::path::Path, no_mmap: bool) -> Result<GgufFile> {
    Ok(if no_mmap {
        GgufFile::read(path)?
    } else {
        GgufFile::open(path)?
    })
}

/// Decide where to run (`--backend`) and say so on stderr when it is not the plain CPU choice.
fn place(backend: &str) -> Result<Placement> {
    use ember_runtime::accel::{BackendChoice, choose};
    let choice: BackendChoice = backend
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    let p = choose(choice);
    match (&p, choice) {
        (Placement::Cpu { .. }, BackendChoice::Cpu) => log::info!("{}", p.describe()),
        // CUDA is asked for by name on machines that have it: no silent fallback.
        (Placement::Cpu { reason }, BackendChoice::Cuda) => {
            anyhow::bail!("--backend cuda: {reason}")
        }
        (Placement::Cpu { reason }, _) => {
            eprintln!("ember: --backend {choice}: falling back to the CPU: {reason}")
        }
        #[cfg(feature = "wgpu")]
        (Placement::Gpu { .. }, _) => eprintln!("ember: {}", p.describe()),
    }
    Ok(p)
}

/// Open the engine `o` describes, over `opened` when the model is open already.
pub fn open_engine(o: &EngineOpts, opened: Option<OpenedModel>) -> Result<Engine> {
    let path = match &opened {
        Some(m) => m.path.clone(),
        None => model_path(o.model.clone())?,
    };
    let threads = o
        .threads
        .unwrap_or_else(ember_runtime::sys::available_cores);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let placement = place(o.backend.as_deref().unwrap_or("auto"))?;
    let (ctx, batch) = (o.ctx, o.batch);
    let cfg = |train_ctx: usize| {
        let n_ctx = match ctx {
            // Beyond the training context RoPE positions are untrained and the KV cache grows
            // for nothing: clamp, as a user would want, and say so.
            Some(c) if c > train_ctx => {
                eprintln!(
                    "ember: --ctx {c} is more than the model's training context; using {train_ctx}"
                );
                train_ctx
            }
            Some(c) => c,
            None => train_ctx.min(4096),
        };
        EngineConfig {
            threads,
            n_ctx,
            prefill_chunk: batch.max(1),
        }
    };
    let engine = match opened {
        Some(m) => m.into_engine(&placement, cfg)?,
        None => {
            let file = Arc::new(open_file(&path, o.no_mmap)?);
            ember_models::open_file_on(file, &placement, cfg)?
        }
    };
    let c = engine.model.config();
    log::info!(
        "loaded {} ({}, {} layers, d={}, vocab {}), {:.1} MB of weights {}, ctx {}, {} threads, kernels {:?}",
        path.display(),
        c.arch,
        c.n_layers,
        c.n_embd,
        c.n_vocab,
        engine.model.weight_bytes() as f64 / 1e6,
        if o.no_mmap {
            "read into memory"
        } else {
            "mapped"
        },
        engine.cfg.n_ctx,
        threads,
        ember_runtime::quant::best_isa()
    );
    Ok(engine)
}

/// The speculative-decoding flags `run`, `bench` and `serve` share (llama.cpp's names and
/// meanings; module `ember_runtime::spec`).
#[derive(Clone, Debug, Default)]
pub struct SpecOpts {
    /// `--lookup N`: prompt lookup over n-grams of up to N tokens.
    pub lookup: Option<usize>,
    /// `--draft FILE`: a draft model with the target's vocabulary.
    pub draft: Option<PathBuf>,
    pub draft_max: usize,
    pub draft_min: usize,
    pub draft_p_min: f32,
}

impl SpecOpts {
    /// The configuration the flags ask for, checked (`None`: no speculation).
    pub fn config(&self) -> Result<Option<ember_runtime::spec::SpecConfig>> {
        if self.lookup.is_none() && self.draft.is_none() {
            return Ok(None);
        }
        if self.lookup == Some(0) {
            bail!(
                "--lookup must be at least 1 (the longest n-gram matched; leave it out for no lookup)"
            );
        }
        let cfg = ember_runtime::spec::SpecConfig {
            lookup: self.lookup.unwrap_or(0),
            draft_max: self.draft_max,
            draft_min: self.draft_min,
            draft_p_min: self.draft_p_min,
        };
        cfg.validate(self.draft.is_some())?;
        Ok(Some(cfg))
    }

    /// Open the draft model (`--draft`) like the target (`o`: backend, threads, prefill batch)
    /// with the target's context, and check that it shares the target's vocabulary.
    pub fn open_draft(&self, o: &EngineOpts, target: &Engine) -> Result<Option<Engine>> {
        let Some(path) = &self.draft else {
            return Ok(None);
        };
        let opts = EngineOpts {
            model: Some(path.clone()),
            ctx: Some(target.cfg.n_ctx),
            ..o.clone()
        };
        let draft = open_engine(&opts, None)
            .with_context(|| format!("--draft {}: cannot open the draft model", path.display()))?;
        ember_runtime::spec::check_vocab(target, &draft)
            .with_context(|| format!("--draft {}", path.display()))?;
        Ok(Some(draft))
    }

    /// One line for stderr saying how the run speculates.
    pub fn describe(&self) -> String {
        match (&self.lookup, &self.draft) {
            (Some(n), _) => format!(
                "speculating by prompt lookup (n-grams up to {n}, at most {} draft tokens per step)",
                self.draft_max
            ),
            (None, Some(p)) => format!(
                "speculating with the draft model {} (at most {} tokens per step, p-min {})",
                p.display(),
                self.draft_max,
                self.draft_p_min
            ),
            (None, None) => "no speculation".into(),
        }
    }
}
