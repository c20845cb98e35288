//! Device profiles (`targets/*.toml`): what a device is, so runs from a fleet
//! can be compared fairly and `--target NAME` can set threads, memory budget
//! and SLO in one go.
//!
//! ```toml
//! name = "raspberry-pi-5"                 # must equal the file's stem
//! description = "Raspberry Pi 5, 8 GB"
//! target_triple = "aarch64-unknown-linux-gnu"
//! backends = ["cpu", "wgpu-vulkan"]       # preferred first: cpu, wgpu-vulkan, wgpu-metal, wgpu-dx12, cuda
//! threads = 4
//! cpu_cores = 4                           # optional: threads may not exceed it
//! memory_budget_gib = 6.0                 # weights + KV + activations
//! device_memory_gib = 8.0                 # optional: the budget may not exceed it
//! kv_budget_gib = 1.0                     # optional: default = budget − weights
//! memory_bandwidth_gbs = 17.1             # optional: nominal, for the self-test's fraction
//! default_slo = "rag"                     # chat-interactive, rag, batch, none
//! cost_per_hour_usd = 0.004
//! typical_power_w = 7.0
//!
//! [expect]                                # optional: what `ember selftest` measures on a healthy
//! memory_bandwidth_gbs = 8.0              # device (embedded model, the profile's threads);
//! tg_tps = 900.0                          # below half of a figure its row fails
//! ```
//!
//! The profiles shipped in `targets/` are compiled into the binary
//! ([`builtin`]), so a board needs only the one executable; `--target` also
//! takes a path to a `.toml` file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::slo::Slo;

/// Backends a profile may name, in the runtime's vocabulary.
pub const KNOWN_BACKENDS: [&str; 5] = ["cpu", "wgpu-vulkan", "wgpu-metal", "wgpu-dx12", "cuda"];

const GIB: f64 = (1u64 << 30) as f64;

/// One device profile, as written in `targets/NAME.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Rust target triple of the binary that runs there.
    pub target_triple: String,
    /// Preferred backends, best first.
    pub backends: Vec<String>,
    /// Worker threads for the CPU kernels.
    pub threads: usize,
    /// CPU cores the device has (optional; `threads` may not exceed it).
    #[serde(default)]
    pub cpu_cores: Option<usize>,
    /// Memory ember may use: weights + KV cache + activations, GiB.
    pub memory_budget_gib: f64,
    /// Memory the device has where the weights live (RAM, unified or VRAM), GiB (optional).
    #[serde(default)]
    pub device_memory_gib: Option<f64>,
    /// KV cache budget, GiB (optional; default: the memory budget minus the weights).
    #[serde(default)]
    pub kv_budget_gib: Option<f64>,
    /// Nominal memory bandwidth, GB/s (optional; the self-test reports the fraction it measures).
    #[serde(default)]
    pub memory_bandwidth_gbs: Option<f64>,
    /// The SLO profile runs on this device are judged by unless `--slo` says otherwise.
    pub default_slo: String,
    /// What an hour of the device costs, USD (cloud price, or purchase price amortised + power).
    pub cost_per_hour_usd: f64,
    /// Typical power draw while running inference, watts.
    pub typical_power_w: f64,
    /// What `ember selftest` measures on a healthy device of this kind (optional).
    #[serde(default)]
    pub expect: Option<Expected>,
}

/// The `[expect]` table of a profile: figures `ember selftest --target NAME` measures on a
/// healthy device of this kind, with the profile's threads. Each is optional; a self-test row
/// whose figure is stated becomes a check that fails below half of it, one without stays a
/// measurement. Only figures someone measured (or a conservative bound from a published
/// measurement) belong here: the comments in the file say which.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    /// `memory.bandwidth`: GB/s of the self-test's multi-threaded read of a 256 MiB buffer.
    pub memory_bandwidth_gbs: Option<f64>,
    /// `matmul.f32`: GFLOP/s, f32 weights 512×1024, 64 rows.
    pub matmul_f32_gflops: Option<f64>,
    /// `matmul.q4_k`: GFLOP/s, Q4_K weights 1024×1024, 1 row.
    pub matmul_q4_k_gflops: Option<f64>,
    /// `bench.pp`: prefill tokens/s of the embedded model (32 tokens).
    pub pp_tps: Option<f64>,
    /// `bench.tg`: decode tokens/s of the embedded model (16 tokens).
    pub tg_tps: Option<f64>,
}

