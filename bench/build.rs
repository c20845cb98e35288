//! Stamps the git commit this crate is built from, and whether the tree had uncommitted changes,
//! into `EMBER_GIT_COMMIT` (read by `provenance`): "<40 hex>", "<40 hex>-dirty", or "unknown"
//! when the source is not a git checkout (a source archive, a vendored copy). Reading it at run
//! time instead was wrong after a checkout and "unknown" on a board the binary was copied to.
//!
//! An explicit `EMBER_GIT_COMMIT` in the build environment wins (packagers, cross builds from
//! an exported tree).

use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=EMBER_GIT_COMMIT");
    if let Ok(c) = std::env::var("EMBER_GIT_COMMIT") {
        println!("cargo:rustc-env=EMBER_GIT_COMMIT={c}");
        return;
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest).join("..");
    let stamp = match git(&root, &["rev-parse", "HEAD"]) {
        Some(head) if !head.is_empty() => {
            // Tracked files that differ from HEAD (untracked ones do not change the build).
            let dirty = git(&root, &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}-dirty") } else { head }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=EMBER_GIT_COMMIT={stamp}");
    // Re-stamp when HEAD moves (commit, checkout) or the index changes, and when any source
    // of the workspace changes (which is what makes a tree dirty).
    if let Some(git_dir) = git(&root, &["rev-parse", "--absolute-git-dir"]) {
        let git_dir = Path::new(&git_dir);
        for f in ["HEAD", "index", "packed-refs"] {
            println!("cargo:rerun-if-changed={}", git_dir.join(f).display());
        }
        if let Some(head_ref) = git(&root, &["symbolic-ref", "-q", "HEAD"]) {
            println!(
                "cargo:rerun-if-changed={}",
                git_dir.join(head_ref).display()
            );
        }
    }
    for d in [
        "src",
        "../src",
        "../runtime",
        "../models",
        "../Cargo.toml",
        "../Cargo.lock",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(&manifest).join(d).display()
        );
    }
}
