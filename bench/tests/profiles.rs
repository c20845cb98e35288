//! Device profiles: every profile in `targets/` parses and validates, the
//! built-in copies are the files, and bad profiles get clear errors that name
//! the file and the field.

use std::path::{Path, PathBuf};

use ember_bench::profile::{BUILTIN, DeviceProfile, ProfileError};

fn targets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("targets")
}

const GOOD: &str = r#"
name = "good"
target_triple = "aarch64-unknown-linux-gnu"
backends = ["cpu"]
threads = 4
cpu_cores = 4
memory_budget_gib = 6.0
device_memory_gib = 8.0
default_slo = "rag"
cost_per_hour_usd = 0.004
typical_power_w = 7.0
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn tmp() -> PathBuf {
    std::env::temp_dir().join(format!("ember-profiles-{}", std::process::id()))
}

/// Load `text` as `NAME.toml` and return the error message (the profile must be rejected).
fn rejected(name: &str, text: &str) -> String {
    let p = write(&tmp(), name, text);
    let e = DeviceProfile::load(&p).expect_err("profile should be rejected");
    let msg = e.to_string();
    assert!(
        msg.contains(&p.display().to_string()),
        "error should name the file: {msg}"
    );
    msg
}

#[test]
fn every_profile_in_targets_parses_and_validates() {
    let mut names = vec![];
    for entry in std::fs::read_dir(targets_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let p = DeviceProfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p.threads >= 1 && p.threads <= p.cpu_cores.unwrap_or(usize::MAX),
            "{}",
            p.name
        );
        assert!(
            p.memory_budget_gib <= p.device_memory_gib.unwrap(),
            "{}: every shipped profile states its memory",
            p.name
        );
        assert!(
            p.cost_per_hour_usd > 0.0 && p.typical_power_w > 0.0,
            "{}",
            p.name
        );
        assert!(
            p.memory_bandwidth_gbs.is_some(),
            "{}: every shipped profile states its bandwidth",
            p.name
        );
        assert!(!p.description.is_empty(), "{}", p.name);
        // Every figure carries a comment saying where it comes from.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .filter(|l| l.trim_start().starts_with('#'))
                .count()
                >= 5,
            "{}: cite the figures",
            path.display()
        );
        names.push(p.name);
    }
    names.sort();
    let mut want = vec![
        "apple-m",
        "jetson-agx-orin",
        "jetson-orin-nano",
        "nvidia-h100",
        "raspberry-pi-5",
        "x86-64-avx2",
    ];
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn built_in_profiles_are_the_files() {
    assert_eq!(BUILTIN.len(), 6);
    for (name, text) in BUILTIN {
        let file = std::fs::read_to_string(targets_dir().join(format!("{name}.toml"))).unwrap();
        assert_eq!(*text, file, "{name}");
        let p = DeviceProfile::resolve(name).unwrap();
        assert_eq!(p.name, *name);
    }
    let pi = DeviceProfile::resolve("raspberry-pi-5").unwrap();
    assert_eq!(
        (
            pi.threads,
            pi.target_triple.as_str(),
            pi.default_slo.as_str()
        ),
        (4, "aarch64-unknown-linux-gnu", "rag")
    );
    assert_eq!(pi.kv_budget_gib, Some(1.0));
    let mac = DeviceProfile::resolve("apple-m").unwrap();
    assert_eq!(mac.target_triple, "aarch64-apple-darwin");
    // The Pi 5 states the bandwidth a healthy board reads (a sourced, conservative figure);
    // nobody has measured its tokens/s yet, so those stay unstated (measurements).
    let e = pi
        .expect
        .as_ref()
        .expect("raspberry-pi-5 has an [expect] table");
    assert_eq!(e.memory_bandwidth_gbs, Some(8.0));
    assert_eq!((e.tg_tps, e.pp_tps), (None, None));
}

#[test]
fn expect_table_parses_and_is_validated() {
    let text = format!(
        "{}\n[expect]\nmemory_bandwidth_gbs = 8.5\ntg_tps = 400\n",
        GOOD.replace("name = \"good\"", "name = \"expects\"")
    );
    let p = write(&tmp(), "expects", &text);
    let prof = DeviceProfile::load(&p).unwrap();
    let e = prof.expect.unwrap();
    assert_eq!(
        (e.memory_bandwidth_gbs, e.tg_tps, e.pp_tps),
        (Some(8.5), Some(400.0), None)
    );
    // Optional as a whole.
    assert!(
        DeviceProfile::load(&write(&tmp(), "good", GOOD))
            .unwrap()
            .expect
            .is_none()
    );
    for (name, line, needle) in [
        (
            "expneg",
            "tg_tps = -1.0",
            "expect.tg_tps = -1 must be a positive number",
        ),
        (
            "expzero",
            "memory_bandwidth_gbs = 0.0",
            "expect.memory_bandwidth_gbs = 0 must be a positive number",
        ),
        ("exptypo", "tg_tsp = 10.0", "tg_tsp"),
    ] {
        let text = format!(
            "{}\n[expect]\n{line}\n",
            GOOD.replace("name = \"good\"", &format!("name = \"{name}\""))
        );
        let msg = rejected(name, &text);
        assert!(
            msg.contains(needle),
            "{name}: expected {needle:?} in: {msg}"
        );
    }
}

