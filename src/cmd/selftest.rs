//! `ember selftest`: is this device healthy, and what can it do?

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use argh::FromArgs;

#[derive(FromArgs)]
/// Check this device: kernel parity on every ISA against the portable and an
/// f64 reference, block-format round trips, the dense ops, an exact-token golden
/// decode of the embedded model, that the weights stay in the mmap, memory
/// bandwidth and matmul FLOP/s, a short benchmark and the decode roofline.
/// One row per check, also written to the results store. Exit status 0 only
/// when every check passes.
#[argh(subcommand, name = "selftest")]
pub struct SelftestArgs {
    /// GGUF model for the model-dependent checks (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// device profile (targets/NAME.toml, built in; or a .toml path): threads, budget, nominal bandwidth
    #[argh(option)]
    target: Option<String>,
    /// worker threads (default: the profile's, else all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// results store to write the rows to (default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// do not write to the results store
    #[argh(switch)]
    no_db: bool,
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
}

pub fn run(a: SelftestArgs) -> Result<()> {
    use ember_bench::selftest;
    let profile = a
        .target
        .as_deref()
        .map(ember_bench::profile::DeviceProfile::resolve)
        .transpose()?;
    let opts = selftest::Options {
        model: a.model.clone(),
        threads: a.threads,
        profile,
        fault: std::env::var(selftest::FAULT_ENV).ok(),
        ..Default::default()
    };
    if let Some(f) = &opts.fault {
        eprintln!(
            "ember selftest: {}={f}: fault injection is on, a parity check will fail on purpose",
            selftest::FAULT_ENV
        );
    }
    let json = a.json;
    let report = selftest::run(&opts, |c| {
        if !json {
            eprintln!("  {:<4} {}", c.status(), c.name);
        }
    })?;
    if !a.no_db {
        let db =
            a.db.clone()
                .unwrap_or_else(ember_bench::store::default_db_path);
        let mut store = ember_bench::store::Store::open(&db)?;
        let run = report.save(&mut store)?;
        eprintln!(
            "ember selftest: wrote {} rows to {} (run {})",
            report.checks.len(),
            db.display(),
            run.0
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_table());
    }
    let failed = report.failed();
    if !failed.is_empty() {
        std::io::stdout().flush().ok();
        for c in &failed {
            eprintln!("ember selftest: FAILED {}: {}", c.name, c.message);
        }
        bail!(
            "{} of {} self-test checks failed",
            failed.len(),
            report.checks.len()
        );
    }
    Ok(())
}
