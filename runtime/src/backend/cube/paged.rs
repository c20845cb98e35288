//! The attention half of a decoder layer on the device, reading the paged KV pools in place:
//!
//! * [`rope_store`]: q|k|v (one projection's output) → RoPE on q and k, k and v rounded to the
//!   cache's f16 precision and written into the pools at each row's slot, q rounded to f16 for
//!   the K·Q product (as llama.cpp's f16 cache has it); one launch;
//! * [`attention`]: causal attention of every row's query heads over its sequence's cached
//!   positions, found through the block table on the device (no gather, no copies), GQA by
//!   indexing; one launch.

use burn::tensor::DType;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;

use super::{GRID_X, UNITS, rotated, round_f16_value};

/// Largest head size [`attention`] takes (four dims per unit).
pub(crate) const MAX_HEAD_DIM: usize = 4 * UNITS as usize;

/// A unit per element of a q|k|v row (`q_dim + 2·kv_dim` wide). q's and k's first `n_rot` dims
/// of each head are rotated in pairs (adjacent, or halves when `neox`) with the row's angles
/// (`cos`, `sin`: `[rows, n_rot/2]`), as [`crate::backend::RopeShape::pair`]; q goes to `q_out`
/// at f16 precision; k and v, at f16 precision, to `kpool`/`vpool` row `slots[row]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn rope_store_kernel(
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    slots: &[u32],
    q_out: &mut [f32],
    kpool: &mut [f32],
    vpool: &mut [f32],
    total: u32,
    q_dim: u32,
    kv_dim: u32,
    head_dim: u32,
    n_rot: u32,
    #[comptime] neox: bool,
) {
    let i = ABSOLUTE_POS as u32;
    if i < total {
        let width = q_dim + 2 * kv_dim;
        let t = i / width;
        let c = i % width;
        let row0 = t * width;
        let half = n_rot / 2;
        let slot = slots[t as usize];
        if c < q_dim + kv_dim {
            // q or k: rotate. `cc` is the column within its section, `sec` where it starts.
            let mut sec = row0;
            let mut cc = c;
            if c >= q_dim {
                sec = row0 + q_dim;
                cc = c - q_dim;
            }
            let d = cc % head_dim;
            let mut v = qkv[(sec + cc) as usize];
            if d < 2 * half {
                v = rotated(qkv, cos, sin, sec + cc - d, d, t, half, neox);
            }
            if c < q_dim {
                q_out[(t * q_dim + c) as usize] = round_f16_value(v);
            } else {
                kpool[(slot * kv_dim + cc) as usize] = round_f16_value(v);
            }
        } else {
            let cc = c - q_dim - kv_dim;
            vpool[(slot * kv_dim + cc) as usize] = round_f16_value(qkv[i as usize]);
        }
    }
}

/// The attention heads of a layer, for [`rope_store`] and [`attention`]: `heads` query heads
/// of `head_dim` over `kv_heads` K/V heads (grouped-query), RoPE on the first `n_rot` dims of
/// each head (halves when `neox`, else adjacent pairs).
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub neox: bool,
}