#[test]
fn a_good_profile_file_loads_by_path() {
    let p = write(&tmp(), "good", GOOD);
    let prof = DeviceProfile::resolve(p.to_str().unwrap()).unwrap();
    assert_eq!(prof.threads, 4);
    assert_eq!(prof.kv_budget_bytes(1 << 30).unwrap(), (5u64 << 30));
}

#[test]
fn unknown_field_is_named() {
    let msg = rejected(
        "typo",
        &GOOD.replace("name = \"good\"", "name = \"typo\"\nthread_count = 4"),
    );
    assert!(msg.contains("thread_count"), "{msg}");
    assert!(msg.contains("unknown field"), "{msg}");
}

#[test]
fn missing_field_is_named() {
    let msg = rejected(
        "nothreads",
        &GOOD
            .replace("name = \"good\"", "name = \"nothreads\"")
            .replace("threads = 4\n", ""),
    );
    assert!(
        msg.contains("missing field") && msg.contains("threads"),
        "{msg}"
    );
}

#[test]
fn contradictions_are_clear() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("zero", "threads = 4\n", "threads = 0\n", "threads = 0"),
        (
            "toomany",
            "threads = 4\n",
            "threads = 8\n",
            "threads = 8 exceeds cpu_cores = 4",
        ),
        (
            "overbudget",
            "memory_budget_gib = 6.0",
            "memory_budget_gib = 12.0",
            "larger than device_memory_gib = 8",
        ),
        (
            "kvbig",
            "memory_budget_gib = 6.0",
            "memory_budget_gib = 6.0\nkv_budget_gib = 7.0",
            "kv_budget_gib = 7 is larger than memory_budget_gib = 6",
        ),
        (
            "badbackend",
            "backends = [\"cpu\"]",
            "backends = [\"rocm\"]",
            "unknown backend 'rocm'",
        ),
        (
            "metal",
            "backends = [\"cpu\"]",
            "backends = [\"wgpu-metal\"]",
            "not an Apple target",
        ),
        (
            "noback",
            "backends = [\"cpu\"]",
            "backends = []",
            "backends is empty",
        ),
        (
            "badslo",
            "default_slo = \"rag\"",
            "default_slo = \"snappy\"",
            "unknown SLO profile 'snappy'",
        ),
        (
            "negcost",
            "cost_per_hour_usd = 0.004",
            "cost_per_hour_usd = -1.0",
            "cost_per_hour_usd",
        ),
        (
            "nopower",
            "typical_power_w = 7.0",
            "typical_power_w = 0.0",
            "typical_power_w = 0 must be a positive number",
        ),
        (
            "triple",
            "aarch64-unknown-linux-gnu",
            "arm64",
            "not a target triple",
        ),
        (
            "wrongtype",
            "threads = 4\n",
            "threads = \"four\"\n",
            "threads",
        ),
    ];
    for (name, from, to, needle) in cases {
        let text = GOOD
            .replace("name = \"good\"", &format!("name = \"{name}\""))
            .replacen(from, to, 1);
        let msg = rejected(name, &text);
        assert!(
            msg.contains(needle),
            "{name}: expected {needle:?} in: {msg}"
        );
    }
}

#[test]
fn name_must_match_the_file() {
    let msg = rejected("other", GOOD);
    assert!(
        msg.contains("name = \"good\" but the file is other.toml"),
        "{msg}"
    );
}

#[test]
fn unknown_profile_lists_the_known_ones() {
    let e = DeviceProfile::resolve("raspberry-pi-9").unwrap_err();
    assert!(matches!(e, ProfileError::Unknown { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("raspberry-pi-9")
            && msg.contains("raspberry-pi-5")
            && msg.contains("nvidia-h100"),
        "{msg}"
    );
    let e = DeviceProfile::resolve("/nonexistent/x.toml").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.toml"), "{e}");
}
