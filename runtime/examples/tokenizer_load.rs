//! How long building a tokenizer from GGUF metadata takes, and how fast it encodes (a measurement, not a test: on a
//! shared machine it moves with the neighbours' load):
//! `cargo run --release -p ember-runtime --example tokenizer_load [-- FILE.gguf…]`
//!
//! Without arguments: the two real models in `$EMBER_MODELS` or `models/cache`. Prints the best
//! and the median of 5 builds per file, and the time per 1000 vocabulary entries.

use std::path::PathBuf;
use std::time::Instant;

use ember_runtime::gguf::GgufFile;
use ember_runtime::tokenizer::Tokenizer;

fn main() {
    let mut files: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if files.is_empty() {
        let dir = std::env::var_os("EMBER_MODELS").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/cache"),
            PathBuf::from,
        );
        files = [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "gemma-3-270m-q4_k_m.gguf",
        ]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    }
    for path in files {
        let f = match GgufFile::open(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{}: {e} (run models/fetch.sh)", path.display());
                std::process::exit(1);
            }
        };
        let mut ms = vec![];
        let mut vocab = 0;
        for _ in 0..5 {
            let t0 = Instant::now();
            let tok = Tokenizer::from_gguf(&f.metadata).expect("tokenizer");
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            vocab = tok.vocab_size();
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "{}: {vocab} tokens, from_gguf best {:.1} ms, median {:.1} ms ({:.3} ms per 1000 tokens)",
            path.file_name().unwrap().to_string_lossy(),
            ms[0],
            ms[2],
            ms[0] / vocab as f64 * 1e3
        );
        // Encoding speed: the bench corpus (English prose, code, Unicode) ten times over.
        let text = include_str!("../../bench/data/corpus.txt").repeat(10);
        let tok = Tokenizer::from_gguf(&f.metadata).expect("tokenizer");
        let mut best = f64::MAX;
        let mut n = 0;
        for _ in 0..5 {
            let t0 = Instant::now();
            n = tok.encode(&text, false, false).expect("encode").len();
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "  encode: {} bytes -> {n} tokens, best {:.1} ms ({:.2} MB/s, {:.0} k tokens/s)",
            text.len(),
            best * 1e3,
            text.len() as f64 / best / 1e6,
            n as f64 / best / 1e3
        );
    }
}
