//! The `edit` preset's prompts for one model, written out so that another runtime (llama.cpp's
//! `llama-lookup`, in `bench/llama-lookup-compare.sh`) can be given the very same requests:
//! `cargo run -p ember-bench --example edit_prompts -- MODEL.gguf OUTDIR`
//!
//! Writes, for each shipped block in file order:
//! - `OUTDIR/NN-ID.txt`: the prompt as ember tokenizes it, i.e. the request through the model's
//!   chat template (no trailing newline added; special tokens as their text);
//! - a line of `OUTDIR/manifest.tsv`: `index id kind prompt_tokens block_tokens max_tokens file`,
//!   with ember's token counts and the output budget `ember bench -w edit` gives the request;
//! - a line of `OUTDIR/edit.jsonl`: the same request as a dataset entry (the user turn, which
//!   `ember bench --dataset` sends through the same template), for a run in file order.

use std::fmt::Write as _;
use std::path::PathBuf;

use ember_bench::workload::{SyntheticSpec, edit_blocks, edit_max_tokens, edit_prompts};
use ember_runtime::chat::ChatTemplate;
use ember_runtime::gguf::GgufFile;
use ember_runtime::tokenizer::Tokenizer;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(out)) = (args.next(), args.next()) else {
        eprintln!("usage: edit_prompts MODEL.gguf OUTDIR");
        std::process::exit(2);
    };
    let out = PathBuf::from(out);
    let file = GgufFile::open(&model).expect("open the model");
    let tok = Tokenizer::from_gguf(&file.metadata).expect("tokenizer");
    let tpl = ChatTemplate::from_metadata_or_builtin(&file.metadata).expect("chat template");
    let prompts = edit_prompts(&tok, Some(&tpl)).expect("edit prompts");
    let blocks = edit_blocks().expect("edit blocks");
    let cap = SyntheticSpec::preset("edit").expect("preset").output.max();
    std::fs::create_dir_all(&out).expect("create OUTDIR");
    let mut manifest =
        String::from("index\tid\tkind\tprompt_tokens\tblock_tokens\tmax_tokens\tfile\n");
    let mut jsonl = String::new();
    for (i, (p, b)) in prompts.iter().zip(&blocks).enumerate() {
        let name = format!("{i:02}-{}.txt", p.id);
        std::fs::write(out.join(&name), &p.text).expect("write a prompt");
        let m = edit_max_tokens(p, cap);
        writeln!(
            manifest,
            "{i}\t{}\t{}\t{}\t{}\t{m}\t{name}",
            p.id,
            p.kind,
            p.prompt_tokens.len(),
            p.block_tokens
        )
        .unwrap();
        let entry = serde_json::json!({
            "id": p.id, "prompt": b.prompt(), "max_tokens": m, "tags": ["edit", p.kind],
        });
        writeln!(jsonl, "{entry}").unwrap();
    }
    std::fs::write(out.join("manifest.tsv"), manifest).expect("write manifest.tsv");
    std::fs::write(out.join("edit.jsonl"), jsonl).expect("write edit.jsonl");
    eprintln!("{} prompts in {}", prompts.len(), out.display());
}
