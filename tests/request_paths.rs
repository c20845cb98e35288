//! Every way a request is served runs the one request state machine (`ember_runtime::request`):
//! `Engine::generate`, the one-at-a-time server and the batching scheduler give the same tokens,
//! text and end for the same request. The one-at-a-time server keeps its shape: a whole prompt
//! in one step, no KV memory held between requests. Embedded model: "a" is followed by "bcd…".

use ember_runtime::engine::{Engine, EngineConfig, Event, FinishReason, GenerateRequest};
use ember_runtime::sample::SamplerConfig;
use ember_runtime::scheduler::{Scheduler, SchedulerConfig};
use ember_runtime::serve::{FinishKind, SequentialServer, ServeEvent, ServeRequest, Server};

fn engine(prefill_chunk: usize) -> Engine {
    // Written once: the tests run in parallel.
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let path = PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-request-paths-{}", std::process::id()));
        ember_runtime::embedded::ensure_in(&dir).unwrap().0
    });
    ember_models::open(path, |train| EngineConfig {
        threads: 1,
        n_ctx: train.min(256),
        prefill_chunk,
    })
    .unwrap()
}

fn generate_request(e: &Engine, prompt: &str, n: usize, stops: &[&str]) -> GenerateRequest {
    GenerateRequest {
        prompt_tokens: e.tokenizer.encode(prompt, false, false).unwrap(),
        max_tokens: n,
        sampler: SamplerConfig::greedy(),
        stop_strings: stops.iter().map(|s| s.to_string()).collect(),
        top_logprobs: 0,
        echo: false,
        ignore_eos: false,
    }
}

fn serve_request(id: u64, g: &GenerateRequest) -> ServeRequest {
    ServeRequest {
        id,
        prompt_tokens: g.prompt_tokens.clone(),
        max_tokens: g.max_tokens,
        sampler: g.sampler.clone(),
        stop_strings: g.stop_strings.clone(),
        ignore_eos: g.ignore_eos,
    }
}

/// One served request: its tokens, the concatenated text of its token events, its end and error.
#[derive(Debug, PartialEq)]
struct Served {
    tokens: Vec<u32>,
    text: String,
    end: FinishKind,
    error: Option<String>,
}

fn serve(s: &mut dyn Server, req: ServeRequest) -> Served {
    let mut out = vec![];
    s.submit(req, &mut out);
    while s.has_work() {
        s.step(&mut out);
    }
    let mut r = Served {
        tokens: vec![],
        text: String::new(),
        end: FinishKind::Cancelled,
        error: None,
    };
    for ev in out {
        match ev {
            ServeEvent::Token { token, text, .. } => {
                r.tokens.push(token);
                r.text.push_str(&text);
            }
            ServeEvent::Finished { reason, error, .. } => (r.end, r.error) = (reason, error),
            _ => {}
        }
    }
    r
}