impl HeadShape {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

fn arg(h: &cubecl::server::Handle, n: usize) -> BufferArg {
    // SAFETY: every handle passed here holds at least `n` four-byte elements (asserted or
    // allocated so by the callers).
    unsafe { BufferArg::from_raw_parts(h.clone(), n.max(1)) }
}

/// See [`rope_store_kernel`]: returns q (`[rows, q_dim]`, rotated, at f16 precision); k and v
/// are written into the pools (`[slots, kv_dim]` each) in place. `slots`: one u32 per row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_store(
    qkv: &CubeTensor,
    cos: &CubeTensor,
    sin: &CubeTensor,
    pt: &PassTables,
    kpool: &CubeTensor,
    vpool: &CubeTensor,
    s: HeadShape,
) -> CubeTensor {
    let (slots, pt_slots) = (&pt.slots, pt.slots_needed());
    let (q_dim, kv_dim) = (s.q_dim(), s.kv_dim());
    let width = q_dim + 2 * kv_dim;
    let n = qkv.meta.shape().num_elements();
    assert!(
        n.is_multiple_of(width),
        "rope_store: qkv must be [rows, q|k|v]"
    );
    let rows = n / width;
    let client = qkv.client.clone();
    let q = client.empty((rows * q_dim).max(1) * 4);
    if rows > 0 {
        let units = 64u32;
        let cubes = (n as u32).div_ceil(units);
        let pool_len = |p: &CubeTensor| p.meta.shape().num_elements();
        assert!(
            pool_len(kpool) >= pt_slots * kv_dim && pool_len(vpool) >= pt_slots * kv_dim,
            "rope_store: the pools are smaller than the block tables"
        );
        // SAFETY: unchecked indexing: every index is in bounds by construction (a unit per
        // element of qkv; angle rows per row; slots below `pt_slots`, asserted above).
        unsafe {
            rope_store_kernel::launch_unchecked(
                &client,
                CubeCount::Static(cubes.min(GRID_X), cubes.div_ceil(GRID_X), 1),
                CubeDim::new_1d(units),
                arg(&qkv.handle, n),
                arg(&cos.handle, cos.meta.shape().num_elements()),
                arg(&sin.handle, sin.meta.shape().num_elements()),
                arg(slots, rows),
                arg(&q, rows * q_dim),
                arg(&kpool.handle, pool_len(kpool)),
                arg(&vpool.handle, pool_len(vpool)),
                n as u32,
                q_dim as u32,
                kv_dim as u32,
                s.head_dim as u32,
                s.n_rot as u32,
                s.neox,
            )
        };
    }
    CubeTensor::new_contiguous(
        client,
        qkv.device.clone(),
        burn::tensor::Shape::new([rows, q_dim]),
        q,
        DType::F32,
    )
}

