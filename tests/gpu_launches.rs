//! Kernel launches per decode step on wgpu, counted by ember itself
//! (`backend::count_launches`, cubecl's launch observer). In a test binary of its own: the
//! count is process-wide, so no other GPU test may run beside it. Fails (never skips) without
//! a wgpu adapter.
#![cfg(feature = "wgpu")]

mod common;

use ember_runtime::backend::count_launches;
use ember_runtime::engine::EngineConfig;
use ember_runtime::model::LogitsWanted;

/// Launches per layer of one SmolLM2 decode step, at most. The goal is 10 (plus a constant);
/// this bound only keeps the count from growing back while it is brought down. Measured when it
/// was set: 1,324 launches, 44.1 per layer (per layer: 7 quantized matmuls and 7 activation
/// quantizations, 4 contiguous copies, 4 f16 roundings, 3 adds, 2 KV slice-assigns, 2 dense
/// matmuls and 2 reductions in attention, 2 RMSNorms, 2 RoPEs, and the rest of softmax).
const MAX_PER_LAYER: f64 = 48.0;

#[test]
fn launches_per_decode_step_on_smollm2() {
    let p = common::wgpu_placement();
    let path = common::real_model(common::SMOLLM2);
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
    let per_layer = launches.total() as f64 / layers as f64;
    eprintln!(
        "SmolLM2 decode step on wgpu: {} launches, {per_layer:.1} per layer ({layers} layers)",
        launches.total()
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
    assert!(
        per_layer <= MAX_PER_LAYER,
        "{per_layer:.1} launches per layer, more than {MAX_PER_LAYER}"
    );
}
