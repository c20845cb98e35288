//! Kernel launches per decode step on wgpu, counted by ember itself
//! (`backend::count_launches`, cubecl's launch observer). In a test binary of its own: the
//! count is process-wide, so no other GPU test may run beside it (its own tests take turns). Fails (never skips) without
//! a wgpu adapter.
#![cfg(feature = "wgpu")]

mod common;

use ember_runtime::backend::count_launches;
use ember_runtime::engine::EngineConfig;
use ember_runtime::model::LogitsWanted;

/// Launches of one decode step, at most: 10 per layer (the bar; see
/// `ember_runtime::backend::gpu` for the ten) plus a constant for the output head (an RMSNorm
/// fused with the activation rounding, and the head's matmul). Measured when it was set, on
/// both models: exactly 10 per layer + 2 (SmolLM2: 302 for 30 layers). Before the fused
/// kernels: 1,324 for SmolLM2 (44.1 per layer).
const MAX_PER_LAYER: usize = 10;
const MAX_CONSTANT: usize = 2;

/// The counter is process-wide: the tests of this binary take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn decode_step_launches(model: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = common::wgpu_placement();
    let path = common::real_model(model);
    let e = ember_models::open_on(&path, &p, |_| EngineConfig {
        threads: 2,
        n_ctx: 256,
        prefill_chunk: 256,
    })
    .unwrap();
    let mut kv = e.new_cache();
    let mut logits = vec![];
    e.forward(&[1, 2, 3, 4], &mut kv, LogitsWanted::Last, &mut logits)
        .unwrap();
    // Warm: the first decode compiles its kernels (a compile is not a launch, but be safe).
    e.forward(&[5], &mut kv, LogitsWanted::Last, &mut logits)
        .unwrap();
    let (r, launches) =
        count_launches(|| e.forward(&[6], &mut kv, LogitsWanted::Last, &mut logits));
    r.unwrap();
    let layers = e.model.config().n_layers;
    eprintln!(
        "{model} decode step on wgpu: {} launches, {:.1} per layer ({layers} layers)",
        launches.total(),
        launches.total() as f64 / layers as f64
    );
    let mut top: Vec<_> = launches.by_kernel.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    for (k, n) in top.iter().take(25) {
        eprintln!("{n:6}  {k}");
    }
    assert!(
        launches.total() > layers,
        "the counter saw nothing: {launches:?}"
    );
    let max = MAX_PER_LAYER * layers + MAX_CONSTANT;
    assert!(
        launches.total() <= max,
        "{} launches, more than {MAX_PER_LAYER} per layer + {MAX_CONSTANT}",
        launches.total()
    );
}

#[test]
fn launches_per_decode_step_on_smollm2() {
    decode_step_launches(common::SMOLLM2);
}

/// Qwen2: q|k|v with biases, a q/k/v mix of Q5_0 and Q8_0 blocks (one activation rounding for
/// both), an untied head split in two buffers (still one launch).
#[test]
fn launches_per_decode_step_on_qwen25() {
    decode_step_launches(common::QWEN25);
}
