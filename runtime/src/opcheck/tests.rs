use super::*;
use crate::quant::GgmlType;

#[test]
fn opcheck_nmse_basics() {
    assert_eq!(nmse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((nmse(&[1.1, 2.0], &[1.0, 2.0]) - 0.01 / 5.0).abs() < 1e-12);
    assert_eq!(nmse(&[f64::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(nmse(&[0.0], &[0.0]), 0.0);
    assert_eq!(nmse(&[1e-3], &[0.0]), f64::INFINITY);
    assert_eq!(nmse_f32(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
}

#[test]
fn opcheck_exact_budget_counts_differing_bits() {
    let b = Budget::Exact;
    assert_eq!(b.error(&[1.0, -0.0], &[1.0, -0.0]), 0.0);
    // A signed zero is a different value here.
    assert_eq!(b.error(&[1.0, 0.0], &[1.0, -0.0]), 1.0);
    assert!(!b.holds(1.0) && b.holds(0.0));
    assert!(Budget::Nmse(1e-10).holds(1e-10) && !Budget::Nmse(1e-10).holds(2e-10));
}

/// The table covers every op the decoder runs and every block format, with unique names.
#[test]
fn opcheck_table_covers_every_op_and_format() {
    let t = cases();
    let mut names: Vec<String> = t.iter().map(OpCase::name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), t.len(), "case names must be unique");
    for op in [
        "rmsnorm",
        "rope",
        "softmax",
        "attention",
        "silu_mul",
        "round_f16",
        "qmatmul",
    ] {
        assert!(t.iter().any(|c| c.op == op), "no {op} case");
    }
    for ty in GgmlType::SUPPORTED {
        let n = t
            .iter()
            .filter(|c| c.op == "qmatmul" && c.shape.starts_with(&format!("{} ", ty.name())))
            .count();
        assert_eq!(n, 3, "{ty}: m = 1, 3 and 9");
    }
}

/// Every case's host kernels against its reference.
#[test]
fn opcheck_every_case_on_the_host() {
    let mut failed = vec![];
    for c in cases() {
        let o = c.check_host().unwrap();
        eprintln!(
            "{:<80} host vs reference {:.2e} ({})",
            c.name(),
            o.vs_reference,
            c.tol.vs_reference
        );
        if !o.pass {
            failed.push(format!("{}: {o:?}", c.name()));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Every case on burn-flex (the CPU device) against the reference and the host kernels.
#[cfg(feature = "burn")]
#[test]
fn opcheck_every_case_on_burn_flex() {
    let dev = crate::backend::cpu();
    let mut failed = vec![];
    for c in cases() {
        let o = c.check_device(&dev).unwrap();
        eprintln!(
            "{:<80} flex vs reference {:.2e}, vs host {:.2e}",
            c.name(),
            o.vs_reference,
            o.vs_host.unwrap()
        );
        if !o.pass {
            failed.push(format!("{}: {o:?}", c.name()));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The budgets bite: the host result with its largest element negated fails every case, against
/// the reference and against the host result itself.
#[test]
fn opcheck_a_wrong_result_fails() {
    for c in cases() {
        let b = c.build().unwrap();
        let mut y = b.host.clone();
        let i = y
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, _)| i)
            .unwrap();
        y[i] = -y[i];
        let e = c.tol.vs_reference.error(&y, &b.reference);
        assert!(
            !c.tol.vs_reference.holds(e),
            "{}: the largest output negated still passes ({e:e})",
            c.name()
        );
        let host = f64s(&b.host);
        let e = c.tol.vs_host.error(&y, &host);
        assert!(!c.tol.vs_host.holds(e), "{}: vs host {e:e}", c.name());
    }
}

/// Each case draws the same inputs every time (its seed is its name).
#[test]
fn opcheck_cases_are_reproducible() {
    let t = cases();
    let a = t[0].build().unwrap();
    let b = t[0].build().unwrap();
    assert_eq!(a.reference, b.reference);
    assert_eq!(a.host, b.host);
    assert_ne!(t[0].seed(), t[1].seed());
}
