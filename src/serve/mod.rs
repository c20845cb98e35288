//! `ember serve`: an OpenAI-compatible HTTP server on the batching scheduler.
//!
//! Three kinds of threads: the engine thread ([`worker`]) owns the [`Scheduler`] and is the
//! only one that runs the model; a tokio runtime runs the HTTP side ([`http`], axum on hyper),
//! which parses and checks requests and talks to the engine thread over channels; the results
//! store's thread commits every finished request to SQLite in its own transaction
//! ([`LiveRun`]), so a slow disk never stalls decoding and a crash loses only what was in
//! flight.
//!
//! [`Scheduler`]: ember_runtime::scheduler::Scheduler

pub mod http;
pub mod metrics;
pub mod openai;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use ember_bench::live::LiveRun;
use ember_bench::record::{RequestRecord, RunResult};
use ember_bench::store::Store;
use ember_runtime::chat::ChatTemplate;
use ember_runtime::engine::Engine;
use ember_runtime::scheduler::SchedulerConfig;
use ember_runtime::spec::SpecConfig;

use http::App;
use metrics::Metrics;
use worker::{Command, Worker};

/// Everything `ember serve` decided before it listens.
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub model_id: String,
    pub aliases: Vec<String>,
    pub api_key: Option<String>,
    pub scheduler: SchedulerConfig,
    /// Speculative decoding (`--lookup`, `--draft`), checked.
    pub spec: Option<SpecConfig>,
    /// The draft model (`--draft`).
    pub draft: Option<Engine>,
    pub max_queue: usize,
    pub body_limit: usize,
    pub body_timeout: Duration,
}

/// The run in the results store that served requests are written to.
pub struct Recording {
    pub store: Store,
    pub head: RunResult,
}

