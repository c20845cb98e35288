//! One module per command, each with its flags (an argh struct) and a `run` function; the
//! helpers the store-reading commands share are here.

use std::path::PathBuf;

use anyhow::{Context, Result};

pub mod bench;
pub mod compare;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod quantize;
pub mod report;
pub mod run;
pub mod selftest;
pub mod serve;
pub mod synth;
pub mod tokenize;

/// The store files a reading command works on: the positionals and --db (folders expand to
/// their .db files), else the default store.
fn store_files(dbs: Vec<PathBuf>, db: Option<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut all = dbs;
    all.extend(db);
    if all.is_empty() {
        all.push(ember_bench::store::default_db_path());
    }
    Ok(ember_bench::store::expand_db_args(&all)?)
}

/// A progress bar of `len` steps drawn by `template` (indicatif's syntax) on stderr; hidden
/// when stderr is not a terminal.
fn progress_bar(len: usize, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    bar
}

/// The results store for `bench`: none with --no-db, else --db, $EMBER_DB or the default path.
fn open_store(no_db: bool, db: Option<&PathBuf>) -> Result<Option<ember_bench::store::Store>> {
    if no_db {
        return Ok(None);
    }
    let path = db
        .cloned()
        .unwrap_or_else(ember_bench::store::default_db_path);
    // The store's errors name the file.
    let store = ember_bench::store::Store::open(&path).context("opening the results store")?;
    Ok(Some(store))
}
