//! The matmul driver: quantizes the activation rows to the weight type's vec_dot_type (as
//! llama.cpp does for every batch size) and runs the integer tile kernels; float weights run f32
//! dots on activations rounded to the weight's precision (F16/BF16), via `gemm` for large m.
//! Output rows are split across the current rayon pool.

use super::blocks::BlockFormat;
use super::kernels::{MAX_C, MAX_R, QAct, QRow, Tiles, portable_tiles, round_activations};
use super::reference::dequantize_block;
use super::{GgmlType, Isa, QMatRef};
use rayon::prelude::*;
use std::cell::RefCell;

/// Float weights with more activation rows than this go through the `gemm` crate.
pub(crate) const MAX_DOT_M: usize = 16;

/// Below this many multiply-adds (rows·cols·m) a call stays on the calling thread: waking the
/// rayon pool costs a few µs, more than a small matvec takes.
const PAR_MIN_MACS: usize = 1 << 18;

/// Target f32 elements per dequantized weight tile in the gemm path (~512 KiB, within L2).
const TILE_ELEMS: usize = 1 << 17;

/// Target bytes of quantized activations walked per pass over a task's weight rows (L2-sized).
const ACT_CHUNK_BYTES: usize = 1 << 17;

thread_local! {
    static TILE_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: tasks sharing a SyncPtr only write disjoint elements of a buffer that outlives them
// (each call blocks until its rayon tasks finish).
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn tiles_for(isa: Isa, ty: GgmlType) -> Tiles {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::x86::avx2::tiles(ty),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => super::x86::avx512::tiles(ty),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => super::neon::tiles(ty),
        _ => portable_tiles(ty),
    }
}

fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `y[m × rows] = x[m × cols] · Wᵀ` on the best ISA for this CPU, on the current rayon pool.
pub fn matmul(w: QMatRef<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_with(super::best_isa(), w, x, m, y)
}

/// As [`matmul`], forcing the kernels of `isa` (panics if this CPU cannot run it).
/// `Isa::Portable` uses no explicit SIMD in the dot kernels. Quantized weights use the same
/// activation quantization and integer block dots on every ISA and for every `m`; float weights
/// use f32 dots (the `gemm` crate, with its own CPU dispatch, for `m > 16`).
pub fn matmul_with(isa: Isa, w: QMatRef<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    assert!(
        isa.is_available(),
        "matmul_with: ISA {isa:?} not available on this CPU"
    );
    if let Err(e) = w.validate() {
        panic!("matmul: bad weight matrix: {e}");
    }
    assert_eq!(x.len(), m * w.cols, "matmul: x must be m × cols");
    assert_eq!(y.len(), m * w.rows, "matmul: y must be m × rows");
    if m == 0 || w.rows == 0 {
        return;
    }
    if w.cols == 0 {
        y.fill(0.0);
        return;
    }
    if is_float(w.ty) {
        let rounded = round_activations(w.ty, x);
        let x = rounded.as_deref().unwrap_or(x);
        if m > MAX_DOT_M {
            gemm_path(w, x, m, y);
        } else {
            float_dot_path(w, x, m, y);
        }
    } else {
        q_dot_path(isa, w, x, m, y);
    }
}

/// Run `f` over `rows` split into contiguous ranges whose starts are multiples of `align`, in
/// parallel when `macs` is large enough.
fn for_row_chunks(rows: usize, macs: usize, align: usize, f: impl Fn(usize, usize) + Sync) {
    let nt = rayon::current_num_threads();
    let groups = rows.div_ceil(align);
    if nt <= 1 || macs < PAR_MIN_MACS || groups < 2 {
        f(0, rows);
        return;
    }
    // A few chunks per thread lets work stealing even out a descheduled thread.
    let n = (nt * 4).min(groups);
    (0..n).into_par_iter().for_each(|c| {
        let (r0, r1) = row_chunk(c, n, rows, align);
        f(r0, r1)
    });
}

/// Chunk `c` of `n` over `rows`, split into ranges whose starts are multiples of `align`.
fn row_chunk(c: usize, n: usize, rows: usize, align: usize) -> (usize, usize) {
    let groups = rows.div_ceil(align);
    let r0 = (c * groups / n * align).min(rows);
    let r1 = ((c + 1) * groups / n * align).min(rows);
    (r0, r1)
}

fn q_dot_path(isa: Isa, w: QMatRef<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_many_with(isa, &[w], x, m, &mut [y]);
}

