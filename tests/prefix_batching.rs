//! The paged KV cache, prefix reuse and continuous batching on a real model
//! (SmolLM2-135M Q4_1).

mod common;

use std::collections::HashMap;

use ember_runtime::engine::{Engine, EngineConfig, GenerateRequest};
use ember_runtime::kv::PagedKv;
use ember_runtime::model::{BatchItem, LogitsWanted};
use ember_runtime::sample::SamplerConfig;
use ember_runtime::scheduler::{BatchShape, Scheduler, SchedulerConfig};
use ember_runtime::serve::{CacheUse, FinishKind, ServeEvent, ServeRequest, Server};

fn engine() -> Engine {
    let path = common::real_model(common::SMOLLM2);
    ember_models::open(&path, |_| EngineConfig {
        threads: 2,
        n_ctx: 2048,
        prefill_chunk: 512,
    })
    .unwrap()
}

/// The same model on the GPU decoder (any wgpu adapter; lavapipe in CI). Fails without one.
#[cfg(feature = "wgpu")]
fn gpu_engine() -> Engine {
    let p = common::wgpu_placement();
    let path = common::real_model(common::SMOLLM2);
    ember_models::open_on(&path, &p, |_| EngineConfig {
        threads: 2,
        n_ctx: 2048,
        prefill_chunk: 512,
    })
    .unwrap()
}

/// Exactly `n` tokens of ordinary English.
fn system_prompt(e: &Engine, n: usize) -> Vec<u32> {
    let text =
        "You are a careful assistant for engineers who deploy language models on small devices. \
        Answer briefly, cite the measurement you rely on, and say when a figure is an estimate. "
            .repeat(60);
    let t = e.tokenizer.encode(&text, false, false).unwrap();
    assert!(t.len() >= n);
    t[..n].to_vec()
}

fn request(id: u64, prompt: Vec<u32>, max_tokens: usize) -> ServeRequest {
    ServeRequest {
        id,
        prompt_tokens: prompt,
        max_tokens,
        sampler: SamplerConfig::greedy(),
        stop_strings: vec![],
        ignore_eos: true,
    }
}

/// Run a server until idle; return per-request (tokens, cache use, finish, error).
fn drain(
    s: &mut dyn Server,
    out: &mut Vec<ServeEvent>,
) -> HashMap<u64, (Vec<u32>, CacheUse, FinishKind, Option<String>)> {
    while s.has_work() {
        s.step(out);
    }
    let mut res: HashMap<u64, (Vec<u32>, CacheUse, FinishKind, Option<String>)> = HashMap::new();
    for ev in out.drain(..) {
        match ev {
            ServeEvent::Token { id, token, .. } => res
                .entry(id)
                .or_insert((vec![], CacheUse::default(), FinishKind::Cancelled, None))
                .0
                .push(token),
            ServeEvent::PrefillEnd { id, cache, .. } => {
                res.entry(id)
                    .or_insert((vec![], cache, FinishKind::Cancelled, None))
                    .1 = cache
            }
            ServeEvent::Finished {
                id, reason, error, ..
            } => {
                let e = res
                    .entry(id)
                    .or_insert((vec![], CacheUse::default(), reason, None));
                e.2 = reason;
                e.3 = error;
            }
            _ => {}
        }
    }
    res
}

#[test]
fn shared_system_prompt_is_computed_once() {
    let e = engine();
    let sys = system_prompt(&e, 1000);
    let mut s = Scheduler::new(&e, SchedulerConfig::default());
    let bs = s.cfg.block_size;
    let mut out = vec![];
    for i in 0..20u64 {
        let q = e
            .tokenizer
            .encode(
                &format!(
                    " Question {i}: how fast is decode on board number {}?",
                    i * 7
                ),
                false,
                false,
            )
            .unwrap();
        let prompt: Vec<u32> = sys.iter().chain(&q).copied().collect();
        s.submit(request(i, prompt.clone(), 4), &mut out);
        let res = drain(&mut s, &mut out);
        let (toks, cache, reason, err) = &res[&i];
        assert_eq!(*reason, FinishKind::Length, "{err:?}");
        assert_eq!(toks.len(), 4);
        assert_eq!(
            cache.cached_prompt_tokens + cache.computed_prompt_tokens,
            prompt.len()
        );
        if i == 0 {
            assert_eq!(cache.cached_prompt_tokens, 0);
        } else {
            // Every full block of the shared prefix is reused: 1000 / 16 = 62 blocks = 992 tokens.
            assert_eq!(cache.cache_hit_blocks, 1000 / bs, "request {i}");
            assert_eq!(cache.cached_prompt_tokens, (1000 / bs) * bs);
            let computed_shared = 1000 - cache.cached_prompt_tokens;
            assert!(
                computed_shared * 10 <= 1000,
                "request {i} computed {computed_shared} of the shared 1000"
            );
            assert!(cache.cache_lookups >= cache.cache_hit_blocks);
        }
    }
}

