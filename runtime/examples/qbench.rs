//! Quant kernel micro-benchmark:
//! `cargo run -p ember-runtime --example qbench --profile dev [-- quick] [TYPE[:ROWSxCOLS]…]`
//!
//! m = 1 (decode): weight GB/s per ISA, 1 and 2 threads.
//! m > 1 (batched decode at m = 8, prefill): effective GFLOP/s (2·m·rows·cols / time), best ISA only (m ≤ 16 runs the
//! integer dot kernels, m > 16 the ISA-independent dequantize + gemm path); m = 4..16 only for
//! Q4_1. A `dequantize_row` line per matrix gives the single-thread dequantization rate.
//! `iters=N`: exactly N timed calls per line instead of a time budget (repeatable instruction
//! counts under `valgrind --tool=callgrind`).
//! `isa=NAME` (portable, avx2, avx512, neon): only that ISA, for every m. `m=1,8`: only those m.
//! `threads=1`: only the 1-thread pool (rayon's idle spinning makes 2-thread instruction counts
//! vary).
//! `cold`: every call reads a different copy of the weight (≥ 128 MiB of copies in all), so the
//! weights come from DRAM as in a decode step that walks the whole model, not from the cache.

use ember_runtime::quant::{
    GgmlType, Isa, QMatRef, available_isas, best_isa, dequantize_row, matmul_with, quantize,
};
use std::time::{Duration, Instant};

fn data(n: usize) -> Vec<f32> {
    let mut s = 0x1234_5678_9abc_def1u64;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * 0.1
        })
        .collect()
}

/// Best (minimum) seconds per call over repeated runs within `budget`, or over exactly
/// `fixed` runs when set (`iters=N`), so that instruction counts (callgrind) do not depend on
/// how fast the machine happened to be.
fn time(budget: Duration, fixed: Option<usize>, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut iters = 0;
    while match fixed {
        Some(n) => iters < n,
        None => iters < 5 || (start.elapsed() < budget && iters < 100_000),
    } {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        iters += 1;
    }
    best
}

/// The command line.
struct Opts {
    budget: Duration,
    fixed: Option<usize>,
    isa_only: Option<Isa>,
    ms: Vec<usize>,
    pools: Vec<(usize, rayon::ThreadPool)>,
    cold: bool,
    /// `TYPE` or `TYPE:ROWSxCOLS` arguments (e.g. `Q4_1:576x1536`); empty: every shape.
    filters: Vec<String>,
}

impl Opts {
    fn from_args() -> Opts {
        let quick = std::env::args().any(|a| a == "quick");
        let arg =
            |key: &str| std::env::args().find_map(|a| a.strip_prefix(key).map(str::to_string));
        let list = |key: &str, default: Vec<usize>| -> Vec<usize> {
            arg(key).map_or(default, |l| {
                l.split(',')
                    .map(|v| v.parse().unwrap_or_else(|_| panic!("{key}1,8,...")))
                    .collect()
            })
        };
        let pools = list("threads=", vec![1, 2])
            .into_iter()
            .map(|n| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap();
                (n, pool)
            })
            .collect();
        Opts {
            budget: Duration::from_millis(if quick { 60 } else { 250 }),
            fixed: arg("iters=").map(|n| n.parse().expect("iters=N")),
            isa_only: arg("isa=").map(|n| {
                available_isas()
                    .into_iter()
                    .find(|i| i.name() == n)
                    .unwrap_or_else(|| panic!("isa={n}: not available on this CPU"))
            }),
            ms: list("m=", vec![1, 4, 8, 16, 128, 512]),
            pools,
            cold: std::env::args().any(|a| a == "cold"),
            filters: std::env::args()
                .skip(1)
                .filter(|a| a != "quick" && a != "cold" && !a.contains('='))
                .collect(),
        }
    }

    fn wants(&self, ty: GgmlType, rows: usize, cols: usize) -> bool {
        let key = format!("{}:{rows}x{cols}", ty.name());
        self.filters.is_empty() || self.filters.iter().any(|f| key == *f || ty.name() == f)
    }
}