/// Output rows `r0..r1` of `w` for all activation rows `xr`, tile by tile, into `y` (m × rows).
///
/// # Safety
/// `t`'s kernels must run on this CPU and match `w.ty`; each `xr` row must be the activation
/// format of `w.ty` with `w.cols` elements; `y` must point to `xr.len() × w.rows` floats of
/// which no other thread writes rows `r0..r1`.
unsafe fn run_rows(t: &Tiles, w: QMatRef<'_>, xr: &[QRow<'_>], r0: usize, r1: usize, y: SyncPtr) {
    let (rows, cols, m) = (w.rows, w.cols, xr.len());
    let rb = w.row_bytes();
    assert!((1..=MAX_R).contains(&t.rmax) && (1..=MAX_C).contains(&t.cmax));
    // Activation rows per pass: an L2-sized slab, a whole number of column tiles.
    let mchunk = (ACT_CHUNK_BYTES / cols).max(t.cmax) / t.cmax * t.cmax;
    let mut out = [0f32; MAX_R * MAX_C];
    for c0 in (0..m).step_by(mchunk) {
        let c1 = m.min(c0 + mchunk);
        let mut r = r0;
        while r < r1 {
            let nr = if r1 - r >= t.rmax { t.rmax } else { 1 };
            let fam = if nr == t.rmax { &t.big } else { &t.one };
            let wr = &w.data[r * rb..(r + nr) * rb];
            let mut c = c0;
            while c < c1 {
                let nc = t.cmax.min(c1 - c);
                let o = &mut out[..nr * nc];
                // SAFETY: per this function's contract; `wr` is `nr` whole rows of `w.ty`
                // blocks. The kernel asserts its (R, C).
                unsafe { fam[nc - 1](wr, rb, &xr[c..c + nc], o) };
                for i in 0..nr {
                    for j in 0..nc {
                        // SAFETY: c + j < m and r + i < rows, so the index is inside y (len
                        // m·rows); this task alone writes rows r0..r1.
                        unsafe { *y.get().add((c + j) * rows + r + i) = o[i * nc + j] };
                    }
                }
                c += nc;
            }
            r += nr;
        }
    }
}

/// Several weights that read the same input (q/k/v, gate/up): `ys[i] = x · W_iᵀ`.
///
/// Quantized weights with the same activation format share one quantization of `x`, and the
/// rows of all of them run in one parallel section (one fork/join instead of one per weight).
/// Every output element is bit-identical to what [`matmul`] gives for that weight alone.
pub fn matmul_many(ws: &[QMatRef<'_>], x: &[f32], m: usize, ys: &mut [&mut [f32]]) {
    matmul_many_with(super::best_isa(), ws, x, m, ys)
}

/// [`matmul_many`] on the kernels of `isa` (available on this CPU); also the quantized path of
/// [`matmul_with`], as a single weight.
fn matmul_many_with(isa: Isa, ws: &[QMatRef<'_>], x: &[f32], m: usize, ys: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), ys.len(), "matmul_many: one output per weight");
    struct Job<'a> {
        w: QMatRef<'a>,
        t: Tiles,
        act: usize,
        y: SyncPtr,
    }
    let mut acts: Vec<QAct> = Vec::new();
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for (w, y) in ws.iter().zip(ys.iter_mut()) {
        if is_float(w.ty) || m == 0 || w.rows == 0 || w.cols == 0 {
            matmul_with(isa, *w, x, m, y);
            continue;
        }
        if let Err(e) = w.validate() {
            panic!("matmul: bad weight matrix: {e}");
        }
        assert_eq!(x.len(), m * w.cols, "matmul: x must be m × cols");
        assert_eq!(y.len(), m * w.rows, "matmul: y must be m × rows");
        let kind = BlockFormat::expect(w.ty).act;
        let act = match acts.iter().position(|a| a.kind == kind) {
            Some(i) => i,
            None => {
                acts.push(QAct::quantize(kind, x, w.cols));
                acts.len() - 1
            }
        };
        jobs.push(Job {
            w: *w,
            t: tiles_for(isa, w.ty),
            act,
            y: SyncPtr(y.as_mut_ptr()),
        });
    }
    let xrs: Vec<Vec<QRow<'_>>> = acts
        .iter()
        .map(|a| (0..m).map(|i| a.row(i)).collect())
        .collect();
    let macs: Vec<usize> = jobs.iter().map(|j| j.w.rows * j.w.cols * m).collect();
    let total: usize = macs.iter().sum();
    let nt = rayon::current_num_threads();
    // SAFETY (both branches): each job's tiles belong to `isa`, available on this CPU; its
    // activation rows are `x` quantized for its type; its output is m × rows and each
    // (job, row range) unit is run by one task only.
    if nt <= 1 || total < PAR_MIN_MACS {
        for j in &jobs {
            unsafe { run_rows(&j.t, j.w, &xrs[j.act], 0, j.w.rows, j.y) };
        }
        return;
    }
    // Units of contiguous rows, a few per thread, spread over the jobs by their work.
    let mut units = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        let groups = j.w.rows.div_ceil(j.t.rmax);
        let n = (nt * 4 * macs[ji]).div_ceil(total).clamp(1, groups);
        for c in 0..n {
            let (r0, r1) = row_chunk(c, n, j.w.rows, j.t.rmax);
            units.push((ji, r0, r1));
        }
    }
    units.into_par_iter().for_each(|(ji, r0, r1)| {
        let j = &jobs[ji];
        unsafe { run_rows(&j.t, j.w, &xrs[j.act], r0, r1, j.y) };
    });
}

