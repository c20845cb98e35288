//! Provenance of a run (METRICS.md, Provenance): what ran, where.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use ember_runtime::engine::Engine;

use crate::record::Provenance;

/// sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The commit this binary was built from, stamped at build time by `build.rs`: 40 hex digits,
/// "-dirty" appended when tracked files differed from it, or "unknown" outside a git checkout.
pub fn git_commit() -> &'static str {
    env!("EMBER_GIT_COMMIT")
}

fn os() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{} {}", std::env::consts::OS, release)
        .trim()
        .to_string()
}

/// Provenance for a run on `engine` (hashes the model file: ~0.1 s per 100 MB).
pub fn for_engine(engine: &Engine, device_profile: Option<String>) -> Provenance {
    let path = engine.file.path();
    let mut mix: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &engine.file.tensors {
        *mix.entry(t.ty.name()).or_default() += 1;
    }
    Provenance {
        ember_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit().to_string(),
        backend: engine.model.backend().into(),
        adapter: engine
            .model
            .adapter()
            .map(|a| a.0)
            .unwrap_or_else(|| format!("{:?}", ember_runtime::quant::best_isa())),
        driver: engine.model.adapter().map(|a| a.1).unwrap_or_default(),
        cpu_model: ember_runtime::sys::cpu_model(),
        cpu_cores: ember_runtime::sys::available_cores(),
        threads: engine.cfg.threads,
        os: os(),
        device_profile,
        model_path: path.display().to_string(),
        model_sha256: sha256_file(path).unwrap_or_default(),
        model_arch: engine.model.config().arch.clone(),
        model_quant_mix: serde_json::to_string(&mix).unwrap_or_default(),
        weights_bytes: engine.model.weight_bytes(),
        weights_load: if engine.file.is_mapped() {
            "mmap"
        } else {
            "read"
        }
        .into(),
        transport: "in-process".into(),
        ..Default::default()
    }
}

/// Provenance for a run against a remote server (`ember bench --url`): the client's machine,
/// the endpoint and what it says it is; the model file's identity only when the GGUF given is
/// the one the server runs.
pub fn for_remote(r: &crate::session::Remote, device_profile: Option<String>) -> Provenance {
    let e = &r.endpoint;
    let (path, sha, arch) = if r.same_model {
        let p = r.file.path();
        let arch = r
            .file
            .metadata
            .get_str("general.architecture")
            .unwrap_or_default()
            .to_string();
        (
            p.display().to_string(),
            sha256_file(p).unwrap_or_default(),
            arch,
        )
    } else {
        (String::new(), String::new(), String::new())
    };
    let version = [e.server_header.as_str(), e.owned_by.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" · ");
    Provenance {
        ember_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit().to_string(),
        backend: "http".into(),
        adapter: e.base.clone(),
        driver: format!("openai {}", e.api.name()),
        cpu_model: ember_runtime::sys::cpu_model(),
        cpu_cores: ember_runtime::sys::available_cores(),
        threads: 0,
        os: os(),
        device_profile,
        model_path: if path.is_empty() {
            e.model.clone()
        } else {
            path
        },
        model_sha256: sha,
        model_arch: arch,
        model_quant_mix: String::new(),
        weights_bytes: 0,
        weights_load: String::new(),
        transport: "http".into(),
        endpoint: e.base.clone(),
        server_model: e.model.clone(),
        server_version: version,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_commit_is_stamped_at_build_time() {
        let stamped = super::git_commit();
        let head = std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match head {
            Some(h) => assert!(
                stamped == h || stamped == format!("{h}-dirty"),
                "stamped {stamped:?}, HEAD is {h}"
            ),
            None => assert_eq!(stamped, "unknown"),
        }
    }
}
