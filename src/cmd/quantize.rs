//! `ember quantize`: re-encode a GGUF as one of llama.cpp's quantization mixes, writing the
//! bytes `llama-quantize` writes (the work is in `ember_runtime::gguf::quantize`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_runtime::gguf::GgufFile;
use ember_runtime::gguf::quantize::{self, FileType, Plan, PlannedTensor, Progress};

#[derive(FromArgs)]
/// Quantize a GGUF model to one of llama.cpp's mixes, writing the same file, byte for byte,
/// as `llama-quantize IN OUT TYPE` (llama.cpp 0c1e570, no importance matrix): the same type per
/// tensor (output projection at Q6_K, attn_v/ffn_down at more bits in the K mixes, fallbacks
/// where a row is not a whole number of blocks, norms and 1-D tensors kept), the metadata copied
/// with general.file_type set, the same tensor order and alignment. Quantize from an F16, BF16
/// or F32 file; from an already quantized one (Q8_0 is the least lossy) pass --allow-requantize.
///
/// TYPE (case-insensitive; Q3_K, Q4_K, Q5_K mean the _M mixes; llama.cpp's numeric ids work):
/// Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M, Q4_K_S, Q4_1, Q4_0, IQ4_XS, IQ4_NL, Q3_K_L,
/// Q3_K_M, Q3_K_S, Q2_K, F16, BF16, F32.
///
/// OUT is written as OUT.tmp and renamed when complete (an existing OUT is replaced, as
/// llama-quantize does; OUT may not be IN). Memory stays bounded: tensors are read, encoded and
/// written a slab of rows at a time.
#[argh(subcommand, name = "quantize")]
pub struct QuantizeArgs {
    /// allow re-encoding tensors that are already quantized: quality suffers compared to
    /// quantizing from 16 or 32 bits
    #[argh(switch)]
    allow_requantize: bool,
    /// worker threads (default: all cores); the output does not depend on it
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// no mix: every tensor that may be quantized gets TYPE's block type, or its fallback
    /// where a row is not a whole number of blocks (llama-quantize's --pure)
    #[argh(switch)]
    pure: bool,
    /// print the plan (each tensor's type and size) without writing a file
    #[argh(switch)]
    dry_run: bool,
    /// print only the summary, not one line per tensor
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// the GGUF to quantize
    #[argh(positional, arg_name = "IN")]
    input: PathBuf,
    /// where to write the quantized GGUF
    #[argh(positional, arg_name = "OUT")]
    output: PathBuf,
    /// the quantization mix
    #[argh(positional, arg_name = "TYPE")]
    ty: String,
}

fn valid_types() -> String {
    FileType::ALL
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let Some(ftype) = FileType::parse(&a.ty) else {
        bail!(
            "unknown quantization type '{}'; valid types: {} (Q3_K, Q4_K, Q5_K mean the _M mixes)",
            a.ty,
            valid_types()
        );
    };
    if a.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    refuse_same_file(&a.input, &a.output)?;
    let src = GgufFile::open(&a.input)?;
    let plan = quantize::plan_with(&src, ftype, a.pure)
        .with_context(|| format!("planning {} as {ftype}", a.input.display()))?;
    let requant: Vec<&PlannedTensor> = plan.requantized().collect();
    if !requant.is_empty() && a.allow_requantize {
        let mut from: Vec<&str> = requant.iter().map(|t| t.from.name()).collect();
        from.sort_unstable();
        from.dedup();
        eprintln!(
            "warning: requantizing {} already quantized tensor(s) ({}): quality will be worse \
             than quantizing from a 16 or 32-bit file",
            requant.len(),
            from.join(", ")
        );
    }
    if a.dry_run {
        quantize::check(&plan, true)?;
        for (i, t) in plan.tensors.iter().enumerate() {
            eprintln!("{}", tensor_line(i, &plan, t));
        }
        summary(&a.input, None, &plan, None);
        return Ok(());
    }
    quantize::check(&plan, a.allow_requantize)?;

    let total: u64 = plan.tensors.iter().map(PlannedTensor::n_elements).sum();
    let bar = super::progress_bar(
        total as usize,
        "quantizing [{bar:30}] {percent}%, {elapsed} elapsed, ETA {eta} {msg}",
    );
    let quiet = a.quiet;
    let n = plan.tensors.len();
    let on_progress = |p: Progress<'_>| match p {
        Progress::Elements(e) => bar.inc(e),
        Progress::TensorDone(i, t) => {
            if !quiet {
                bar.suspend(|| eprintln!("{}", tensor_line(i, &plan, t)));
            }
            if i + 1 < n {
                bar.set_message(plan.tensors[i + 1].name.clone());
            }
        }
    };
    let start = Instant::now();
    quantize::quantize_to_path(
        &src,
        &plan,
        a.allow_requantize,
        &a.output,
        a.threads,
        on_progress,
    )
    .with_context(|| format!("quantizing {} to {}", a.input.display(), a.output.display()))?;
    bar.finish_and_clear();
    summary(&a.input, Some(&a.output), &plan, Some(start.elapsed()));
    Ok(())
}

