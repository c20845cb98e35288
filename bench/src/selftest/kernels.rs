//! The model-independent checks besides parity: `backends`, `roundtrip.*` and the op registry's
//! `op.*` rows.

use ember_runtime::opcheck::{self, Budget, OpCase, f64s, nmse, randn};
use ember_runtime::quant::{self, GgmlType, Isa};
use ember_runtime::sample::Rng;

use super::pool;
use super::report::Check;
use crate::profile::DeviceProfile;

/// Round-trip NMSE budgets (error power / signal power per 256-span), the squares of the
/// runtime's relative-RMSE budgets (`runtime/src/quant/tests/round_trip.rs`: ≈1.5× what the reference
/// quantizer measures on normal data; b-bit blocks give ≈ range/(2^b−1)/√12).
pub fn roundtrip_budget(ty: GgmlType) -> f64 {
    let rel_rmse: f64 = match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 3.5e-4,
        GgmlType::BF16 => 2.5e-3,
        GgmlType::Q4_0 => 0.12,
        GgmlType::Q4_1 => 0.11,
        GgmlType::Q5_0 => 0.065,
        GgmlType::Q5_1 => 0.05,
        GgmlType::Q8_0 => 0.008,
        GgmlType::Q4_K => 0.11,
        GgmlType::Q5_K => 0.055,
        GgmlType::Q6_K => 0.027,
        // ggml's quantizers (llama-quantize's bytes): measured relative RMSE 0.296, 0.150,
        // 0.077, 0.078 on this data, ×1.5.
        GgmlType::Q2_K => 0.45,
        GgmlType::Q3_K => 0.22,
        GgmlType::IQ4_NL => 0.12,
        GgmlType::IQ4_XS => 0.12,
        _ => 0.0,
    };
    rel_rmse * rel_rmse
}

pub(super) fn check_backends(profile: Option<&DeviceProfile>) -> Check {
    let isas = quant::available_isas();
    let names: Vec<&str> = isas.iter().map(|i| i.name()).collect();
    let adapters = ember_runtime::accel::adapters();
    let gpu = if !ember_runtime::accel::GPU_COMPILED {
        "no GPU backend is compiled into this binary (built without the wgpu feature)".to_string()
    } else if adapters.is_empty() {
        "wgpu found no adapter".to_string()
    } else {
        let list: Vec<String> = adapters
            .iter()
            .map(|a| match &a.unusable {
                Some(why) => format!("{a} [unusable: {why}]"),
                None => a.to_string(),
            })
            .collect();
        format!("wgpu adapters: {}", list.join("; "))
    };
    let mut msg = format!(
        "cpu ({}, {}): ISAs {} (kernels use {}); {gpu}",
        std::env::consts::ARCH,
        ember_runtime::sys::cpu_model(),
        names.join(", "),
        quant::best_isa().name()
    );
    let mut pass = isas.contains(&Isa::Portable);
    if let Some(p) = profile {
        msg += &format!("; profile {} prefers [{}]", p.name, p.backends.join(", "));
        let has_api = |api: &str| {
            adapters
                .iter()
                .any(|a| a.api == api && a.unusable.is_none())
        };
        let first = p.backends.first().map(String::as_str).unwrap_or("cpu");
        let gpu_ok = match first {
            "wgpu-vulkan" => has_api("vulkan"),
            "wgpu-metal" => has_api("metal"),
            "wgpu-dx12" => has_api("dx12"),
            "cuda" => matches!(
                ember_runtime::accel::choose(ember_runtime::accel::BackendChoice::Cuda).backend(),
                "cuda"
            ),
            _ => false,
        };
        if first == "cpu" || gpu_ok {
            msg += &format!(": {first} is available");
        } else if !p.backends.iter().any(|b| b == "cpu") {
            msg += ": none of them is available, running on the cpu";
        } else {
            msg += &format!(": no adapter for {first}, falling back to cpu");
        }
        if !p.matches_this_arch() {
            pass = false;
            msg += &format!(
                "; this binary is {} but the profile's target is {}",
                std::env::consts::ARCH,
                p.target_triple
            );
        }
    }
    Check::new("backends", pass, Some(isas.len() as f64), "isas", msg)
}