/// Dot of `n` f32s with 8 independent accumulators (vectorizes without fast-math).
#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (p, q) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += p[k] * q[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn float_dot_path(w: QMatRef<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let rb = w.row_bytes();
    let yp = SyncPtr(y.as_mut_ptr());
    for_row_chunks(rows, rows * cols * m, 1, |r0, r1| {
        TILE_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < cols {
                buf.resize(cols, 0.0);
            }
            let row = &mut buf[..cols];
            for r in r0..r1 {
                dequant_row_fast(w.ty, &w.data[r * rb..(r + 1) * rb], row);
                for i in 0..m {
                    let v = dot_f32(row, &x[i * cols..(i + 1) * cols]);
                    // SAFETY: i < m, r < rows; each (i, r) written by one task only.
                    unsafe { *yp.get().add(i * rows + r) = v };
                }
            }
        })
    });
}

fn gemm_path(w: QMatRef<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let rb = w.row_bytes();
    let nt = rayon::current_num_threads();
    let parallel = nt > 1 && rows * cols * m >= PAR_MIN_MACS;
    // The tiles depend on the shape only, never on the thread count: gemm's blocking, and so
    // its summation order, can depend on a call's width, so a row must land in a call of the
    // same width whatever the pool (1 and 2 threads gave different bits on aarch64 when the
    // tile followed the thread count). About 16 tiles (of at least 16 rows) where the rows
    // allow, so a pool of up to 16 threads shares the work, and more where a tile's dequantized
    // rows would outgrow TILE_ELEMS (L2-sized).
    let cache_tile = (TILE_ELEMS / cols).clamp(16, 1024) / 16 * 16;
    let tile = cache_tile.min(rows.div_ceil(16).div_ceil(16).max(1) * 16);
    let ntiles = rows.div_ceil(tile);
    let yp = SyncPtr(y.as_mut_ptr());
    // F32 weights that are f32-aligned can be fed to gemm in place.
    let direct = w.ty == GgmlType::F32 && (w.data.as_ptr() as usize).is_multiple_of(4);
    let run_tile = |t: usize| {
        let r0 = t * tile;
        let r1 = rows.min(r0 + tile);
        let n = r1 - r0;
        let go = |rhs: *const f32| {
            // SAFETY: dst = y[.., r0..r1] (m × n, row stride rows) is inside y and written only
            // by this tile; lhs = x (m × cols, row-major) and rhs = the n weight rows
            // (cols × n with column stride cols) are valid reads of the stated extents.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    cols,
                    yp.get().add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    rhs,
                    cols as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        if direct {
            // SAFETY: rows r0..r1 of an aligned F32 matrix are n·cols f32 inside `w.data`.
            go(unsafe { w.data.as_ptr().add(r0 * rb) } as *const f32);
        } else {
            TILE_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < n * cols {
                    buf.resize(n * cols, 0.0);
                }
                for (k, r) in (r0..r1).enumerate() {
                    dequant_row_fast(
                        w.ty,
                        &w.data[r * rb..(r + 1) * rb],
                        &mut buf[k * cols..(k + 1) * cols],
                    );
                }
                go(buf.as_ptr());
            })
        }
    };
    if parallel && ntiles > 1 {
        (0..ntiles).into_par_iter().for_each(run_tile);
    } else {
        (0..ntiles).for_each(run_tile);
    }
}

/// Dequantize one row (`src` = its block bytes) with the type match hoisted out of the loop.
pub(crate) fn dequant_row_fast(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    macro_rules! rows {
        ($($t:ident),*) => {
            match ty {
                GgmlType::F32 => {
                    for (s, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
                        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    }
                }
                GgmlType::BF16 => {
                    for (s, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
                        *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                    }
                }
                GgmlType::F16 => {
                    use half::slice::HalfFloatSliceExt;
                    let mut tmp = [half::f16::ZERO; 256];
                    for (s, d) in src.chunks(512).zip(dst.chunks_mut(256)) {
                        let t = &mut tmp[..d.len()];
                        for (h, b) in t.iter_mut().zip(s.chunks_exact(2)) {
                            *h = half::f16::from_le_bytes([b[0], b[1]]);
                        }
                        t.convert_to_f32_slice(d);
                    }
                }
                $(GgmlType::$t => {
                    let (bb, bl) = (GgmlType::$t.block_bytes(), GgmlType::$t.block_len());
                    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bl)) {
                        dequantize_block(GgmlType::$t, b, y);
                    }
                })*
                _ => panic!("dequantize_row: unsupported type {ty}"),
            }
        };
    }
    assert_eq!(
        Some(src.len()),
        ty.row_bytes(dst.len()),
        "dequant_row: lengths"
    );
    rows!(
        Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS
    );
}
