use ember_runtime::quant::{self, GgmlType, Isa};

use super::floors::{Expect, Judge};
use super::*;
use crate::profile::DeviceProfile;

#[test]
fn nmse_basics() {
    assert_eq!(nmse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((nmse(&[1.1, 2.0], &[1.0, 2.0]) - 0.01 / 5.0).abs() < 1e-12);
    assert_eq!(nmse(&[f64::NAN], &[1.0]), f64::INFINITY);
}

/// Each row of the kernel checks comes from the entry of [`KERNEL_CHECKS`] that names it, in the
/// table's order, and the op rows follow the runtime's op registry.
#[test]
fn kernel_rows_follow_the_table() {
    let out = kernel_checks(2, None, None);
    let prefix = |name: &str| name.split('.').next().unwrap().to_string();
    let mut seen: Vec<String> = out.iter().map(|c| prefix(&c.name)).collect();
    seen.dedup();
    let table: Vec<&str> = KERNEL_CHECKS.iter().map(|(n, _)| *n).collect();
    assert_eq!(seen, table);
    let mut ops: Vec<String> = ember_runtime::opcheck::cases()
        .iter()
        .map(|c| format!("op.{}", c.op))
        .collect();
    ops.dedup();
    let op_rows: Vec<&str> = out
        .iter()
        .filter(|c| c.name.starts_with("op."))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(op_rows, ops);
    for c in out.iter().filter(|c| c.name.starts_with("op.")) {
        assert!(c.pass && c.kind == Kind::Check, "{c:?}");
        assert!(c.figure.is_some(), "{c:?}");
    }
}

#[test]
fn fault_spec_parses() {
    let f = parse_fault("q4_k").unwrap();
    assert_eq!(f.ty, GgmlType::Q4_K);
    assert_eq!(f.isa, Some(quant::best_isa()));
    assert_eq!(f.mode, FaultMode::Scale);
    let f = parse_fault("Q8_0:portable:output").unwrap();
    assert_eq!((f.isa, f.mode), (Some(Isa::Portable), FaultMode::Output));
    assert_eq!(
        parse_fault("q5_1:output").unwrap().isa,
        Some(quant::best_isa())
    );
    let f = parse_fault("f16").unwrap();
    assert_eq!((f.ty, f.isa), (GgmlType::F16, None));
    assert!(
        parse_fault("iq2_xxs")
            .unwrap_err()
            .contains("not a supported block type")
    );
    assert!(
        parse_fault("bf16:portable")
            .unwrap_err()
            .contains("one code path on every ISA")
    );
    assert!(
        parse_fault("q4_0:scale:portable")
            .unwrap_err()
            .contains("in its place")
    );
}

/// The exact reference is what the kernels compute, up to f32 rounding: every type on
/// every ISA is far inside the budget (the fault tests below need the room).
#[test]
fn exact_reference_is_tight_on_every_type_and_isa() {
    let out = kernel_checks(2, None, None);
    for c in out.iter().filter(|c| c.name.starts_with("parity.")) {
        let exact: f64 = c
            .message
            .split("vs exact math on the kernel's inputs ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exact figure in {}", c.message));
        eprintln!("{}: vs exact {exact:.2e}", c.name);
        assert!(exact <= PARITY_EXACT_NMSE / 100.0, "{c:#?}");
    }
}

