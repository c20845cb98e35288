//! `ember tokenize`: text to token ids.

use std::path::PathBuf;

use anyhow::{Context, Result};
use argh::FromArgs;

use ember_runtime::gguf::GgufFile;

#[derive(FromArgs)]
/// Tokenize text and print the token ids as a JSON array. Special-token text
/// such as <|im_start|> becomes the special token.
#[argh(subcommand, name = "tokenize")]
pub struct TokenizeArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// do not add BOS even if the model asks for it
    #[argh(switch)]
    no_bos: bool,
    /// treat special-token text as plain text
    #[argh(switch)]
    no_special: bool,
    /// the text
    #[argh(positional)]
    text: String,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let path = crate::engine::model_path(a.model)?;
    let file = GgufFile::open(&path)?;
    let tok = ember_runtime::tokenizer::Tokenizer::from_gguf(&file.metadata)
        .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
    let ids = tok.encode(&a.text, !a.no_bos && tok.add_bos_default(), !a.no_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
