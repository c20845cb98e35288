//! `ember bench --target`: a device profile's settings where the flags left them open, and the
//! context sized to the memory budget once the model is open.

use anyhow::{Result, bail};

use ember_bench::profile::DeviceProfile;
use ember_runtime::engine::Engine;
use ember_runtime::model::Model;

use crate::engine::{EngineOpts, OpenedModel, open_engine};

/// A device profile applied to `ember bench`. Explicit flags win: each setting here is the
/// flag's value when it was given, else the profile's.
pub struct Target {
    pub profile: DeviceProfile,
    pub threads: usize,
    /// `--backend`, else the profile's preferred one.
    pub backend: String,
    /// `--slo`, else the profile's default SLO unless `--slo-max` builds a custom one.
    pub slo: Option<String>,
    /// `--device-profile`, else the profile's name.
    pub device_profile: String,
}

/// What [`Target::size`] decided, echoed in `bench --json` as `target`.
pub struct Applied {
    /// The context the engine gets (the KV budget caps it).
    pub ctx: usize,
    pub json: serde_json::Value,
}

impl Target {
    /// Resolve `spec` (a built-in profile name or a .toml path) against the flags given.
    pub fn resolve(
        spec: &str,
        threads: Option<usize>,
        backend: Option<&str>,
        slo: Option<&str>,
        slo_max: &[String],
        device_profile: Option<&str>,
    ) -> Result<Target> {
        let p = DeviceProfile::resolve(spec)?;
        // The profile's preferred backend, unless --backend says otherwise.
        let backend = backend.map(str::to_string).unwrap_or_else(|| {
            match p.backends.first().map(String::as_str) {
                Some("wgpu-vulkan") => "vulkan",
                Some("wgpu-metal") => "metal",
                Some("wgpu-dx12") => "wgpu",
                // `auto` tries CUDA first and falls back (to Vulkan, then the CPU), where
                // `cuda` by name would be an error on a binary without it.
                Some("cuda") => "auto",
                _ => "cpu",
            }
            .to_string()
        });
        let slo = match slo {
            None if slo_max.is_empty() => Some(p.default_slo.clone()),
            s => s.map(str::to_string),
        };
        Ok(Target {
            threads: threads.unwrap_or(p.threads),
            backend,
            slo,
            device_profile: device_profile.map_or_else(|| p.name.clone(), str::to_string),
            profile: p,
        })
    }

    /// `opts` with this profile's backend and threads where the flags left them open.
    pub fn engine_opts(target: Option<&Target>, mut opts: EngineOpts) -> EngineOpts {
        if let Some(t) = target {
            opts.backend = Some(t.backend.clone());
            opts.threads = Some(t.threads);
        }
        opts
    }

    /// The engine for `opts`. With a target the model is opened first, to size the context to
    /// the profile's KV budget, and the engine is built over it (the model loads once); what was
    /// applied comes back. `ctx`, when given, then replaces the sized context.
    pub fn open_engine(
        target: Option<&Target>,
        mut opts: EngineOpts,
        ctx: Option<usize>,
    ) -> Result<(Engine, Option<Applied>)> {
        let (opened, applied) = match target {
            Some(t) => {
                if let Some(note) = t.arch_note() {
                    eprintln!("{note}");
                }
                let m = OpenedModel::open(opts.model.clone(), opts.no_mmap)?;
                let applied = t.size(&*m.model, opts.ctx)?;
                opts.ctx = Some(applied.ctx);
                (Some(m), Some(applied))
            }
            None => (None, None),
        };
        if ctx.is_some() {
            opts.ctx = ctx;
        }
        Ok((open_engine(&opts, opened)?, applied))
    }

    /// Said on stderr when the profile is for another architecture than this binary's.
    pub fn arch_note(&self) -> Option<String> {
        let p = &self.profile;
        (!p.matches_this_arch()).then(|| {
            format!(
                "ember bench: note: profile {} is for {}, this binary is {}",
                p.name,
                p.target_triple,
                std::env::consts::ARCH
            )
        })
    }

    /// The memory budget for `model`: the KV cache gets what the weights leave of it (or the
    /// profile's kv_budget_gib), which caps the context (`ctx`, else min(training context,
    /// 4096)). Says what it applied on stderr.
    pub fn size(&self, model: &dyn Model, ctx: Option<usize>) -> Result<Applied> {
        let p = &self.profile;
        let weights = model.weight_bytes();
        let c = model.config();
        let kv_budget = p.kv_budget_bytes(weights).map_err(|e| anyhow::anyhow!(e))?;
        let per_tok = c.kv_bytes_per_token().max(1) as u64;
        let ctx_cap = (kv_budget / per_tok) as usize;
        if ctx_cap < 16 {
            bail!(
                "profile {}: a KV budget of {kv_budget} bytes holds only {ctx_cap} positions of this model",
                p.name
            );
        }
        let want = ctx.unwrap_or(c.n_ctx_train.min(4096));
        let ctx = want.min(ctx_cap);
        let (backend, threads) = (&self.backend, self.threads);
        let json = serde_json::json!({
            "name": p.name, "target_triple": p.target_triple, "backends": p.backends, "backend": backend,
            "threads": threads, "memory_budget_bytes": p.memory_budget_bytes(), "weights_bytes": weights,
            "kv_budget_bytes": kv_budget, "kv_bytes_per_token": per_tok, "ctx": ctx, "ctx_capped_by_budget": ctx < want,
            "slo": self.slo, "cost_per_hour_usd": p.cost_per_hour_usd, "typical_power_w": p.typical_power_w,
        });
        eprintln!(
            "ember bench: target {}: backend {backend}, threads {threads}, memory budget {:.2} GiB (weights {:.1} MiB, KV budget {:.1} MiB = {ctx_cap} positions), ctx {ctx}, SLO {}",
            p.name,
            p.memory_budget_gib,
            weights as f64 / (1 << 20) as f64,
            kv_budget as f64 / (1 << 20) as f64,
            self.slo.as_deref().unwrap_or("custom")
        );
        Ok(Applied { ctx, json })
    }
}