fn main() {
    let o = Opts::from_args();
    let shapes: &[(GgmlType, usize, usize, &str)] = &[
        (GgmlType::Q4_1, 576, 576, "attn q/o"),
        (GgmlType::Q4_1, 192, 576, "attn k/v"),
        (GgmlType::Q4_1, 1536, 576, "ffn gate/up"),
        (GgmlType::Q4_1, 576, 1536, "ffn down"),
        (GgmlType::Q8_0, 49152, 576, "lm head"),
        (GgmlType::Q4_K, 896, 4864, "ffn down"),
        (GgmlType::Q6_K, 896, 4864, "ffn down"),
        (GgmlType::Q5_0, 4864, 896, "ffn up"),
        (GgmlType::Q4_0, 4864, 896, "ffn up"),
        (GgmlType::Q8_0, 4864, 896, "ffn up"),
        (GgmlType::F16, 1536, 576, "ffn up"),
        (GgmlType::Q4_1, 32768, 2048, "big (DRAM)"),
    ];
    println!("isas: {:?}, best {:?}", available_isas(), best_isa());
    println!(
        "{:<6} {:>6}x{:<5} {:<12} {:>4} {:<9} {:>3}t  {:>10}  {:>9}",
        "type", "rows", "cols", "what", "m", "isa", "", "time", "rate"
    );
    for &(ty, rows, cols, what) in shapes {
        if o.wants(ty, rows, cols) {
            bench_shape(&o, ty, rows, cols, what);
        }
    }
}

/// The dequantize line, then the matmul lines of one weight shape.
fn bench_shape(o: &Opts, ty: GgmlType, rows: usize, cols: usize, what: &str) {
    let q = quantize(ty, &data(rows * cols)).unwrap();
    let w = QMatRef {
        ty,
        rows,
        cols,
        data: &q,
    };
    let copies: Vec<Vec<u8>> = if o.cold {
        vec![q.clone(); (128usize << 20).div_ceil(q.len())]
    } else {
        vec![]
    };
    let mut next = 0;
    let mut pick = || {
        if copies.is_empty() {
            return w;
        }
        next = (next + 1) % copies.len();
        QMatRef {
            data: &copies[next],
            ..w
        }
    };
    let mut row = vec![0f32; cols];
    let t = time(o.budget, o.fixed, || {
        for r in 0..rows {
            dequantize_row(w, r, &mut row);
        }
    });
    println!(
        "{:<6} {:>6}x{:<5} {:<12} dequantize_row, 1 thread: {:8.1}us  {:6.2} Gelem/s",
        ty.name(),
        rows,
        cols,
        what,
        t * 1e6,
        (rows * cols) as f64 / t / 1e9
    );
    for &m in &o.ms {
        // m = 8 (8 sequences decoding together) for every type and shape, the lm head
        // included; other m > 1 for Q4_1 and prefill sizes; no prefill on the big (lm head,
        // DRAM) shapes.
        let big = rows * cols > 8_000_000;
        if (m > 1 && m != 8 && big && (ty != GgmlType::Q4_1 || m > 16))
            || (m > 1 && m < 128 && m != 8 && ty != GgmlType::Q4_1)
        {
            continue; // lm head prefill: only the last token's logits are ever needed
        }
        let x = data(m * cols);
        let mut y = vec![0f32; m * rows];
        let isas = if let Some(i) = o.isa_only {
            vec![i]
        } else if m == 1 {
            available_isas()
        } else {
            vec![best_isa()]
        };
        for &isa in &isas {
            for (nt, pool) in &o.pools {
                let t = pool.install(|| {
                    time(o.budget, o.fixed, || {
                        matmul_with(isa, pick(), &x, m, &mut y)
                    })
                });
                let rate = if m == 1 {
                    format!("{:6.1} GB/s", q.len() as f64 / t / 1e9)
                } else {
                    format!("{:6.1} GFLOP/s", 2.0 * (m * rows * cols) as f64 / t / 1e9)
                };
                println!(
                    "{:<6} {:>6}x{:<5} {:<12} {:>4} {:<9} {:>3}t  {:>8.1}us  {}",
                    ty.name(),
                    rows,
                    cols,
                    what,
                    m,
                    isa_name(isa),
                    nt,
                    t * 1e6,
                    rate
                );
            }
        }
    }
}

fn isa_name(i: Isa) -> &'static str {
    i.name()
}
