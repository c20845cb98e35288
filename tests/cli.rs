//! End-to-end tests of the `ember` binary: the embedded default model, the
//! command contracts, and clear errors (message, exit 1, no panic) on bad input.

mod common;

use std::path::{Path, PathBuf};

use common::ember;
use ember_runtime::gguf::{GgufWriter, Value, parse_bytes};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Rewrite a GGUF image, optionally dropping a tensor and overriding metadata.
fn rewrite(bytes: &[u8], drop_tensor: Option<&str>, set: &[(&str, Value)]) -> Vec<u8> {
    let g = parse_bytes(bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata.iter() {
        let v = set
            .iter()
            .find(|(sk, _)| *sk == k)
            .map(|(_, sv)| sv.clone())
            .unwrap_or_else(|| v.clone());
        w.kv(k, v);
    }
    for (k, v) in set {
        if g.metadata.get(k).is_none() {
            w.kv(*k, v.clone());
        }
    }
    for t in &g.tensors {
        if Some(t.name.as_str()) != drop_tensor {
            w.tensor(t.name.clone(), &t.dims, t.ty, g.tensor_bytes(t).to_vec());
        }
    }
    w.to_bytes()
}

/// Run `ember run` on a file and check it fails cleanly with `needle` in the message.
fn expect_error(file: &Path, needle: &str) {
    let out = ember()
        .args(["run", "-n", "2", "-p", "hi", "-m"])
        .arg(file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}: expected exit 1, stderr: {err}",
        file.display()
    );
    assert!(
        !err.contains("panicked"),
        "panic on {}: {err}",
        file.display()
    );
    assert!(
        err.contains(needle),
        "{}: expected {needle:?} in: {err}",
        file.display()
    );
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(name.as_ref()),
        "error should name the file {name}: {err}"
    );
    assert!(out.stdout.is_empty(), "no output on error");
}

#[test]
fn embedded_default_counts_greedily() {
    let out = ember()
        .args(["run", "-p", "hello", "-n", "10", "--temp", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("embedded default model"),
        "should say it uses the embedded model: {err}"
    );
    assert!(
        err.contains("TTFT") && err.contains("decode"),
        "summary on stderr: {err}"
    );
    // The embedded model's output head follows each letter with the next one.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "pqrstuvwxy"
    );
}