#[test]
fn logits_after_a_cache_hit_equal_a_cold_computation() {
    cache_hit_equals_cold(&engine());
}

/// The device KV pools use the same block ids as the host bookkeeping: a hit maps blocks that
/// were written on the GPU.
#[cfg(feature = "wgpu")]
#[test]
fn logits_after_a_cache_hit_equal_a_cold_computation_on_wgpu() {
    cache_hit_equals_cold(&gpu_engine());
}

fn cache_hit_equals_cold(e: &Engine) {
    let sys = system_prompt(e, 300);
    let tail = e
        .tokenizer
        .encode(
            " So, what limits decode speed on a Raspberry Pi?",
            false,
            false,
        )
        .unwrap();
    let prompt: Vec<u32> = sys.iter().chain(&tail).copied().collect();
    let layout = e.model.kv_layout(16);
    let mut kv = PagedKv::new(layout, 256, 2048);
    let (mut cold, mut hot) = (vec![], vec![]);
    // Cold: the whole prompt from nothing.
    let a = kv.new_seq();
    let item = BatchItem {
        seq: a,
        tokens: &prompt,
        logits: LogitsWanted::Last,
    };
    e.install(|| e.model.forward_batch(&[item], &mut kv, &mut cold))
        .unwrap();
    // Hot: the shared prefix blocks come from the cache, only the rest is computed.
    let b = kv.new_seq();
    let hit = kv.match_prefix(b, &prompt).unwrap();
    // Same tokens, so every full block but the one holding the last token is reused.
    assert_eq!(hit.cached_tokens, (prompt.len() - 1) / 16 * 16);
    assert!(hit.cached_tokens >= 288);
    let item = BatchItem {
        seq: b,
        tokens: &prompt[hit.cached_tokens..],
        logits: LogitsWanted::Last,
    };
    e.install(|| e.model.forward_batch(&[item], &mut kv, &mut hot))
        .unwrap();
    let max_diff = cold
        .iter()
        .zip(&hot)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("max |cold - hit| = {max_diff:e}");
    assert!(max_diff <= 1e-3, "max |Δlogit| = {max_diff}");
}

#[test]
fn batched_decoding_equals_decoding_alone() {
    batched_equals_alone(&engine(), 8, 16);
}

/// Fewer and shorter on the GPU: a software adapter runs a 135M model at ~0.5 token/s.
#[cfg(feature = "wgpu")]
#[test]
fn batched_decoding_equals_decoding_alone_on_wgpu() {
    batched_equals_alone(&gpu_engine(), 4, 4);
}

