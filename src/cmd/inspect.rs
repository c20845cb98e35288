//! `ember inspect`: a GGUF file's metadata, tensors, quantization mix and size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use argh::FromArgs;

use ember_runtime::gguf::{GgufFile, Value};

#[derive(FromArgs)]
/// Show a GGUF file's metadata, tensors, quantization mix, parameter count and size.
#[argh(subcommand, name = "inspect")]
pub struct InspectArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(positional)]
    model: Option<PathBuf>,
    /// list every tensor
    #[argh(switch)]
    tensors: bool,
    /// machine-readable output
    #[argh(switch)]
    json: bool,
}

/// Per quant type: (tensors, elements, bytes).
type QuantMix<'a> = BTreeMap<&'a str, (u64, u64, u64)>;

pub fn run(a: InspectArgs) -> Result<()> {
    let path = crate::engine::model_path(a.model)?;
    let file = GgufFile::open(&path)?;
    let mut mix: QuantMix = Default::default();
    let mut n_params = 0u64;
    for t in &file.tensors {
        let e = mix.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.n_bytes;
        n_params += t.n_elements();
    }
    if a.json {
        print_json(&path, &file, &mix, n_params)
    } else {
        print_text(&path, &file, &mix, n_params, a.tensors);
        Ok(())
    }
}

fn print_json(path: &Path, file: &GgufFile, mix: &QuantMix, n_params: u64) -> Result<()> {
    let tensor_bytes: u64 = file.tensors.iter().map(|t| t.n_bytes).sum();
    let md: serde_json::Map<String, serde_json::Value> = file
        .metadata
        .iter()
        .map(|(k, v)| {
            let j = match v {
                Value::Array(arr) => {
                    serde_json::json!({"array_len": arr.len(), "type": v.type_name()})
                }
                Value::String(s) => serde_json::Value::String(s.clone()),
                Value::Bool(b) => serde_json::Value::Bool(*b),
                other => other
                    .as_f64()
                    .map(|f| serde_json::json!(f))
                    .unwrap_or(serde_json::Value::Null),
            };
            (k.to_string(), j)
        })
        .collect();
    let tensors: Vec<_> = file
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "dims": t.dims, "type": t.ty.name(), "bytes": t.n_bytes}))
        .collect();
    let quant: serde_json::Map<String, serde_json::Value> = mix
        .iter()
        .map(|(k, (n, el, b))| {
            (
                k.to_string(),
                serde_json::json!({"tensors": n, "elements": el, "bytes": b}),
            )
        })
        .collect();
    let out = serde_json::json!({
        "path": path, "version": file.version, "alignment": file.alignment,
        "file_bytes": file.file_len(), "tensor_bytes": tensor_bytes, "n_params": n_params,
        "n_tensors": file.tensors.len(), "quant_mix": quant, "metadata": md, "tensors": tensors,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn print_text(path: &Path, file: &GgufFile, mix: &QuantMix, n_params: u64, list_tensors: bool) {
    let tensor_bytes: u64 = file.tensors.iter().map(|t| t.n_bytes).sum();
    println!("file:       {}", path.display());
    println!(
        "gguf:       v{}, alignment {}, {} metadata keys, {} tensors",
        file.version,
        file.alignment,
        file.metadata.len(),
        file.tensors.len()
    );
    println!(
        "size:       {:.2} MB file, {:.2} MB tensor data",
        file.file_len() as f64 / 1e6,
        tensor_bytes as f64 / 1e6
    );
    println!(
        "parameters: {n_params} ({:.1} M), {:.3} bits/weight",
        n_params as f64 / 1e6,
        tensor_bytes as f64 * 8.0 / n_params as f64
    );
    println!("quant mix:");
    for (k, (n, el, b)) in mix {
        println!(
            "  {k:<6} {n:>4} tensors {:>12} weights {:>10.2} MB",
            el,
            *b as f64 / 1e6
        );
    }
    println!("metadata:");
    for (k, v) in file.metadata.iter() {
        println!("  {k} = {v}");
    }
    if list_tensors {
        println!("tensors:");
        for t in &file.tensors {
            println!(
                "  {:<40} {:<6} {:?} {} bytes",
                t.name,
                t.ty.name(),
                t.dims,
                t.n_bytes
            );
        }
    } else {
        println!("({} tensors; --tensors lists them)", file.tensors.len());
    }
}
