//! `ember report`: one self-contained HTML report of the runs in store files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use argh::FromArgs;

#[derive(FromArgs)]
/// Write one self-contained HTML report (inline SVG plots, no network) of the
/// runs in store files: latency CDFs, ITL over time, sweeps, memory, devices.
#[argh(subcommand, name = "report")]
pub struct ReportArgs {
    /// store files, or folders of .db files (default: --db or the default store)
    #[argh(positional)]
    dbs: Vec<PathBuf>,
    /// a store file (same as a positional; default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// output HTML file (default ember-report.html)
    #[argh(option, short = 'o', default = "PathBuf::from(\"ember-report.html\")")]
    output: PathBuf,
    /// report title
    #[argh(option, default = "String::from(\"ember benchmark report\")")]
    title: String,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let files = super::store_files(a.dbs, a.db)?;
    let opts = ember_bench::report::ReportOptions {
        title: a.title,
        ..Default::default()
    };
    let html = ember_bench::report::render(&files, &opts)?;
    std::fs::write(&a.output, html).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("ember: wrote {}", a.output.display());
    Ok(())
}