#[test]
fn every_path_gives_the_same_tokens_text_and_end() {
    let e = engine(512);
    // (prompt, max tokens, stop strings, text, end)
    let cases: [(&str, usize, &[&str], &str, FinishKind); 4] = [
        ("a", 20, &["fg"], "bcde", FinishKind::Stop),
        // "f" could start "fg": held back, then handed out at the length end.
        ("a", 5, &["fg"], "bcdef", FinishKind::Length),
        ("xy", 4, &[], "zabc", FinishKind::Length),
        ("a", 0, &[], "", FinishKind::Length),
    ];
    for (prompt, n, stops, want, end) in cases {
        let g = generate_request(&e, prompt, n, stops);
        let (mut tokens, mut pieces, mut finish_text) = (vec![], String::new(), None);
        let generation = e
            .generate(&g, &mut |ev| match ev {
                Event::Token { id, text, .. } => {
                    tokens.push(id);
                    pieces.push_str(text);
                }
                Event::Finish { text, .. } => finish_text = Some(text.to_string()),
                _ => {}
            })
            .unwrap();
        let case = format!("{prompt:?} -n {n} --stop {stops:?}");
        assert_eq!(generation.text, want, "{case}");
        assert_eq!(tokens, generation.generated_tokens, "{case}");
        let reason = if end == FinishKind::Stop {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(generation.finish_reason, reason, "{case}");
        // What was held back until the end comes with `Finish`.
        let finish_text = finish_text.expect("a Finish event");
        assert_eq!(format!("{pieces}{finish_text}"), want, "{case}");
        if n == 5 {
            assert_eq!(finish_text, "f", "{case}");
        }
        let alone = Served {
            tokens: generation.generated_tokens.clone(),
            text: generation.text.clone(),
            end,
            error: None,
        };
        let mut seq = SequentialServer::new(&e);
        assert_eq!(serve(&mut seq, serve_request(1, &g)), alone, "{case}");
        let mut batching = Scheduler::new(&e, SchedulerConfig::default());
        assert_eq!(serve(&mut batching, serve_request(2, &g)), alone, "{case}");
    }
}

#[test]
fn the_sequential_server_prefills_in_one_step_and_holds_no_kv_between_requests() {
    let e = engine(4);
    let g = generate_request(&e, "abcdefghij", 3, &[]);
    assert_eq!(g.prompt_tokens.len(), 10);
    let mut s = SequentialServer::new(&e);
    let mut out = vec![];
    s.submit(serve_request(0, &g), &mut out);
    out.clear();
    s.step(&mut out);
    // Three chunks of at most 4 prompt tokens, and the first token, in one step.
    assert_eq!(s.forward_passes(), 3);
    let kinds: Vec<&str> = out
        .iter()
        .map(|ev| match ev {
            ServeEvent::Scheduled { .. } => "scheduled",
            ServeEvent::PrefillStart { .. } => "prefill_start",
            ServeEvent::PrefillEnd { .. } => "prefill_end",
            ServeEvent::Token { .. } => "token",
            ServeEvent::Enqueued { .. } => "enqueued",
            ServeEvent::Finished { .. } => "finished",
            ServeEvent::Chunk { .. } => "chunk",
            ServeEvent::Usage { .. } => "usage",
            ServeEvent::Speculation { .. } => "speculation",
        })
        .collect();
    assert_eq!(
        kinds,
        ["scheduled", "prefill_start", "prefill_end", "token"]
    );
    let running = s.stats();
    assert!(running.kv_bytes_used > 0 && running.kv_bytes_reserved >= running.kv_bytes_used);
    while s.has_work() {
        s.step(&mut out);
    }
    assert_eq!(s.forward_passes(), 5, "then one pass per token");
    let idle = s.stats();
    assert_eq!((idle.kv_bytes_used, idle.kv_bytes_reserved), (0, 0));
    // The batching scheduler runs one pass per step: three steps to the first token.
    let mut b = Scheduler::new(
        &e,
        SchedulerConfig {
            max_batch_tokens: 4,
            ..Default::default()
        },
    );
    b.submit(serve_request(0, &g), &mut out);
    let steps_to_token = (1..)
        .find(|_| {
            let mut o = vec![];
            b.step(&mut o);
            o.iter().any(|ev| matches!(ev, ServeEvent::Token { .. }))
        })
        .unwrap();
    assert_eq!(steps_to_token, 3);
}

#[test]
fn echoed_logprobs_do_not_depend_on_prefill_chunks() {
    let positions = |chunk: usize| {
        let e = engine(chunk);
        let mut g = generate_request(&e, "abcde", 3, &[]);
        (g.top_logprobs, g.echo) = (3, true);
        let out = e.generate(&g, &mut |_| {}).unwrap();
        assert_eq!(out.text, "fgh");
        out.positions
            .iter()
            .map(|p| (p.consumed, p.top.iter().map(|t| t.id).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    };
    let whole = positions(512);
    let consumed: Vec<usize> = whole.iter().map(|p| p.0).collect();
    assert_eq!(consumed, [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(whole, positions(2));
}

#[test]
fn rejected_requests_keep_their_wording_on_each_path() {
    let e = engine(512);
    let empty = generate_request(&e, "", 4, &[]);
    let err = e.generate(&empty, &mut |_| {}).unwrap_err().to_string();
    assert_eq!(
        err,
        "prompt is empty (no tokens after tokenization, and no BOS)"
    );
    let mut s = SequentialServer::new(&e);
    let r = serve(&mut s, serve_request(0, &empty));
    assert_eq!(
        (r.end, r.error.as_deref()),
        (FinishKind::Error, Some("empty prompt"))
    );
    let long = GenerateRequest {
        prompt_tokens: vec![b'a' as u32; 256],
        ..empty
    };
    let err = e.generate(&long, &mut |_| {}).unwrap_err().to_string();
    assert_eq!(
        err,
        "prompt of 256 tokens plus 4 new tokens does not fit the context of 256"
    );
    let r = serve(&mut s, serve_request(1, &long));
    assert_eq!(
        r.error.as_deref(),
        Some("prompt of 256 tokens does not fit the context of 256")
    );
}

/// `Scheduler::cancel` (a client that went away): a running request leaves the batch and its
/// KV blocks go back at once, a waiting one leaves the queue, each reported `Cancelled`; a
/// finished or unknown one is not cancelled; the other request runs on to its own end.
#[test]
fn a_cancelled_request_frees_its_blocks_and_the_others_run_on() {
    let e = engine(4);
    let long = generate_request(&e, "abcdefgh", 20, &[]);
    let cfg = SchedulerConfig {
        max_running: 2,
        prefix_caching: false,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(&e, cfg);
    let mut out = vec![];
    for id in 0..3 {
        s.submit(serve_request(id, &long), &mut out);
    }
    s.step(&mut out);
    s.step(&mut out);
    let (used_before, _) = s.kv_blocks();
    assert!(used_before > 0);
    // Request 0 runs, request 2 waits (two running at most).
    out.clear();
    assert!(s.cancel(0, &mut out));
    assert!(s.cancel(2, &mut out));
    let ends: Vec<(u64, FinishKind)> = out
        .iter()
        .filter_map(|ev| match ev {
            ServeEvent::Finished { id, reason, .. } => Some((*id, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        ends,
        [(0, FinishKind::Cancelled), (2, FinishKind::Cancelled)]
    );
    let (used_after, _) = s.kv_blocks();
    assert!(
        used_after < used_before,
        "{used_after} of {used_before} blocks still held"
    );
    assert!(!s.cancel(0, &mut out), "already gone");
    assert!(!s.cancel(99, &mut out), "never submitted");
    // Request 1 decodes on to its length, then nothing is held.
    out.clear();
    while s.has_work() {
        s.step(&mut out);
    }
    let tokens = out
        .iter()
        .filter(|ev| matches!(ev, ServeEvent::Token { id: 1, .. }))
        .count();
    let end = out.iter().find_map(|ev| match ev {
        ServeEvent::Finished { id: 1, reason, .. } => Some(*reason),
        _ => None,
    });
    assert_eq!(end, Some(FinishKind::Length));
    assert!(tokens > 0 && tokens <= 20);
    assert_eq!(s.kv_blocks().0, 0);
}
