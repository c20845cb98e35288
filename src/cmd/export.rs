//! `ember export`: runs or requests from store files as CSV, JSON or markdown.

use std::path::PathBuf;

use anyhow::{Context, Result};
use argh::FromArgs;

#[derive(FromArgs)]
/// Export runs from store files as CSV, JSON, or a llama-bench-style markdown
/// table (md); or every request's latencies (--what requests).
#[argh(subcommand, name = "export")]
pub struct ExportArgs {
    /// store files, or folders of .db files (default: --db or the default store)
    #[argh(positional)]
    dbs: Vec<PathBuf>,
    /// a store file (same as a positional; default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// csv, json or md (default csv)
    #[argh(option, short = 'f', default = "String::from(\"csv\")")]
    format: String,
    /// runs or requests (default runs)
    #[argh(option, default = "String::from(\"runs\")")]
    what: String,
    /// write here instead of stdout
    #[argh(option, short = 'o')]
    output: Option<PathBuf>,
}

pub fn run(a: ExportArgs) -> Result<()> {
    use ember_bench::export::{Format, What, export};
    let format: Format = a
        .format
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--format: {e}"))?;
    let what: What = a
        .what
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--what: {e}"))?;
    let files = super::store_files(a.dbs, a.db)?;
    let out = export(&files, what, format)?;
    match &a.output {
        Some(p) => std::fs::write(p, out).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{out}"),
    }
    Ok(())
}