/// llama-quantize refuses to write over its input; so does ember (also through another path to
/// the same file).
fn refuse_same_file(input: &Path, output: &Path) -> Result<()> {
    if let (Ok(i), Ok(o)) = (std::fs::canonicalize(input), std::fs::canonicalize(output))
        && i == o
    {
        bail!(
            "{} is the input file; give another output path",
            output.display()
        );
    }
    Ok(())
}

const MIB: f64 = (1 << 20) as f64;

/// One line per tensor, as llama-quantize prints them.
fn tensor_line(i: usize, plan: &Plan, t: &PlannedTensor) -> String {
    let mut dims: Vec<String> = t.dims.iter().map(|d| format!("{d:6}")).collect();
    dims.resize(4, format!("{:6}", 1));
    let what = if t.converts() {
        format!(
            "converting to {:>6}{} .. size = {:8.2} MiB -> {:8.2} MiB",
            t.to.name(),
            if t.fallback { " (fallback)" } else { "" },
            t.src_bytes as f64 / MIB,
            t.out_bytes as f64 / MIB
        )
    } else {
        format!("size = {:8.3} MiB", t.src_bytes as f64 / MIB)
    };
    format!(
        "[{:4}/{:4}] {:36} - [{}], type = {:>6}, {what}",
        i + 1,
        plan.tensors.len(),
        t.name,
        dims.join(", "),
        t.from.name(),
    )
}

fn summary(input: &Path, output: Option<&Path>, plan: &Plan, took: Option<std::time::Duration>) {
    let (before, after) = plan.sizes();
    let elements: u64 = plan.tensors.iter().map(PlannedTensor::n_elements).sum();
    let bpw = |b: u64| b as f64 * 8.0 / elements.max(1) as f64;
    let converted = plan.tensors.iter().filter(|t| t.converts()).count();
    let dest = match output {
        Some(o) => format!("wrote {}", o.display()),
        None => "dry run, nothing written".to_string(),
    };
    eprintln!(
        "ember quantize: {} -> {} ({dest}): model size {:.2} MiB ({:.2} BPW) -> {:.2} MiB ({:.2} BPW), \
         {converted} of {} tensors re-encoded{}{}",
        input.display(),
        plan.ftype,
        before as f64 / MIB,
        bpw(before),
        after as f64 / MIB,
        bpw(after),
        plan.tensors.len(),
        if plan.n_fallback > 0 {
            format!(
                ", {} fell back to another type (rows not a whole number of blocks)",
                plan.n_fallback
            )
        } else {
            String::new()
        },
        took.map(|d| format!(", in {:.1} s", d.as_secs_f64()))
            .unwrap_or_default()
    );
}