#[test]
fn kernels_pass_and_a_fault_fails_clearly() {
    let ok = kernel_checks(2, None, None);
    let bad: Vec<_> = ok.iter().filter(|c| c.failed()).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(ok.iter().all(|c| c.kind == Kind::Check));
    // Every quantized type on every ISA has a parity row, each float type one; every type
    // a round trip.
    let n_isa = quant::available_isas().len();
    let parity: Vec<&str> = ok
        .iter()
        .filter(|c| c.name.starts_with("parity."))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(parity.len(), 12 * n_isa + 3, "{parity:?}");
    for t in ["F32", "F16", "BF16"] {
        assert!(
            parity.contains(&format!("parity.{t}").as_str()),
            "{parity:?}"
        );
    }
    assert_eq!(
        ok.iter()
            .filter(|c| c.name.starts_with("roundtrip."))
            .count(),
        15
    );

    // Every fault, inside or after the kernel, on every ISA: exactly its row fails.
    let mut specs: Vec<String> = vec![];
    for isa in quant::available_isas() {
        for t in [
            "q4_k", "q4_1", "q6_k", "q8_0", "q2_k", "q3_k", "iq4_nl", "iq4_xs",
        ] {
            specs.push(format!("{t}:{}", isa.name()));
        }
        specs.push(format!("q5_0:{}:output", isa.name()));
    }
    specs.extend(["f16", "bf16", "f32:output"].map(String::from));
    for spec in specs {
        let fault = parse_fault(&spec).unwrap();
        let out = kernel_checks(2, None, Some(fault));
        let failed: Vec<_> = out.iter().filter(|c| c.failed()).collect();
        assert_eq!(failed.len(), 1, "{spec}: {failed:#?}");
        let want = match fault.isa {
            Some(i) => format!("parity.{}.{}", fault.ty.name(), i.name()),
            None => format!("parity.{}", fault.ty.name()),
        };
        assert_eq!(failed[0].name, want, "{spec}");
        let m = &failed[0].message;
        eprintln!("{spec}: {m}");
        assert!(
            m.contains("disagrees") && m.contains("fault injected on purpose"),
            "{m}"
        );
        if fault.mode == FaultMode::Scale {
            // Subtle: only the tight references see it, the float-activation one does not.
            let r: f64 = m
                .split("vs f64 on float activations ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap();
            assert!(r <= PARITY_REF_NMSE, "{spec}: {m}");
        }
    }
}

fn profile_with(expect: &str) -> DeviceProfile {
    let arch = std::env::consts::ARCH;
    DeviceProfile::parse(
        &format!(
            "name = \"t\"\ntarget_triple = \"{arch}-unknown-linux-gnu\"\nbackends = [\"cpu\"]\nthreads = 2\n\
             memory_budget_gib = 1.0\ndefault_slo = \"batch\"\ncost_per_hour_usd = 0.0\ntypical_power_w = 1.0\n\
             [expect]\n{expect}\n"
        ),
        "t.toml",
    )
    .unwrap()
}

#[test]
fn figures_are_checks_only_against_a_profile() {
    let msg = || "m".to_string();
    // No profile: a measurement, whatever the figure.
    let j = Judge {
        profile: None,
        threads: 2,
        embedded_model: true,
    };
    let c = j.row("memory.bandwidth", 0.001, "GB/s", msg(), Expect::Bandwidth);
    assert_eq!((c.kind, c.status()), (Kind::Measurement, "meas"));
    assert!(
        c.message.contains("not judged: no device profile"),
        "{}",
        c.message
    );
    assert!(c.to_row().measurement && c.to_row().pass);
    assert_eq!(c.to_json()["pass"], serde_json::Value::Null);
    // A broken figure fails even without a profile.
    assert!(
        j.row("bench.tg", f64::NAN, "tok/s", msg(), Expect::Tg)
            .failed()
    );

    let p = profile_with("memory_bandwidth_gbs = 10.0\ntg_tps = 100.0");
    let j = Judge {
        profile: Some(&p),
        threads: 1,
        embedded_model: true,
    };
    let ok = j.row("memory.bandwidth", 5.0, "GB/s", msg(), Expect::Bandwidth);
    assert_eq!((ok.kind, ok.pass), (Kind::Check, true), "{ok:?}");
    let bad = j.row("bench.tg", 49.9, "tok/s", msg(), Expect::Tg);
    assert!(bad.failed(), "{bad:?}");
    for cause in [
        "below half of the 100 tok/s profile t expects",
        "thermal",
        "governor",
        "another process",
        "fewer threads (1) than the profile's 2",
    ] {
        assert!(bad.message.contains(cause), "{cause}: {}", bad.message);
    }
    // Not stated in the profile, or not the embedded model: measurements.
    let c = j.row("matmul.f32", 1.0, "GFLOP/s", msg(), Expect::MatmulF32);
    assert!(
        c.kind == Kind::Measurement && c.message.contains("states no expect.matmul_f32_gflops"),
        "{c:?}"
    );
    let j = Judge {
        embedded_model: false,
        ..j
    };
    let c = j.row("bench.tg", 1.0, "tok/s", msg(), Expect::Tg);
    assert!(
        c.kind == Kind::Measurement && c.message.contains("not --model"),
        "{c:?}"
    );
    let c = j.row(
        "roofline.decode",
        0.2,
        "fraction",
        msg(),
        Expect::Never("a ratio"),
    );
    assert_eq!(c.kind, Kind::Measurement);
}