#[test]
fn json_output_has_the_documented_shape() {
    let out = ember()
        .args([
            "run",
            "-p",
            "abc",
            "-n",
            "3",
            "--temp",
            "0",
            "--json",
            "--top-logprobs",
            "4",
            "--echo",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], serde_json::json!([97, 98, 99]));
    assert_eq!(v["generated_tokens"], serde_json::json!([100, 101, 102]));
    assert_eq!(v["text"], "def");
    let pos = v["positions"].as_array().unwrap();
    // With --echo: after 1, 2, 3 prompt tokens, then after each generated token but the last.
    let consumed: Vec<u64> = pos
        .iter()
        .map(|p| p["consumed"].as_u64().unwrap())
        .collect();
    assert_eq!(consumed, vec![1, 2, 3, 4, 5]);
    for p in pos {
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 4);
        let logits: Vec<f64> = top.iter().map(|t| t["logit"].as_f64().unwrap()).collect();
        assert!(logits.windows(2).all(|w| w[0] >= w[1]), "sorted by logit");
        assert!(top.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0));
    }
    // Position after consuming "abc" predicts "d".
    assert_eq!(pos[2]["top"][0]["id"], 100);
    // Without --echo only the positions from the last prompt token on.
    let out = ember()
        .args(["run", "-p", "abc", "-n", "3", "--temp", "0", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let consumed: Vec<u64> = v["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["consumed"].as_u64().unwrap())
        .collect();
    assert_eq!(consumed, vec![3, 4, 5]);
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() {
    let out = ember()
        .args(["run", "-p", "a", "-n", "20", "--temp", "0", "--stop", "fg"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "bcde");
}

#[test]
fn tokenize_prints_a_json_array() {
    let out = ember()
        .args(["tokenize", "hi<|im_start|>"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids, vec![104, 105, 257]);
    let out = ember()
        .args(["tokenize", "--no-special", "<|im_end|>"])
        .output()
        .unwrap();
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids.len(), "<|im_end|>".len());
}

#[test]
fn inspect_reports_quant_mix_and_params() {
    let out = ember().args(["inspect", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["metadata"]["general.architecture"], "llama");
    let mix = v["quant_mix"].as_object().unwrap();
    for t in [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(mix.contains_key(t), "{t} missing from {mix:?}");
    }
    assert!(v["n_params"].as_u64().unwrap() > 1_000_000);
}

#[test]
fn no_mmap_reads_the_weights_into_memory_and_decodes_the_same() {
    let out = ember()
        .args([
            "-v",
            "run",
            "-p",
            "hello",
            "-n",
            "10",
            "--temp",
            "0",
            "--no-mmap",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("read into memory"), "the load says so: {err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "pqrstuvwxy"
    );
    // Bad files fail the same way when read instead of mapped, empty ones included.
    let dir = tmpdir("nommap");
    let good = ember_runtime::embedded::build();
    for (name, bytes, needle) in [
        ("truncated.gguf", &good[..200], "truncated"),
        ("empty.gguf", &good[..0], "truncated"),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = ember()
            .args(["run", "-n", "2", "-p", "hi", "--no-mmap", "-m"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(needle) && err.contains(name), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let out = ember()
        .args(["run", "-n", "2", "-p", "hi", "--no-mmap", "-m"])
        .arg(dir.join("missing.gguf"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing.gguf") && err.contains("cannot open"),
        "{err}"
    );
}

#[test]
fn bad_files_get_clear_errors() {
    let dir = tmpdir("bad");
    let good = ember_runtime::embedded::build();
    let write = |name: &str, b: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    expect_error(&write("truncated.gguf", &good[..200]), "truncated");
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_error(&write("magic.gguf", &b), "not a GGUF file");
    let mut b = good.clone();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    expect_error(&write("version.gguf", &b), "unsupported GGUF version 9");
    expect_error(
        &write("short-data.gguf", &good[..good.len() - 100]),
        "runs past the end of the file",
    );

    let mut w = GgufWriter::new();
    w.tensor(
        "huge",
        &[1 << 40, 1 << 40],
        ember_runtime::quant::GgmlType::F32,
        vec![],
    );
    expect_error(&write("overflow.gguf", &w.to_bytes()), "overflow");

    let mut w = GgufWriter::new();
    w.tensor(
        "t",
        &[32],
        ember_runtime::quant::GgmlType::F32,
        vec![0; 128],
    );
    let mut b = w.to_bytes();
    let p = 24 + 8 + 1 + 4 + 8; // header, name, n_dims, one dim
    b[p..p + 4].copy_from_slice(&77u32.to_le_bytes());
    expect_error(&write("quant-type.gguf", &b), "unknown quant type id 77");

    expect_error(
        &write(
            "missing.gguf",
            &rewrite(&good, Some("blk.1.ffn_up.weight"), &[]),
        ),
        "missing tensor 'blk.1.ffn_up.weight'",
    );
    let arch = [("general.architecture", Value::String("mamba9".into()))];
    expect_error(
        &write("arch.gguf", &rewrite(&good, None, &arch)),
        "unknown architecture 'mamba9'",
    );
    // RoPE frequency factors of the wrong length are refused with the tensor's name (Llama 3's
    // `rope_freqs` runs; tests/arch_reference.rs holds it to llama.cpp).
    let with_rope_freqs = {
        let g = parse_bytes(&good).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in g.metadata.iter() {
            w.kv(k, v.clone());
        }
        for t in &g.tensors {
            w.tensor(t.name.clone(), &t.dims, t.ty, g.tensor_bytes(t).to_vec());
        }
        let n = (ember_runtime::embedded::N_EMBD / ember_runtime::embedded::N_HEADS / 2) as u64 + 1;
        let ones: Vec<u8> = (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
        w.tensor(
            "rope_freqs.weight",
            &[n],
            ember_runtime::quant::GgmlType::F32,
            ones,
        );
        w.to_bytes()
    };
    expect_error(
        &write("rope-freqs.gguf", &with_rope_freqs),
        "rope_freqs.weight",
    );
    // RoPE scaling that ember does not implement is refused, never run as plain RoPE.
    let yarn = [("llama.rope.scaling.type", Value::String("yarn".into()))];
    expect_error(
        &write("yarn.gguf", &rewrite(&good, None, &yarn)),
        "RoPE scaling 'yarn' (llama.rope.scaling.type) is not supported yet",
    );
    expect_error(&dir.join("does-not-exist.gguf"), "cannot open");
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let long = "abc ".repeat(100);
    let out = ember()
        .args(["run", "-c", "64", "-n", "4", "-p", &long])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("longer than the context of 64 tokens"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn a_context_beyond_the_training_context_is_clamped_with_a_notice() {
    let out = ember()
        .args([
            "run",
            "-c",
            "999999999",
            "-n",
            "4",
            "--temp",
            "0",
            "-p",
            "hello",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let train = ember_runtime::embedded::N_CTX;
    assert!(
        err.contains(&format!(
            "--ctx 999999999 is more than the model's training context; using {train}"
        )),
        "{err}"
    );
}

#[test]
fn a_model_path_that_is_not_a_file_says_so() {
    for (path, kind) in [("/dev/null", "a character device"), ("/", "a directory")] {
        let out = ember()
            .args(["run", "-n", "2", "-p", "hi", "-m", path])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("{path}: not a regular file ({kind})")),
            "{err}"
        );
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = ember().args(["run", "--no-such-flag"]).output().unwrap();
    assert!(!out.status.success());
    let out = ember()
        .args(["run", "-p", "x", "--top-p", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("top-p"));
    let out = ember()
        .args(["run", "-p", "x", "--threads", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn backend_auto_without_a_gpu_says_it_falls_back_and_runs_on_the_cpu() {
    // EMBER_WGPU_BACKENDS=none hides every adapter, hardware ones too: a machine without a GPU.
    let out = ember()
        .env("EMBER_WGPU_BACKENDS", "none")
        .args([
            "run",
            "-p",
            "hello",
            "-n",
            "10",
            "--temp",
            "0",
            "--backend",
            "auto",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("--backend auto: falling back to the CPU"),
        "should say it fell back: {err}"
    );
    assert!(
        err.contains("ember: cpu |"),
        "summary should name the CPU backend: {err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "pqrstuvwxy"
    );
}

#[cfg(feature = "wgpu")]
#[test]
fn without_a_graphical_session_the_gpu_probe_prints_no_errors() {
    // A board over SSH, a container: no XDG_RUNTIME_DIR. Each probe says one informative line:
    // where it runs, or why not on a GPU.
    for backend in ["auto", "wgpu"] {
        let out = ember()
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("NODEVICE_SELECT")
            .args([
                "run",
                "-p",
                "hello",
                "-n",
                "2",
                "--temp",
                "0",
                "--backend",
                backend,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{backend}: {err}");
        assert!(!err.contains("error"), "{backend}: {err}");
        let lines = err.matches("falling back to the CPU").count()
            + err.matches("backend: wgpu on").count();
        assert_eq!(lines, 1, "{backend}: {err}");
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn the_backends_variable_hides_adapters_the_probe_would_find() {
    // `--backend wgpu` takes software adapters too (lavapipe in CI): hidden, it must fall back.
    let out = ember()
        .env("EMBER_WGPU_BACKENDS", "none")
        .args([
            "run",
            "-p",
            "hello",
            "-n",
            "2",
            "--temp",
            "0",
            "--backend",
            "wgpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("falling back to the CPU") && err.contains("EMBER_WGPU_BACKENDS=none"),
        "{err}"
    );
    let out = ember()
        .env("EMBER_WGPU_BACKENDS", "vulkan,cuda")
        .args(["run", "-p", "hello", "-n", "2", "--backend", "wgpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown API 'cuda'"), "{err}");
}

#[cfg(feature = "wgpu")]
#[test]
fn backend_wgpu_runs_the_embedded_model_on_a_gpu_adapter() {
    // Any adapter counts for --backend wgpu, software ones too (lavapipe in CI).
    let out = ember()
        .args([
            "run",
            "-p",
            "hello",
            "-n",
            "10",
            "--temp",
            "0",
            "--backend",
            "wgpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("backend: wgpu on "),
        "should name the adapter: {err}"
    );
    assert!(
        err.contains("ember: wgpu |") && err.contains("device: weights"),
        "summary: {err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "pqrstuvwxy"
    );
}

/// `ember -v run` on wgpu reports the kernel launches it issued, per forward pass.
#[cfg(feature = "wgpu")]
#[test]
fn verbose_run_on_wgpu_counts_kernel_launches() {
    let out = ember()
        .args(["-v", "run", "-p", "hello", "-n", "3", "--backend", "wgpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("kernel launches over 3 forward passes"))
        .unwrap_or_else(|| panic!("no launch count: {err}"));
    let total: usize = line
        .split("wgpu: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(total > 3, "{line}");
    assert!(line.contains("QmmKernel"), "{line}");
}

#[test]
fn unknown_backend_is_a_usage_error() {
    let out = ember()
        .args(["run", "-p", "hello", "--backend", "rocm"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unknown backend 'rocm'")
            && err.contains("auto, cpu, wgpu, vulkan, metal, cuda"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// `--backend cuda` where CUDA cannot start (this binary has no `cuda` feature, or the machine
/// no NVIDIA driver, as on CI) is an error with the reason: exit 1, nothing generated, no
/// fallback to another device.
#[test]
fn cuda_by_name_without_cuda_is_an_error() {
    let out = ember()
        .args(["run", "-p", "hello", "-n", "2", "--backend", "cuda"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if std::path::Path::new("/dev/nvidiactl").exists() && ember_runtime::accel::CUDA_COMPILED {
        // A machine where CUDA can start: then it runs there.
        assert!(
            out.status.success() && err.contains("backend: cuda"),
            "{err}"
        );
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--backend cuda:"), "{err}");
    assert!(
        err.contains("cuda feature") || err.contains("NVIDIA driver"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// llama-bench mode on wgpu adds kernel launches per token (counted on the untimed warm-up);
/// on the CPU there is no such figure.
#[cfg(feature = "wgpu")]
#[test]
fn bench_on_wgpu_reports_launches_per_token() {
    for (backend, want) in [("wgpu", true), ("cpu", false)] {
        let out = ember()
            .args([
                "bench",
                "--backend",
                backend,
                "--pp",
                "8",
                "--tg",
                "4",
                "-r",
                "1",
            ])
            .args(["--json", "--no-db"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for r in j["results"].as_array().unwrap() {
            let l = r.get("launches_per_token").and_then(|v| v.as_f64());
            assert_eq!(l.is_some(), want, "{backend}: {r}");
            if let Some(l) = l {
                assert!(l >= 1.0, "{backend}: {r}");
            }
        }
    }
}

/// A KV budget the device cannot hold (pools over the adapter's largest buffer) fails the
/// request with what to do, instead of a panic when the allocation fails on the device.
#[cfg(feature = "wgpu")]
#[test]
fn a_kv_budget_too_large_for_the_device_is_an_error_not_a_panic() {
    let out = ember()
        .args(["bench", "--backend", "wgpu", "-w", "chat", "-n", "1"])
        .args(["--max-tokens", "2", "--kv-budget-mib", "60000", "--no-db"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("over the adapter's largest buffer") && err.contains("--kv-budget-mib"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
}

/// `ember serve` on a GPU claims the KV budget's device pools at start: a budget the device
/// cannot hold stops it before it listens (exit 1, with what to lower).
#[cfg(feature = "wgpu")]
#[test]
fn serve_refuses_a_kv_budget_the_device_cannot_hold_before_listening() {
    let out = ember()
        .args(["serve", "--backend", "wgpu", "--port", "18093", "--no-db"])
        .args(["--kv-budget-mib", "60000"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("over the adapter's largest buffer"), "{err}");
    assert!(!err.contains("listening"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
