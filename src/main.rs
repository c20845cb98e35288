//! `ember`: the command line. Parse, dispatch, print errors; each command lives in its own
//! file under `cmd/`, its flags (an argh struct) beside it.

use std::process::ExitCode;

use argh::FromArgs;

mod cmd;
mod engine;
mod serve;
mod target;

#[derive(FromArgs)]
/// ember: run quantized GGUF language models on this device, and measure them.
///
/// With no --model, commands use a tiny built-in model (written to the cache
/// directory on first use) so everything works without a download.
struct Cli {
    /// log more (also: RUST_LOG=debug)
    #[argh(switch, short = 'v')]
    verbose: bool,
    #[argh(subcommand)]
    cmd: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    Run(cmd::run::RunArgs),
    Tokenize(cmd::tokenize::TokenizeArgs),
    Inspect(cmd::inspect::InspectArgs),
    Bench(cmd::bench::BenchArgs),
    Compare(cmd::compare::CompareArgs),
    Eval(cmd::eval::EvalArgs),
    Report(cmd::report::ReportArgs),
    Export(cmd::export::ExportArgs),
    Selftest(cmd::selftest::SelftestArgs),
    Serve(cmd::serve::ServeArgs),
    Synth(cmd::synth::SynthArgs),
    Quantize(cmd::quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread is started.
    unsafe { ember_runtime::accel::quiet_headless_probe() };
    let cli: Cli = argh::from_env();
    let level = if cli.verbose { "debug" } else { "warn" };
    // wgpu's HAL logs failed probes of APIs that are not there (EGL without a GL driver) as
    // errors; ember reports the adapter it chose, or why none, itself. RUST_LOG overrides.
    let filter = format!("{level},wgpu_hal=off");
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format_timestamp(None)
        .init();
    let r = match cli.cmd {
        Command::Run(a) => cmd::run::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Selftest(a) => cmd::selftest::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, "outer: inner: ...", each message once: library errors
/// often quote their cause in their own message (SQLite's, the OS's), and printing the chain as
/// it is would repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}
