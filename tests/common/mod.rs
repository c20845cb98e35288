//! Shared helpers for the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod reference;

/// Where `models/fetch.sh` puts the real models.
pub fn models_dir() -> PathBuf {
    std::env::var_os("EMBER_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join("cache")
        })
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN25: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// The wgpu placement (any adapter, lavapipe in CI); fails the test (never skips) without one.
#[cfg(feature = "wgpu")]
pub fn wgpu_placement() -> ember_runtime::accel::Placement {
    use ember_runtime::accel::{BackendChoice, Placement, choose};
    let p = choose(BackendChoice::Wgpu);
    if let Placement::Cpu { reason } = &p {
        panic!(
            "no usable wgpu adapter ({reason}). The GPU tests need one: on Debian/Ubuntu \
             `apt-get install mesa-vulkan-drivers` provides lavapipe (software Vulkan)."
        );
    }
    p
}

/// A real model file; fails the test (never skips) if it was not fetched.
pub fn real_model(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run models/fetch.sh first (or set EMBER_MODELS)",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub fn ember() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ember"));
    // Keep the embedded model out of the user's cache during tests.
    c.env(
        "EMBER_CACHE_DIR",
        std::env::temp_dir().join("ember-test-cache"),
    );
    c
}