/// Exact softmax over each row's context, in the order the CPU path computes it: one cube per
/// (row, head). Pass 1: each unit scores positions `u, u + 64, …` (q·k over the head, times
/// `scale`), keeps them in `scores` and a running (max, Σexp) that the cube then combines. Pass
/// 2, 64 positions at a time: each unit turns its score into `f16(exp(s − max) / Σ)` (the CPU's
/// f16-rounded probability), and every unit adds the chunk's `p · v` to the head dims it owns,
/// position by position in order. Row `t` attends positions `0..n_ctx` of its sequence (or the
/// last `window` of them, when `window` > 0)
/// (`rowinfo[2t + 1]`), position `j` at slot `table[rowinfo[2t] + j / block]·block + j % block`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn attention_kernel(
    q: &[f32],
    kpool: &[f32],
    vpool: &[f32],
    table: &[u32],
    rowinfo: &[u32],
    scores: &mut [f32],
    out: &mut [f32],
    heads: u32,
    group: u32,
    head_dim: u32,
    kv_dim: u32,
    block: u32,
    max_ctx: u32,
    scale: f32,
    window: u32,
) {
    let h = CUBE_POS_X;
    let t = CUBE_POS_Y;
    let u = UNIT_POS;
    let kvh = h / group;
    let q_dim = heads * head_dim;
    let tab = rowinfo[(2 * t) as usize];
    let n = rowinfo[(2 * t + 1) as usize];
    // Under a sliding window (`window` > 0) the row sees positions `n − window .. n` only.
    let mut start = 0u32;
    if window > 0 && n > window {
        start = n - window;
    }
    let mut sq = Shared::<[f32]>::new_slice(256usize);
    let mut d = u;
    while d < head_dim {
        sq[d as usize] = q[(t * q_dim + h * head_dim + d) as usize];
        d += UNITS;
    }
    sync_cube();
    let sbase = ((t * heads + h) * max_ctx) as usize;
    let koff = kvh * head_dim;
    // A running max, from a large finite negative (never NaN in exp(mu − mn)). Written as a
    // literal then an update: CubeCL keeps a negated literal as a compile-time constant.
    let mut mu = 0.0f32;
    mu -= 1.0e30f32;
    let mut zu = 0.0f32;
    let mut j = start + u;
    while j < n {
        let slot = table[(tab + j / block) as usize] * block + j % block;
        let kb = (slot * kv_dim + koff) as usize;
        let mut s = 0.0f32;
        for dd in 0..head_dim as usize {
            s += sq[dd] * kpool[kb + dd];
        }
        s *= scale;
        scores[sbase + j as usize] = s;
        let mn = select(s > mu, s, mu);
        zu = zu * f32::exp(mu - mn) + f32::exp(s - mn);
        mu = mn;
        j += UNITS;
    }
    let mut sm = Shared::<[f32]>::new_slice(64usize);
    let mut sz = Shared::<[f32]>::new_slice(64usize);
    let ui = u as usize;
    sm[ui] = mu;
    sz[ui] = zu;
    sync_cube();
    let mut stride = 32usize;
    #[unroll]
    for _ in 0..6 {
        if ui < stride {
            let m1 = sm[ui];
            let m2 = sm[ui + stride];
            let mn = select(m2 > m1, m2, m1);
            sz[ui] = sz[ui] * f32::exp(m1 - mn) + sz[ui + stride] * f32::exp(m2 - mn);
            sm[ui] = mn;
        }
        sync_cube();
        stride /= 2;
    }
    let mx = sm[0];
    let inv = 1.0f32 / sz[0];
    let mut sp = Shared::<[f32]>::new_slice(64usize);
    let mut sslot = Shared::<[u32]>::new_slice(64usize);
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut a3 = 0.0f32;
    let voff = kvh * head_dim;
    let chunks = (n - start).div_ceil(UNITS);
    for c in 0..chunks {
        let jj = start + c * UNITS + u;
        let mut p = 0.0f32;
        let mut slot = 0u32;
        if jj < n {
            p = round_f16_value(f32::exp(scores[sbase + jj as usize] - mx) * inv);
            slot = table[(tab + jj / block) as usize] * block + jj % block;
        }
        sp[ui] = p;
        sslot[ui] = slot;
        sync_cube();
        let cnt = (n - start - c * UNITS).min(UNITS);
        for i in 0..cnt as usize {
            let pv = sp[i];
            let vb = sslot[i] * kv_dim + voff;
            if u < head_dim {
                a0 += pv * vpool[(vb + u) as usize];
            }
            if u + 64 < head_dim {
                a1 += pv * vpool[(vb + u + 64) as usize];
            }
            if u + 128 < head_dim {
                a2 += pv * vpool[(vb + u + 128) as usize];
            }
            if u + 192 < head_dim {
                a3 += pv * vpool[(vb + u + 192) as usize];
            }
        }
        sync_cube();
    }
    let ob = t * q_dim + h * head_dim + u;
    if u < head_dim {
        out[ob as usize] = a0;
    }
    if u + 64 < head_dim {
        out[(ob + 64) as usize] = a1;
    }
    if u + 128 < head_dim {
        out[(ob + 128) as usize] = a2;
    }
    if u + 192 < head_dim {
        out[(ob + 192) as usize] = a3;
    }
}

/// The block tables of one forward pass on the device: for [`attention`], each row's table
/// offset and context length; for [`rope_store`], each row's slot.
pub(crate) struct PassTables {
    pub(crate) table: cubecl::server::Handle,
    pub(crate) n_table: usize,
    pub(crate) rowinfo: cubecl::server::Handle,
    pub(crate) slots: cubecl::server::Handle,
    pub(crate) rows: usize,
    pub(crate) max_ctx: usize,
    pub(crate) block: usize,
    /// Pool slots the tables reach: (largest block id + 1) · block.
    slots_needed: usize,
}

