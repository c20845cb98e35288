//! A GGUF whose architecture, tensor or RoPE scheme ember does not support fails at load with a
//! message that names what is missing; it never runs with part of the model left out.
//! The files are the tiny reference models (`ember_runtime::gguf::synth::tiny_with`) with one
//! piece removed or changed.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use ember_runtime::gguf::synth::{TinyArch, tiny_with};
use ember_runtime::gguf::{GgufFile, Value};

fn write(name: &str, w: &ember_runtime::gguf::GgufWriter) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-arch-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, w.to_bytes()).unwrap();
    p
}

/// The load error for `w`, as the user sees it.
fn load_error(name: &str, w: &ember_runtime::gguf::GgufWriter) -> String {
    let p = write(name, w);
    let f = Arc::new(GgufFile::open(&p).unwrap());
    let r = ember_models::load(f);
    let _ = std::fs::remove_file(&p);
    match r {
        Ok(_) => panic!("{name}: loaded, but should have been refused"),
        Err(e) => e.to_string(),
    }
}

fn tokenizer_src(model: &str) -> GgufFile {
    GgufFile::open(common::real_model(model)).unwrap()
}

#[test]
fn a_missing_required_tensor_is_named() {
    let tok = tokenizer_src(common::QWEN25);
    // Qwen3 without one layer's k norm: the norm is part of the architecture.
    let w = tiny_with(TinyArch::Qwen3, &tok, 0, &["blk.1.attn_k_norm.weight"]).unwrap();
    let e = load_error("no-k-norm.gguf", &w);
    assert!(e.contains("blk.1.attn_k_norm.weight"), "{e}");
}

#[test]
fn an_unknown_architecture_lists_the_supported_ones() {
    let tok = tokenizer_src(common::SMOLLM2);
    let mut w = tiny_with(TinyArch::LlamaRopeFreqs, &tok, 0, &["general.architecture"]).unwrap();
    w.kv("general.architecture", Value::String("mamba".into()));
    let e = load_error("mamba.gguf", &w);
    assert!(e.contains("mamba"), "{e}");
    for arch in ["llama", "qwen2", "qwen3", "phi3", "gemma3"] {
        assert!(e.contains(arch), "{e}");
    }
}

#[test]
fn rope_scaling_ember_does_not_apply_is_refused() {
    let tok = tokenizer_src(common::SMOLLM2);
    let mut w = tiny_with(TinyArch::LlamaRopeFreqs, &tok, 0, &["rope_freqs.weight"]).unwrap();
    w.kv("llama.rope.scaling.type", Value::String("yarn".into()));
    w.kv("llama.rope.scaling.factor", Value::F32(4.0));
    let e = load_error("yarn.gguf", &w);
    assert!(e.contains("yarn") && e.contains("rope.scaling.type"), "{e}");
}

#[test]
fn a_sliding_window_on_an_architecture_without_one_is_refused() {
    let tok = tokenizer_src(common::QWEN25);
    let mut w = tiny_with(TinyArch::Qwen3, &tok, 0, &[]).unwrap();
    w.kv("qwen3.attention.sliding_window", Value::U32(128));
    let e = load_error("qwen3-swa.gguf", &w);
    assert!(e.contains("sliding") && e.contains("qwen3"), "{e}");
}