pub(super) fn check_roundtrips(out: &mut Vec<Check>) {
    let mut rng = Rng::new(0x5E1F_7E57);
    let n = 256 * 32;
    let mut x = Vec::with_capacity(n);
    for s in 0..n / 256 {
        x.extend(randn(&mut rng, 256, 0.01 * (1 + s % 7) as f32));
    }
    x[512..768].fill(0.0);
    for ty in GgmlType::SUPPORTED {
        let name = format!("roundtrip.{}", ty.name());
        let budget = roundtrip_budget(ty);
        let r = quant::quantize(ty, &x).and_then(|q| {
            let mut y = vec![f32::NAN; n];
            quant::dequantize(ty, &q, &mut y).map(|_| (q.len(), y))
        });
        let (bytes, y) = match r {
            Ok(v) => v,
            Err(e) => {
                out.push(Check::new(name, false, None, "nmse", format!("{e}")));
                continue;
            }
        };
        // Mean over 256-spans of (error power / signal power), so small-scale spans count equally.
        let (mut acc, mut k) = (0f64, 0usize);
        for (xs, ys) in x.chunks(256).zip(y.chunks(256)) {
            let e = nmse(&f64s(ys), &f64s(xs));
            if xs.iter().any(|&v| v != 0.0) {
                acc += e;
                k += 1;
            } else if e != 0.0 {
                acc = f64::INFINITY;
            }
        }
        let e = acc / k as f64;
        let zero_ok = y[512..768].iter().all(|&v| v == 0.0);
        let pass = e <= budget && zero_ok;
        let msg = format!(
            "{n} values -> {bytes} bytes ({:.2} bits/weight); NMSE {e:.2e} (budget {budget:.1e}){}",
            bytes as f64 * 8.0 / n as f64,
            if zero_ok {
                ""
            } else {
                "; an all-zero block did not come back as zeros"
            }
        );
        out.push(Check::new(name, pass, Some(e), "nmse", msg));
    }
}

/// `op.<op>`: every case of the runtime's op registry on the host kernels against its f64
/// reference, one row per op (its worst case), in the registry's order.
pub(super) fn check_ops(threads: usize, out: &mut Vec<Check>) {
    let pool = pool(threads);
    let cases = opcheck::cases();
    let mut ops: Vec<&str> = vec![];
    for c in &cases {
        if !ops.contains(&c.op) {
            ops.push(c.op);
        }
    }
    for op in ops {
        let group: Vec<&OpCase> = cases.iter().filter(|c| c.op == op).collect();
        out.push(pool.install(|| op_row(op, &group)));
    }
}

/// One op's row: its cases' worst error against the reference, within the budget of each.
fn op_row(op: &str, group: &[&OpCase]) -> Check {
    let name = format!("op.{op}");
    let budget = group[0].tol.vs_reference;
    let (mut worst, mut pass) = (0f64, true);
    for c in group {
        match c.check_host() {
            Ok(o) => {
                worst = worst.max(o.vs_reference);
                pass &= o.pass;
            }
            Err(e) => {
                let msg = format!("{}: could not run: {e}", c.shape);
                return Check::new(name, false, None, budget.unit(), msg);
            }
        }
    }
    let what = match group {
        [c] => c.shape.clone(),
        [first, .., last] if group.len() > 5 => {
            format!("{} cases, {} to {}", group.len(), first.shape, last.shape)
        }
        _ => group
            .iter()
            .map(|c| c.shape.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    };
    let msg = match budget {
        Budget::Nmse(b) => format!("{what}: NMSE {worst:.2e} vs naive f64 (budget {b:.0e})"),
        Budget::Exact => {
            format!("{what}: {worst} elements differ from the reference (budget: bit-exact)")
        }
    };
    Check::new(name, pass, Some(worst), budget.unit(), msg)
}