/// Serve until Ctrl-C or SIGTERM, then drain: stop accepting, finish the requests in flight
/// (a second signal cancels them), commit the store, return.
pub fn serve(engine: Engine, cfg: ServeConfig, rec: Option<Recording>) -> Result<()> {
    // The engine lives as long as the process: the HTTP handlers (which must be 'static) and
    // the engine thread share it by reference.
    let engine: &'static Engine = Box::leak(Box::new(engine));
    let draft: Option<&'static Engine> = cfg.draft.map(|d| &*Box::leak(Box::new(d)));
    let spec = cfg.spec.clone();
    let origin = Instant::now();
    let metrics = Arc::new(Metrics::new(&cfg.model_id));

    // The store: the run's row now (a store that cannot be written stops us before we
    // listen), then each finished request from the engine thread.
    let (rec_tx, recorder) = match rec {
        Some(Recording { mut store, head }) => {
            let live = LiveRun::begin(&mut store, &head)
                .context("starting the serve run in the results store")?;
            let (tx, rx) = std::sync::mpsc::channel::<RequestRecord>();
            let h = std::thread::Builder::new()
                .name("ember-store".into())
                .spawn(move || {
                    let mut live = live;
                    let mut n = 0usize;
                    for r in rx {
                        live.record(&r);
                        n += 1;
                    }
                    (store, live, head, n)
                })?;
            (Some(tx), Some(h))
        }
        None => (None, None),
    };

    let layout = engine.model.kv_layout(cfg.scheduler.block_size.max(1));
    let kv_blocks = layout
        .blocks_for_budget(cfg.scheduler.kv_budget_bytes)
        .max(1);
    let power = ember_bench::power::discover(&ember_bench::power::sysfs_root());
    match &power.source {
        Some(s) => eprintln!(
            "ember serve: power: reading {} with each memory sample",
            s.name
        ),
        None => log::info!("ember serve: no power sensor found"),
    }
    for n in &power.notes {
        eprintln!("ember serve: power: {n}");
    }
    let power = power.source;
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
    // The engine thread claims the KV budget first and says whether it could, before we listen.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let worker = {
        let (metrics, sched) = (metrics.clone(), cfg.scheduler.clone());
        std::thread::Builder::new()
            .name("ember-engine".into())
            .spawn(move || {
                match Worker::new(
                    engine,
                    sched,
                    spec.map(|s| (s, draft)),
                    metrics,
                    origin,
                    rec_tx,
                    power,
                ) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        w.run(cmd_rx)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        worker::Served {
                            memory: Vec::new(),
                            power_source: None,
                            power_error: None,
                        }
                    }
                }
            })?
    };
    if let Ok(Err(e)) = ready_rx.recv() {
        anyhow::bail!("{e}");
    }

    let template =
        ChatTemplate::from_metadata_or_builtin(&engine.file.metadata).map_err(|e| e.to_string());
    if let Err(e) = &template {
        eprintln!(
            "ember serve: the model's chat template does not parse ({e}); /v1/chat/completions will answer 500"
        );
    }
    let app = Arc::new(App {
        engine,
        template,
        model_id: cfg.model_id.clone(),
        aliases: cfg.aliases.clone(),
        api_key: cfg.api_key.clone(),
        cmd: cmd_tx.clone(),
        metrics,
        inflight: AtomicUsize::new(0),
        max_queue: cfg.max_queue.max(1),
        body_limit: cfg.body_limit,
        body_timeout: cfg.body_timeout,
        next_id: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        kv_blocks,
        block_size: cfg.scheduler.block_size.max(1),
        started: openai::created(),
    });

    // The HTTP side needs little CPU; the engine's threads get the cores.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ember-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.addr))?;
        let addr = listener.local_addr()?;
        // Signal handlers before the address is out: a SIGTERM from whoever read it must drain,
        // not kill.
        let mut signals = Signals::new()?;
        eprintln!(
            "ember serve: model '{}' (ctx {}, KV budget {} blocks of {}), listening on http://{addr}",
            cfg.model_id,
            engine.cfg.n_ctx,
            kv_blocks,
            app.block_size
        );
        let shutdown = {
            let app = app.clone();
            async move {
                signals.recv().await;
                app.draining.store(true, Ordering::SeqCst);
                eprintln!(
                    "ember serve: draining: finishing {} request(s) in flight (again to cancel them)",
                    app.inflight.load(Ordering::SeqCst)
                );
                let app2 = app.clone();
                tokio::spawn(async move {
                    signals.recv().await;
                    eprintln!("ember serve: cancelling the requests in flight");
                    let _ = app2.cmd.send(Command::CancelAll);
                });
            }
        };
        accept_loop(listener, http::router(app.clone()), cfg.body_timeout, shutdown).await;
        anyhow::Ok(())
    });
    let _ = cmd_tx.send(Command::Shutdown);
    drop(cmd_tx);
    drop(app);
    // Open connections may still hold the app; the runtime's end drops them.
    rt.shutdown_timeout(Duration::from_secs(1));
    let measured = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    if let Some(h) = recorder {
        let (mut store, live, head, n) = h
            .join()
            .map_err(|_| anyhow::anyhow!("the results store's thread panicked"))?;
        let result = RunResult {
            memory: measured.memory,
            power_source: measured.power_source,
            power_error: measured.power_error,
            summary_json: serde_json::json!({"serve": {"requests": n}}).to_string(),
            ..head
        };
        live.finish(&mut store, &result)
            .context("the results store did not get every served request")?;
        eprintln!(
            "ember serve: {n} request(s) saved to {}",
            store.path().display()
        );
    }
    served
}

/// Accept connections until `shutdown`, then drain: stop accepting, let each connection
/// finish the request it is in (idle ones close), return when all have. Each connection is
/// HTTP/1 (hyper) with a header read timeout: axum's own `serve` sets none, so a client
/// trickling its headers would hold a connection, and the drain, forever.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use futures_util::future::{Either, select};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accept = std::pin::pin!(listener.accept());
        match select(accept, shutdown.as_mut()).await {
            Either::Left((Ok((stream, _)), _)) => {
                // Each SSE chunk goes out when written, not when Nagle's algorithm decides.
                let _ = stream.set_nodelay(true);
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(header_timeout);
                let conn = b.serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(router.clone()),
                );
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        log::debug!("connection: {e}");
                    }
                });
            }
            Either::Left((Err(e), _)) => {
                // Out of file descriptors and the like: say so, breathe, go on.
                log::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Either::Right(((), _)) => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Ctrl-C or SIGTERM, listened for from the moment this is made.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let term = std::pin::pin!(self.term.recv());
            let int = std::pin::pin!(self.int.recv());
            futures_util::future::select(term, int).await;
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
