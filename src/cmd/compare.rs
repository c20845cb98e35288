//! `ember compare`: runs from store files side by side, and the regression gate.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

#[derive(FromArgs)]
/// Compare runs from store files side by side, matched by workload hash
/// (TTFT/ITL/TPOT percentiles, tokens/s, goodput, attainment, peak memory,
/// prefix hit rate, $/Mtok). Runs whose workload differs are flagged, never
/// compared; with two or more files and no workload in common it refuses.
/// Regression gate: ember compare --baseline A.db B.db --max-regression 5%
/// exits with status 3 when a figure got worse by more than 5% beyond the
/// run-to-run noise of the baseline's repeated runs.
#[argh(subcommand, name = "compare")]
pub struct CompareArgs {
    /// store files, or folders of .db files (default: --db or the default store)
    #[argh(positional)]
    dbs: Vec<PathBuf>,
    /// a store file (same as a positional; default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// the baseline store file: its runs are marked and the gate compares against them
    #[argh(option)]
    baseline: Option<PathBuf>,
    /// with --baseline: fail (exit 3) when a figure got worse by more than this, e.g. 5%
    #[argh(option)]
    max_regression: Option<String>,
    /// device cost for $/Mtok as LABEL=USD_PER_HOUR, LABEL a device profile, file name or backend (repeatable)
    #[argh(option)]
    cost: Vec<String>,
    /// also use runs that never finished (e.g. killed mid-run)
    #[argh(switch)]
    include_unfinished: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
    /// print CSV (one row per workload, column and figure)
    #[argh(switch)]
    csv: bool,
}

/// `--cost LABEL=USD_PER_HOUR`, each.
fn parse_costs(cost: &[String]) -> Result<Vec<(String, f64)>> {
    let mut costs = vec![];
    for c in cost {
        let (label, usd) = c
            .split_once('=')
            .with_context(|| format!("--cost '{c}': expected LABEL=USD_PER_HOUR"))?;
        let usd: f64 = usd
            .trim()
            .parse()
            .with_context(|| format!("--cost '{c}': '{usd}' is not a number"))?;
        costs.push((label.trim().to_string(), usd));
    }
    Ok(costs)
}

pub fn run(a: CompareArgs) -> Result<()> {
    use ember_bench::compare::{CompareOptions, compare, parse_fraction};
    if a.json && a.csv {
        bail!("give --json or --csv, not both");
    }
    let max_regression = a
        .max_regression
        .as_deref()
        .map(parse_fraction)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--max-regression: {e}"))?;
    if max_regression.is_some() && a.baseline.is_none() {
        bail!("--max-regression needs --baseline FILE");
    }
    let costs = parse_costs(&a.cost)?;
    let files = if a.dbs.is_empty() && a.db.is_none() && a.baseline.is_some() {
        bail!("give the store file(s) to compare against the baseline");
    } else {
        super::store_files(a.dbs, a.db)?
    };
    if let Some(b) = &a.baseline
        && !b.is_file()
    {
        bail!("{}: no such baseline store", b.display());
    }
    let opts = CompareOptions {
        baseline: a.baseline.clone(),
        max_regression,
        costs,
        include_unfinished: a.include_unfinished,
    };
    let cmp = compare(&files, &opts)?;
    let n_files = cmp.files.len();
    // Different workloads are not put side by side; quality figures (ember eval, --score) are
    // still shown per column (two models never share a workload hash).
    let has_quality =
        !cmp.quality.is_empty() || cmp.triangle().iter().any(|r| !r["accuracy"].is_null());
    if cmp.groups.is_empty() && !has_quality && n_files >= 2 {
        eprint!("{}", cmp.to_text());
        bail!(
            "no workload hash is shared by the {n_files} files: refusing to compare different workloads"
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&cmp.to_json())?);
    } else if a.csv {
        print!("{}", cmp.to_csv());
    } else {
        print!("{}", cmp.to_text());
    }
    if cmp.regressed() {
        std::io::stdout().flush().ok();
        eprintln!("ember compare: regression beyond --max-regression (see the gate table)");
        std::process::exit(3);
    }
    Ok(())
}
