//! `ember synth`: a GGUF with a real model's metadata, names, shapes and types and made-up
//! weights, that ember (and llama.cpp) load and run like the model.

mod common;

use std::path::{Path, PathBuf};

use ember_runtime::gguf::GgufFile;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-synth-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn synth(like: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    common::ember()
        .arg("synth")
        .arg("--like")
        .arg(like)
        .args(extra)
        .arg(out)
        .output()
        .expect("run ember synth")
}

/// Same metadata but the synthetic marks, same tensors in the same order; every tensor is one
/// row repeated; and the synthetic model runs.
fn check_like(real: &Path, dir: &Path) {
    let out = dir.join("synth.gguf");
    let o = synth(real, &out, &["--seed", "7"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (GgufFile::open(real).unwrap(), GgufFile::open(&out).unwrap());
    assert_eq!(b.metadata.get_bool("ember.synthetic"), Some(true));
    for (k, v) in a.metadata.iter() {
        if k == "general.name" {
            assert_eq!(
                b.metadata.get_str(k).unwrap(),
                format!("{} (synthetic)", v.as_str().unwrap())
            );
        } else {
            assert_eq!(b.metadata.get(k), Some(v), "metadata {k}");
        }
    }
    assert_eq!((a.alignment, a.version), (b.alignment, b.version));
    assert_eq!(a.tensors.len(), b.tensors.len());
    let mut differs = 0;
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(
            (&x.name, &x.dims, x.ty, x.n_bytes),
            (&y.name, &y.dims, y.ty, y.n_bytes)
        );
        let bytes = b.tensor_bytes(y);
        let row = bytes.len() / (y.n_elements() / y.dims[0]) as usize;
        assert!(
            bytes.chunks(row).all(|r| r == &bytes[..row]),
            "{}: rows differ",
            y.name
        );
        differs += (a.tensor_bytes(x) != bytes) as usize;
    }
    assert_eq!(
        differs,
        a.tensors.len(),
        "every tensor's weights are made up"
    );
    let o = common::ember()
        .args(["run", "--backend", "cpu", "-n", "6", "-p", "Hello", "-m"])
        .arg(&out)
        .env("EMBER_WGPU_BACKENDS", "none")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("6 generated"));
}

#[test]
fn synth_like_the_embedded_model() {
    let dir = temp_dir("embedded");
    let (real, _) = ember_runtime::embedded::ensure_in(&dir).unwrap();
    check_like(&real, &dir);
}

#[test]
fn synth_like_smollm2_and_qwen2() {
    for (i, m) in [common::SMOLLM2, common::QWEN25].iter().enumerate() {
        let dir = temp_dir(&format!("real{i}"));
        check_like(&common::real_model(m), &dir);
    }
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let dir = temp_dir("force");
    let (real, _) = ember_runtime::embedded::ensure_in(&dir).unwrap();
    let out = dir.join("keep.gguf");
    std::fs::write(&out, b"mine").unwrap();
    let o = synth(&real, &out, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"mine");
    let o = synth(&real, &out, &["--force"]);
    assert!(o.status.success());
    assert!(GgufFile::open(&out).is_ok());
    let o = synth(&dir.join("missing.gguf"), &dir.join("x.gguf"), &[]);
    assert!(!o.status.success() && !dir.join("x.gguf").exists());
}
