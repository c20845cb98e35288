//! What the machine does: `memory.bandwidth`, `matmul.*`, `bench.*`, `roofline.*` and
//! `profile.memory`.

use std::time::Instant;

use ember_runtime::engine::Engine;
use ember_runtime::opcheck::randn;
use ember_runtime::quant::{self, GgmlType, QMatRef};
use ember_runtime::sample::Rng;

use super::floors::{Expect, Judge};
use super::report::Check;
use super::{mib, pool};
use crate::llamabench::{Test, run_test};
use crate::profile::DeviceProfile;

/// Read a large buffer with all threads; best of a few passes, GB/s.
fn measure_bandwidth(threads: usize, bytes: usize) -> f64 {
    let pool = pool(threads);
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        let s = pool.install(|| {
            use rayon::prelude::*;
            buf.par_chunks(1 << 16)
                .map(|c| {
                    let mut a = [0u64; 8];
                    let (ch, rest) = c.as_chunks::<8>();
                    for x in ch {
                        for i in 0..8 {
                            a[i] = a[i].wrapping_add(x[i]);
                        }
                    }
                    a.iter().chain(rest).fold(0u64, |s, &v| s.wrapping_add(v))
                })
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(s);
        let dt = t.elapsed().as_secs_f64();
        best = best.max(bytes as f64 / dt / 1e9);
    }
    best
}

/// FLOP/s of `matmul` on the best ISA for a `rows × cols` weight of `ty` and `m` activation rows.
fn measure_matmul(threads: usize, ty: GgmlType, rows: usize, cols: usize, m: usize) -> f64 {
    let pool = pool(threads);
    let mut rng = Rng::new(99);
    let w = randn(&mut rng, rows * cols, 0.05);
    let q = quant::quantize(ty, &w).expect("aligned");
    let wm = QMatRef {
        ty,
        rows,
        cols,
        data: &q,
    };
    let x = randn(&mut rng, m * cols, 1.0);
    let mut y = vec![0f32; m * rows];
    pool.install(|| quant::matmul(wm, &x, m, &mut y)); // warm-up
    let t = Instant::now();
    let mut calls = 0;
    while calls < 2 || t.elapsed().as_secs_f64() < 0.3 {
        pool.install(|| quant::matmul(wm, &x, m, &mut y));
        calls += 1;
    }
    2.0 * (m * rows * cols * calls) as f64 / t.elapsed().as_secs_f64()
}

/// The figures the model rows build on.
#[derive(Clone, Copy)]
pub(super) struct Figures {
    /// Memory bandwidth, GB/s.
    bw: f64,
    /// FLOP/s of the model's dominant weight type at 32 rows.
    pflops: f64,
    dominant: GgmlType,
}

/// `memory.bandwidth`, `matmul.f32`, `matmul.<TYPE>.m32` (the model's own weight type) and
/// `matmul.q4_k`.
pub(super) fn machine_rows(
    judge: &Judge<'_>,
    engine: &Engine,
    bw_bytes: usize,
) -> (Vec<Check>, Figures) {
    let (threads, profile) = (judge.threads, judge.profile);
    let bw = measure_bandwidth(threads, bw_bytes);
    let mut msg = format!(
        "{threads} threads reading {:.0} MiB, best of 4",
        mib(bw_bytes as f64)
    );
    if let Some(nom) = profile.and_then(|p| p.memory_bandwidth_gbs) {
        msg += &format!(
            "; {:.0}% of the profile's nominal {nom} GB/s",
            100.0 * bw / nom
        );
    }
    let flops = measure_matmul(threads, GgmlType::F32, 512, 1024, 64);
    let qflops = measure_matmul(threads, GgmlType::Q4_K, 1024, 1024, 1);
    // The prefill path of the model's own dominant weight type (by bytes), 32 rows.
    let mut by_type: std::collections::BTreeMap<&str, (u64, GgmlType)> = Default::default();
    for t in engine
        .file
        .tensors
        .iter()
        .filter(|t| t.ty.is_supported() && t.dims.len() == 2)
    {
        by_type.entry(t.ty.name()).or_insert((0, t.ty)).0 += t.n_bytes;
    }
    let dominant = by_type
        .values()
        .max_by_key(|(b, _)| *b)
        .map(|(_, t)| *t)
        .unwrap_or(GgmlType::Q4_K);
    let pflops = measure_matmul(threads, dominant, 512, 1024, 32);
    let rows = vec![
        judge.row("memory.bandwidth", bw, "GB/s", msg, Expect::Bandwidth),
        judge.row(
            "matmul.f32",
            flops / 1e9,
            "GFLOP/s",
            format!(
                "f32 weights 512x1024, 64 rows (prefill path, gemm), {}",
                quant::best_isa().name()
            ),
            Expect::MatmulF32,
        ),
        judge.row(
            format!("matmul.{}.m32", dominant.name()),
            pflops / 1e9,
            "GFLOP/s",
            format!(
                "the model's main weight type, 512x1024, 32 rows (prefill path), {}",
                quant::best_isa().name()
            ),
            Expect::Never("it depends on the model's weight type"),
        ),
        judge.row(
            "matmul.q4_k",
            qflops / 1e9,
            "GFLOP/s",
            format!(
                "Q4_K weights 1024x1024, 1 row (decode path), {}: {:.1} GB/s of weights",
                quant::best_isa().name(),
                qflops / 2.0 * (GgmlType::Q4_K.block_bytes() as f64 / 256.0) / 1e9
            ),
            Expect::MatmulQ4K,
        ),
    ];

    (
        rows,
        Figures {
            bw,
            pflops,
            dominant,
        },
    )
}

/// `bench.pp`, `bench.tg`, the rooflines of the model in use and, with a profile,
/// `profile.memory`.
pub(super) fn model_rows(judge: &Judge<'_>, engine: &Engine, f: &Figures) -> Vec<Check> {
    let Figures {
        bw,
        pflops,
        dominant,
    } = *f;
    let mut c = vec![];
    let bench = |kind: Test, n: usize| run_test(engine, kind, n, 3, || {});
    let pp = bench(Test::Pp, 32);
    let tg = bench(Test::Tg, 16);
    let fig = |r: &Result<crate::llamabench::BenchResult, _>| r.as_ref().map(|b| b.mean_tps).ok();
    for (name, r, e) in [("bench.pp", &pp, Expect::Pp), ("bench.tg", &tg, Expect::Tg)] {
        c.push(match r {
            Ok(b) => judge.row(
                name,
                b.mean_tps,
                "tok/s",
                format!(
                    "{}: {:.1} ± {:.1} tok/s over 3 reps",
                    b.test, b.mean_tps, b.sd_tps
                ),
                e,
            ),
            Err(e) => Check::new(name, false, None, "tok/s", format!("failed: {e}")),
        });
    }

    // Rooflines of the model in use: ratios of two figures above, measurements only.
    let weights = engine.model.weight_bytes() as f64;
    let n_params: f64 = engine
        .file
        .tensors
        .iter()
        .map(|t| t.n_elements() as f64)
        .sum();
    let kv_per_tok = engine.model.config().kv_bytes_per_token() as f64;
    // Decode reads every weight once per token, plus the KV cache (≤ 16 positions here).
    let bytes_per_tok = weights + kv_per_tok * 16.0;
    let limit = bw * 1e9 / bytes_per_tok;
    if let Some(achieved) = fig(&tg) {
        let frac = achieved / limit;
        let mut msg = format!(
            "limit {limit:.1} tok/s = {bw:.1} GB/s / {:.2} MiB per token (weights + KV); achieved {achieved:.1} tok/s = {:.1}% of the limit",
            mib(bytes_per_tok),
            100.0 * frac
        );
        if frac > 1.0 {
            msg += &format!(
                "; above the DRAM roofline: the weights ({:.1} MiB) are served from cache",
                mib(weights)
            );
        }
        c.push(judge.row(
            "roofline.decode",
            frac,
            "fraction",
            msg,
            Expect::Never("a ratio of two measured figures"),
        ));
    }
    if let Some(achieved) = fig(&pp) {
        // Prefill does ~2 FLOP per parameter per token.
        let plimit = pflops / (2.0 * n_params);
        let frac = achieved / plimit;
        c.push(judge.row(
            "roofline.prefill",
            frac,
            "fraction",
            format!(
                "limit {plimit:.1} tok/s = {:.2} GFLOP/s ({} m=32) / {:.2} MFLOP per token; achieved {achieved:.1} tok/s = {:.1}% of the limit{}",
                pflops / 1e9,
                dominant.name(),
                2.0 * n_params / 1e6,
                100.0 * frac,
                if frac > 1.0 { "; above it because 2 FLOP per parameter over-counts (the embedding is a lookup, the output head runs for the last token only) and small matrices stay in cache" } else { "" }
            ),
            Expect::Never("a ratio of two measured figures"),
        ));
    }
    if let Some(p) = judge.profile {
        c.push(profile_memory(p, weights, kv_per_tok));
    }
    c
}

/// `profile.memory`: the model's weights fit the profile's memory budget.
fn profile_memory(p: &DeviceProfile, weights: f64, kv_per_tok: f64) -> Check {
    let (ok, msg) = match p.kv_budget_bytes(weights as u64) {
        Ok(kv) => (
            true,
            format!(
                "weights {:.1} MiB fit the {} GiB budget; KV budget {:.1} MiB = {} positions",
                mib(weights),
                p.memory_budget_gib,
                mib(kv as f64),
                (kv as f64 / kv_per_tok.max(1.0)) as u64
            ),
        ),
        Err(e) => (false, e),
    };
    Check::new("profile.memory", ok, Some(mib(weights)), "MiB", msg)
}