impl Expected {
    /// Every stated figure, by its field name.
    pub fn fields(&self) -> [(&'static str, Option<f64>); 5] {
        [
            ("memory_bandwidth_gbs", self.memory_bandwidth_gbs),
            ("matmul_f32_gflops", self.matmul_f32_gflops),
            ("matmul_q4_k_gflops", self.matmul_q4_k_gflops),
            ("pp_tps", self.pp_tps),
            ("tg_tps", self.tg_tps),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("{path}: cannot read the profile: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("unknown device profile '{name}' (known: {known}; or a path to a .toml file)")]
    Unknown { name: String, known: String },
}

macro_rules! builtin_profiles {
    ($($name:literal),* $(,)?) => {
        /// The profiles in `targets/`, compiled in: (name, TOML text).
        pub const BUILTIN: &[(&str, &str)] = &[$(($name, include_str!(concat!("../../targets/", $name, ".toml")))),*];
    };
}
builtin_profiles!(
    "jetson-orin-nano",
    "jetson-agx-orin",
    "raspberry-pi-5",
    "x86-64-avx2",
    "apple-m",
    "nvidia-h100"
);

impl DeviceProfile {
    /// Parse and validate `text`; `path` names the file in every error.
    pub fn parse(text: &str, path: &str) -> Result<DeviceProfile, ProfileError> {
        let p: DeviceProfile = toml::from_str(text).map_err(|e| ProfileError::Invalid {
            path: path.to_string(),
            msg: one_line(&e.to_string()),
        })?;
        p.validate(path)?;
        if let Some(stem) = Path::new(path).file_stem().and_then(|s| s.to_str())
            && path.ends_with(".toml")
            && stem != p.name
        {
            return Err(ProfileError::Invalid {
                path: path.to_string(),
                msg: format!(
                    "name = \"{}\" but the file is {stem}.toml; they must match",
                    p.name
                ),
            });
        }
        Ok(p)
    }

    /// Read and validate a profile file.
    pub fn load(path: &Path) -> Result<DeviceProfile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        DeviceProfile::parse(&text, &path.display().to_string())
    }

    /// `--target SPEC`: a built-in profile name, or a path to a `.toml` file.
    pub fn resolve(spec: &str) -> Result<DeviceProfile, ProfileError> {
        if spec.ends_with(".toml") || spec.contains('/') {
            return DeviceProfile::load(Path::new(spec));
        }
        match BUILTIN.iter().find(|(n, _)| *n == spec) {
            Some((n, text)) => DeviceProfile::parse(text, &format!("targets/{n}.toml")),
            None => Err(ProfileError::Unknown {
                name: spec.to_string(),
                known: BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Checks that every field makes sense and that the fields agree with each other.
    pub fn validate(&self, path: &str) -> Result<(), ProfileError> {
        let bad = |msg: String| {
            Err(ProfileError::Invalid {
                path: path.to_string(),
                msg,
            })
        };
        if self.name.trim().is_empty() {
            return bad("name is empty".into());
        }
        let parts: Vec<&str> = self.target_triple.split('-').collect();
        if parts.len() < 3 || parts.iter().any(|p| p.is_empty()) {
            return bad(format!(
                "target_triple '{}' is not a target triple like aarch64-unknown-linux-gnu",
                self.target_triple
            ));
        }
        if self.backends.is_empty() {
            return bad(
                "backends is empty: name at least one of cpu, wgpu-vulkan, wgpu-metal, wgpu-dx12, cuda"
                    .into(),
            );
        }
        for b in &self.backends {
            if !KNOWN_BACKENDS.contains(&b.as_str()) {
                return bad(format!(
                    "backends: unknown backend '{b}' (known: {})",
                    KNOWN_BACKENDS.join(", ")
                ));
            }
        }
        if self.backends.iter().any(|b| b == "wgpu-metal") && !self.target_triple.contains("apple")
        {
            return bad(format!(
                "backends names wgpu-metal but target_triple '{}' is not an Apple target",
                self.target_triple
            ));
        }
        if self.threads == 0 {
            return bad("threads = 0: a device needs at least one worker thread".into());
        }
        if let Some(c) = self.cpu_cores {
            if c == 0 {
                return bad("cpu_cores = 0".into());
            }
            if self.threads > c {
                return bad(format!(
                    "threads = {} exceeds cpu_cores = {c}",
                    self.threads
                ));
            }
        }
        let positive = |field: &str, v: f64| -> Result<(), ProfileError> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ProfileError::Invalid {
                    path: path.to_string(),
                    msg: format!("{field} = {v} must be a positive number"),
                })
            }
        };
        positive("memory_budget_gib", self.memory_budget_gib)?;
        if let Some(d) = self.device_memory_gib {
            positive("device_memory_gib", d)?;
            if self.memory_budget_gib > d {
                return bad(format!(
                    "memory_budget_gib = {} is larger than device_memory_gib = {d}: the budget cannot exceed the device's memory",
                    self.memory_budget_gib
                ));
            }
        }
        if let Some(k) = self.kv_budget_gib {
            positive("kv_budget_gib", k)?;
            if k > self.memory_budget_gib {
                return bad(format!(
                    "kv_budget_gib = {k} is larger than memory_budget_gib = {}",
                    self.memory_budget_gib
                ));
            }
        }
        if let Some(b) = self.memory_bandwidth_gbs {
            positive("memory_bandwidth_gbs", b)?;
        }
        if let Err(e) = Slo::profile(&self.default_slo) {
            return bad(format!("default_slo: {e}"));
        }
        if !(self.cost_per_hour_usd.is_finite() && self.cost_per_hour_usd >= 0.0) {
            return bad(format!(
                "cost_per_hour_usd = {} must be zero or more",
                self.cost_per_hour_usd
            ));
        }
        positive("typical_power_w", self.typical_power_w)?;
        if let Some(e) = &self.expect {
            for (field, v) in e.fields() {
                if let Some(v) = v {
                    positive(&format!("expect.{field}"), v)?;
                }
            }
        }
        Ok(())
    }

    pub fn memory_budget_bytes(&self) -> u64 {
        (self.memory_budget_gib * GIB) as u64
    }

    /// The KV cache budget for a model of `weights_bytes`: `kv_budget_gib` if set, else the
    /// memory budget minus the weights. Errors when the weights alone do not fit the budget.
    pub fn kv_budget_bytes(&self, weights_bytes: u64) -> Result<u64, String> {
        let budget = self.memory_budget_bytes();
        if weights_bytes > budget {
            return Err(format!(
                "profile {}: the model's weights ({:.2} GiB) do not fit its memory budget of {} GiB",
                self.name,
                weights_bytes as f64 / GIB,
                self.memory_budget_gib
            ));
        }
        let rest = budget - weights_bytes;
        Ok(match self.kv_budget_gib {
            Some(k) => ((k * GIB) as u64).min(rest),
            None => rest,
        })
    }

    /// Whether this binary was built for the profile's CPU architecture.
    pub fn matches_this_arch(&self) -> bool {
        let arch = self.target_triple.split('-').next().unwrap_or("");
        arch == std::env::consts::ARCH
    }
}

/// Every built-in profile, parsed and validated.
pub fn builtin() -> Result<Vec<DeviceProfile>, ProfileError> {
    BUILTIN
        .iter()
        .map(|(n, t)| DeviceProfile::parse(t, &format!("targets/{n}.toml")))
        .collect()
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        let all = builtin().unwrap();
        assert_eq!(all.len(), 6);
    }

    #[test]
    fn kv_budget_is_budget_minus_weights() {
        let p = DeviceProfile::resolve("raspberry-pi-5").unwrap();
        let w = 1u64 << 30;
        let kv = p.kv_budget_bytes(w).unwrap();
        assert!(kv <= p.memory_budget_bytes() - w);
        assert!(
            p.kv_budget_bytes(100 << 30)
                .unwrap_err()
                .contains("do not fit")
        );
    }
}