impl PassTables {
    /// `tables`: the concatenated block tables; per row, `(offset into tables, n_ctx, slot)`.
    pub(crate) fn new(
        client: &cubecl::client::Client,
        tables: &[u32],
        rows: &[(u32, u32, u32)],
        block: usize,
    ) -> PassTables {
        let mut info = Vec::with_capacity(2 * rows.len());
        for r in rows {
            info.extend([r.0, r.1]);
        }
        let slots: Vec<u32> = rows.iter().map(|r| r.2).collect();
        // The kernels index without bounds checks: every row's table range and slot must lie
        // within what is uploaded.
        let slots_needed = tables
            .iter()
            .map(|&b| (b as usize + 1) * block)
            .max()
            .unwrap_or(0);
        for &(off, n, slot) in rows {
            assert!(
                off as usize + (n as usize).div_ceil(block) <= tables.len(),
                "PassTables: a row's context runs past its block table"
            );
            assert!(
                (slot as usize) < slots_needed,
                "PassTables: a row's slot lies outside its blocks"
            );
        }
        let up = |v: &[u32]| {
            if v.is_empty() {
                client.create_from_slice(u32::as_bytes(&[0u32]))
            } else {
                client.create_from_slice(u32::as_bytes(v))
            }
        };
        PassTables {
            table: up(tables),
            n_table: tables.len(),
            rowinfo: up(&info),
            slots: up(&slots),
            rows: rows.len(),
            max_ctx: rows.iter().map(|r| r.1 as usize).max().unwrap_or(0),
            block,
            slots_needed,
        }
    }

    /// Pool slots the tables reach.
    pub(crate) fn slots_needed(&self) -> usize {
        self.slots_needed
    }
}

/// See [`attention_kernel`]: `q` is `[rows, heads·head_dim]` (at f16 precision, as
/// [`rope_store`] leaves it); returns the attention output of the same shape.
pub(crate) fn attention(
    q: &CubeTensor,
    kpool: &CubeTensor,
    vpool: &CubeTensor,
    pt: &PassTables,
    s: HeadShape,
    window: Option<usize>,
) -> CubeTensor {
    assert!(
        s.head_dim <= MAX_HEAD_DIM,
        "attention: head size {} over {MAX_HEAD_DIM}",
        s.head_dim
    );
    let (q_dim, kv_dim, rows) = (s.q_dim(), s.kv_dim(), pt.rows);
    assert_eq!(
        q.meta.shape().num_elements(),
        rows * q_dim,
        "attention: q shape"
    );
    let client = q.client.clone();
    let out = client.empty((rows * q_dim).max(1) * 4);
    if rows > 0 {
        let n_scores = rows * s.heads * pt.max_ctx;
        let scores = client.empty(n_scores.max(1) * 4);
        let pool_len = |p: &CubeTensor| p.meta.shape().num_elements();
        assert!(
            pool_len(kpool) >= pt.slots_needed() * kv_dim
                && pool_len(vpool) >= pt.slots_needed() * kv_dim,
            "attention: the pools are smaller than the block tables"
        );
        // SAFETY: unchecked indexing: q and out are `rows × q_dim`; a row reads table entries
        // `off..off + ceil(n_ctx / block)` (checked by `PassTables::new`), slots below
        // `slots_needed` (asserted above), and scores below `rows · heads · max_ctx`.
        unsafe {
            attention_kernel::launch_unchecked(
                &client,
                CubeCount::Static(s.heads as u32, rows as u32, 1),
                CubeDim::new_1d(UNITS),
                arg(&q.handle, rows * q_dim),
                arg(&kpool.handle, pool_len(kpool)),
                arg(&vpool.handle, pool_len(vpool)),
                arg(&pt.table, pt.n_table),
                arg(&pt.rowinfo, 2 * rows),
                arg(&scores, n_scores),
                arg(&out, rows * q_dim),
                s.heads as u32,
                (s.heads / s.kv_heads) as u32,
                s.head_dim as u32,
                kv_dim as u32,
                pt.block as u32,
                pt.max_ctx as u32,
                1.0 / (s.head_dim as f32).sqrt(),
                window.map_or(0, |w| w.min(u32::MAX as usize) as u32),
            )
        };
    }
    CubeTensor::new_contiguous(
        client,
        q.device.clone(),
        burn::tensor::Shape::new([rows, q_dim]),
        out,
        DType::F32,
    )
}