fn batched_equals_alone(e: &Engine, n_seqs: usize, n_new: usize) {
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "Edge devices like the Jetson Orin",
        "The three pillars of latency are",
        "SELECT name FROM users WHERE",
        "Quantization trades accuracy for",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ];
    let toks: Vec<Vec<u32>> = prompts[..n_seqs]
        .iter()
        .map(|p| e.tokenizer.encode(p, false, true).unwrap())
        .collect();
    let alone: Vec<Vec<u32>> = toks
        .iter()
        .map(|t| {
            let req = GenerateRequest {
                prompt_tokens: t.clone(),
                max_tokens: n_new,
                sampler: SamplerConfig::greedy(),
                stop_strings: vec![],
                top_logprobs: 0,
                echo: false,
                ignore_eos: true,
            };
            e.generate(&req, &mut |_| {}).unwrap().generated_tokens
        })
        .collect();
    let mut s = Scheduler::new(
        e,
        SchedulerConfig {
            prefix_caching: false,
            ..Default::default()
        },
    );
    let mut out = vec![];
    for (i, t) in toks.iter().enumerate() {
        s.submit(request(i as u64, t.clone(), n_new), &mut out);
    }
    // All of them must decode together: step by step, each step is one forward pass, and the
    // tokens it emits are those of the sequences in that pass.
    let mut steps: Vec<(BatchShape, Vec<u64>)> = vec![];
    let mut events = vec![];
    while s.has_work() {
        let passes = s.forward_passes();
        let mut step_out = vec![];
        s.step(&mut step_out);
        assert_eq!(s.forward_passes(), passes + 1, "one forward pass per step");
        let mut ids: Vec<u64> = step_out
            .iter()
            .filter_map(|e| match e {
                ServeEvent::Token { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        steps.push((s.last_batch(), ids));
        events.extend(step_out);
    }
    let all: Vec<u64> = (0..n_seqs as u64).collect();
    // Step 1 prefills every prompt in one pass; each later step decodes every sequence.
    assert_eq!(
        steps.len(),
        n_new,
        "steps (pass shape, sequences that got a token), first ones: {:?}",
        &steps[..steps.len().min(3)]
    );
    let prompt_tokens: usize = toks.iter().map(Vec::len).sum();
    assert_eq!(
        steps[0],
        (
            BatchShape {
                seqs: n_seqs,
                decode_rows: 0,
                prefill_tokens: prompt_tokens,
                draft_rows: 0,
            },
            all.clone()
        )
    );
    for (k, step) in steps.iter().enumerate().skip(1) {
        assert_eq!(
            *step,
            (
                BatchShape {
                    seqs: n_seqs,
                    decode_rows: n_seqs,
                    prefill_tokens: 0,
                    draft_rows: 0,
                },
                all.clone()
            ),
            "step {k}: every sequence decodes in the same forward pass"
        );
    }
    out.extend(events);
    let res = drain(&mut s, &mut out);
    for (i, want) in alone.iter().enumerate() {
        assert_eq!(
            &res[&(i as u64)].0,
            want,
            "sequence {i} ({:?}) differs when batched",
            prompts[i]
        );
    }
}

#[test]
fn a_full_budget_waits_or_rejects_cleanly() {
    let e = engine();
    let per_block = e.model.kv_layout(16).block_bytes();
    // Room for 8 blocks = 128 positions in all.
    let cfg = SchedulerConfig {
        kv_budget_bytes: 8 * per_block,
        prefix_caching: false,
        ..Default::default()
    };
    let mut s = Scheduler::new(&e, cfg);
    let mut out = vec![];
    let p = e
        .tokenizer
        .encode("The capital of France is", false, false)
        .unwrap();
    // Each needs (5 + 40) / 16 → 3 blocks: two run, the third waits, all finish.
    for i in 0..3 {
        s.submit(request(i, p.clone(), 40), &mut out);
    }
    // One that can never fit: 200 positions.
    s.submit(request(9, p.clone(), 195), &mut out);
    // The first step admits two; the third waits behind them (and the fourth behind it, FCFS).
    s.step(&mut out);
    let st = s.stats();
    assert_eq!((st.running, st.waiting), (2, 2), "after the first step");
    assert_eq!(s.last_batch().seqs, 2);
    let scheduled =
        |id| move |e: &ServeEvent| matches!(e, ServeEvent::Scheduled { id: i, .. } if *i == id);
    let first_token =
        |id| move |e: &ServeEvent| matches!(e, ServeEvent::Token { id: i, .. } if *i == id);
    let one_of_two_done = |e: &ServeEvent| matches!(e, ServeEvent::Finished { id: 0 | 1, .. });
    assert!(
        !out.iter().any(scheduled(2)),
        "request 2 was scheduled although the budget holds only two"
    );
    // Until one of the first two finishes, no pass holds more than those two.
    while s.has_work() && !out.iter().any(one_of_two_done) {
        s.step(&mut out);
        assert!(s.last_batch().seqs <= 2, "{:?}", s.last_batch());
    }
    while s.has_work() {
        s.step(&mut out);
    }
    let done = out
        .iter()
        .position(one_of_two_done)
        .expect("0 or 1 finished");
    let sched2 = out.iter().position(scheduled(2)).expect("2 scheduled");
    let tok2 = out.iter().position(first_token(2)).expect("2 decoded");
    assert!(
        done < sched2 && sched2 < tok2,
        "request 2 must wait for a finished request: finished at event {done}, 2 scheduled at {sched2}"
    );
    let res = drain(&mut s, &mut out);
    for i in 0..3 {
        assert_eq!(res[&i].2, FinishKind::Length);
        assert_eq!(res[&i].0.len(), 40);
        assert_eq!(res[&i].0, res[&0].0, "same prompt, same greedy tokens");
    }
    assert_eq!(res[&9].2, FinishKind::Error);
    assert!(
        res[&9].3.as_deref().unwrap().contains("KV blocks"),
        "{:?}",
        res[&9].3
    );
}
