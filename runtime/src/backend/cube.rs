//! The CubeCL (wgpu) arm of [`super::QuantOps`].
//!
//! One kernel, `qmm`, computes `y[m × rows] = x[m × cols] · Wᵀ` for every repacked layout
//! ([`CodeKind`] is a compile-time parameter, so each layout gets its own specialised shader):
//!
//! * a cube (workgroup) of [`UNITS`] units covers 64 / `lanes` output rows and a tile of
//!   [`TILE`] input rows (one at m = 1: decode does not compute its row four times); `lanes`, a
//!   power of two from 8 to 64, is about a quarter of the row's code words, so short rows get
//!   several rows per cube and fewer reduction rounds; cubes are laid out on a 2-D grid so that
//!   vocabularies over 65,535 rows fit;
//! * each unit walks its row's code words with a stride of `lanes` words (a unit per row walks
//!   it a weight group at a time, with one `(scale, offset)` fetch per group), decodes the 8, 4
//!   or 2 codes of a word, and accumulates the tile's dot products;
//! * a shared-memory tree reduction finishes the sums. The single-row tile does exactly what the
//!   first row of the four-row tile does, so a sequence's logits do not depend on the batch.
//!
//! Decode (m = 1) reads every weight byte once, which is what bounds decode on any device.

use burn::backend::DispatchDevice;
use burn::tensor::DType;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeDevice, kernel::into_contiguous};

use super::{HandleError, QWeightHandle};

pub(crate) mod paged;
use crate::quant::GgmlType;
use crate::quant::repack::{CodeKind, repack};

/// Units per cube.
pub const UNITS: u32 = 64;
/// Input rows per cube.
pub const TILE: u32 = 4;
/// Cubes per grid row (under the 65,535 limit of every API).
const GRID_X: u32 = 32_768;

/// A weight in device memory: its rows in one or more parts, each within the adapter's largest
/// buffer (a 151,936-row vocabulary at Q8_0 is 136 MB; many adapters bind at most 128 MiB).
pub(crate) struct DevWeight {
    device: CubeDevice,
    parts: Vec<Part>,
    kind: CodeKind,
    group: usize,
    bytes: usize,
}

/// Rows `row0..row0 + rows` of a weight, as their own code and parameter buffers.
#[derive(Clone)]
struct Part {
    codes: cubecl::server::Handle,
    params: cubecl::server::Handle,
    n_codes: usize,
    n_params: usize,
    rows: usize,
}

impl std::fmt::Debug for DevWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevWeight({:?}, group {}, {} bytes)",
            self.kind, self.group, self.bytes
        )
    }
}

fn kind_id(k: CodeKind) -> u32 {
    match k {
        CodeKind::U4 => 0,
        CodeKind::U8 => 1,
        CodeKind::F16 => 2,
        CodeKind::Bf16 => 3,
        CodeKind::F32 => 4,
    }
}

struct Bound {
    parts: Vec<Part>,
    kind: CodeKind,
    group: usize,
}

fn bind(w: &QWeightHandle, device: &CubeDevice) -> Result<(Bound, usize, bool), HandleError> {
    let mut slot = w.gpu.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = slot.as_ref()
        && d.device == *device
    {
        let b = Bound {
            parts: d.parts.clone(),
            kind: d.kind,
            group: d.group,
        };
        return Ok((b, d.bytes, false));
    }
    let r = repack(w.mat())?;
    if r.kind == CodeKind::F16 || r.kind == CodeKind::Bf16 {
        // Two codes per word must not straddle rows: the kernel walks whole words per row.
        if !w.cols.is_multiple_of(2) {
            return Err(HandleError::Device(format!(
                "{} matrix with an odd column count ({})",
                w.ty, w.cols
            )));
        }
    }
    let client = device.client();
    let limit = client.properties().memory.max_page_size as usize;
    // Split by rows into parts that fit one buffer. A row's words, and its parameter groups
    // when a group never straddles rows, are contiguous, so a part is a plain slice of both.
    let rows = w.rows.max(1);
    let words = r.codes.len() / rows;
    let per_row_params = r.params.len() / rows;
    let splittable = r.params.is_empty() || (r.group > 0 && w.cols.is_multiple_of(r.group));
    let rows_per_part = (limit / (4 * words.max(1))).min(rows);
    if rows_per_part == 0 || (rows_per_part < rows && !splittable) {
        return Err(HandleError::Device(format!(
            "{} × {} {} weight needs a {}-byte buffer; the adapter allows {limit}",
            w.rows,
            w.cols,
            w.ty,
            4 * r.codes.len()
        )));
    }
    let mut parts = vec![];
    for row0 in (0..rows).step_by(rows_per_part) {
        let n = rows_per_part.min(rows - row0);
        let codes = &r.codes[row0 * words..(row0 + n) * words];
        // A zero-length binding is not allowed; raw float layouts get one unused word.
        let params_v: Vec<f32> = if r.params.is_empty() {
            vec![0f32]
        } else if rows_per_part == rows {
            r.params.clone()
        } else {
            r.params[row0 * per_row_params..(row0 + n) * per_row_params].to_vec()
        };
        parts.push(Part {
            codes: client.create_from_slice(u32::as_bytes(codes)),
            params: client.create_from_slice(f32::as_bytes(&params_v)),
            n_codes: codes.len(),
            n_params: params_v.len(),
            rows: n,
        });
    }
    let bytes = r.bytes();
    let d = DevWeight {
        device: device.clone(),
        parts: parts.clone(),
        kind: r.kind,
        group: r.group,
        bytes,
    };
    let b = Bound {
        parts,
        kind: d.kind,
        group: d.group,
    };
    *slot = Some(d);
    Ok((b, bytes, true))
}

/// Upload `w` to `device` (once); the device bytes it takes.
pub(crate) fn prepare(w: &QWeightHandle, device: &CubeDevice) -> Result<usize, HandleError> {
    bind(w, device).map(|(_, bytes, _)| bytes)
}

// Kernel code assigns a default, then overwrites it in every branch.
#[allow(unused_assignments)]
#[cube]
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1F;
    let mant = h & 0x3FF;
    let mut out = 0.0f32;
    if exp == 0 {
        // Zero or subnormal: mant · 2^-24.
        out = f32::cast_from(mant) * 5.960_464_5e-8f32;
        if sign != 0 {
            out = -out;
        }
    } else if exp == 31 {
        out = f32::reinterpret(sign | 0x7F80_0000u32 | (mant << 13));
    } else {
        out = f32::reinterpret(sign | ((exp + 112) << 23) | (mant << 13));
    }
    out
}

/// Round to the nearest f16 value (ties to even), kept in f32: subnormal f16 values are
/// multiples of 2^-24, normal ones keep 10 mantissa bits, and overflow goes to ±inf.
#[allow(unused_assignments)]
#[cube]
fn round_f16_value(x: f32) -> f32 {
    let a = x.abs();
    let mut out = x;
    if a < 6.103_515_6e-5f32 {
        out = (x * 16_777_216.0f32).round() * 5.960_464_5e-8f32;
    } else if a >= 65_520.0f32 {
        let bits = u32::reinterpret(x);
        out = f32::reinterpret((bits & 0x8000_0000u32) | 0x7F80_0000u32);
    } else {
        let bits = u32::reinterpret(x);
        let lsb = (bits >> 13) & 1;
        out = f32::reinterpret((bits + 0xFFFu32 + lsb) & 0xFFFF_E000u32);
    }
    out
}

#[cube(launch)]
fn round_f16_kernel(x: &[f32], y: &mut [f32], n: u32) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        y[i] = round_f16_value(x[i]);
    }
}

/// Round half away from zero (C `roundf`).
#[cube]
fn round_away(v: f32) -> f32 {
    let r = (v.abs() + 0.5f32).floor();
    select(v < 0.0f32, -r, r)
}

/// Where the activations an [`act_kernel`] rounds come from.
pub(crate) mod src {
    /// The rows of `x` as they are.
    pub const PLAIN: u32 = 0;
    /// The rows of `x` RMS-normalised, times `w` (as [`super::rmsnorm_kernel`] computes them).
    pub const NORM: u32 = 1;
    /// `silu(gate) · up` of a `[m, 2·cols]` gate|up output (as [`super::silu_mul_kernel`]).
    pub const SILU: u32 = 2;
}

/// Element `c` of row `row` of the activation source `src` (see [`src`]).
#[allow(unused_assignments)]
#[cube]
fn src_value(
    x: &[f32],
    w: &[f32],
    row: usize,
    c: usize,
    cols: usize,
    inv: f32,
    #[comptime] src: u32,
) -> f32 {
    let mut v = 0.0f32;
    if comptime![src == 0] {
        v = x[row * cols + c];
    } else if comptime![src == 1] {
        v = x[row * cols + c] * inv * w[c];
    } else {
        let g = x[row * 2 * cols + c];
        v = g / (1.0f32 + f32::exp(-g)) * x[row * 2 * cols + cols + c];
    }
    v
}

/// The activation rounding ember's CPU kernels (and llama.cpp) apply before their integer dots,
/// of the rows of a source (see [`src`]: a plain tensor, an RMSNorm fused in, or SiLU·mul fused
/// in), one cube per row. For quantized weights (`act` 0: Q8_0/Q8_1 blocks of 32 with an f16
/// scale; `act` 1: Q8_K blocks of 256 with an f32 scale) it writes the integer quants `q`, four
/// to a word (element `4i + k` is byte `k` of word `i`, two's complement), the block scales
/// `dx` and, for `act` 0, `sx = f16(d·Σq)` (Q8_1's sum term). For float weights it writes each
/// value rounded to f16 (`act` 2) or bf16 (3), or as it is (4), as f32 bits in `q`. A unit
/// rounds whole blocks. Packing the quants quarters the loads the matmul issues for them: a
/// software adapter such as Mesa 22's lavapipe runs every storage-buffer load as a loop over
/// its SIMD lanes.
#[allow(unused_assignments)]
#[cube(launch_unchecked)]
fn act_kernel(
    x: &[f32],
    w: &[f32],
    q: &mut [u32],
    dx: &mut [f32],
    sx: &mut [f32],
    rows: u32,
    cols: u32,
    eps: f32,
    #[comptime] src: u32,
    #[comptime] act: u32,
    #[comptime] block: u32,
) {
    // No early return before the barriers (uniformity): a cube past the last row redoes
    // row `rows - 1` and writes nothing.
    let r_cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let row = r_cube.min(rows - 1) as usize;
    let ncols = cols as usize;
    let mut inv = 1.0f32;
    if comptime![src == 1] {
        let u = UNIT_POS as usize;
        let mut acc = 0.0f32;
        let mut c = UNIT_POS;
        while c < cols {
            let v = x[row * ncols + c as usize];
            acc += v * v;
            c += UNITS;
        }
        let mut sm = Shared::<[f32]>::new_slice(64usize);
        sm[u] = acc;
        sync_cube();
        let mut stride = 32usize;
        #[unroll]
        for _ in 0..6 {
            if u < stride {
                sm[u] += sm[u + stride];
            }
            sync_cube();
            stride /= 2;
        }
        inv = 1.0f32 / f32::sqrt(sm[0] / f32::cast_from(cols) + eps);
    }
    if r_cube < rows {
        let nb = cols / block;
        let mut b = UNIT_POS;
        while b < nb {
            let c0 = (b * block) as usize;
            let base = row * ncols + c0;
            let ob = row * nb as usize + b as usize;
            if comptime![act == 0] {
                let mut amax = 0.0f32;
                for j in 0..block as usize {
                    amax = amax.max(src_value(x, w, row, c0 + j, ncols, inv, src).abs());
                }
                let d = amax / 127.0f32;
                let mut id = 0.0f32;
                if d != 0.0f32 {
                    id = 1.0f32 / d;
                }
                let mut sum = 0.0f32;
                let mut j = 0usize;
                while j < block as usize {
                    let mut word = 0u32;
                    #[unroll]
                    for k in 0..4u32 {
                        let v = round_away(
                            src_value(x, w, row, c0 + j + k as usize, ncols, inv, src) * id,
                        );
                        sum += v;
                        word |= (u32::cast_from(i32::cast_from(v)) & 0xFF) << (8 * k);
                    }
                    q[(base + j) / 4] = word;
                    j += 4;
                }
                dx[ob] = round_f16_value(d);
                sx[ob] = round_f16_value(d * sum);
            } else if comptime![act == 1] {
                let mut amax = 0.0f32;
                let mut max = 0.0f32;
                for j in 0..block as usize {
                    let v = src_value(x, w, row, c0 + j, ncols, inv, src);
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0f32 {
                    let mut j = 0usize;
                    while j < block as usize {
                        q[(base + j) / 4] = 0u32;
                        j += 4;
                    }
                    dx[ob] = 0.0f32;
                } else {
                    let iscale = -127.0f32 / max;
                    let mut j = 0usize;
                    while j < block as usize {
                        let mut word = 0u32;
                        #[unroll]
                        for k in 0..4u32 {
                            // ggml's nearest_int: ties to even (WGSL round), clamped at 127.
                            let v = src_value(x, w, row, c0 + j + k as usize, ncols, inv, src);
                            let qv = (iscale * v).round().min(127.0f32);
                            word |= (u32::cast_from(i32::cast_from(qv)) & 0xFF) << (8 * k);
                        }
                        q[(base + j) / 4] = word;
                        j += 4;
                    }
                    dx[ob] = 1.0f32 / iscale;
                }
            } else if comptime![act == 2] {
                q[base] =
                    u32::reinterpret(round_f16_value(src_value(x, w, row, c0, ncols, inv, src)));
            } else if comptime![act == 3] {
                // bf16: round to nearest even on the top 16 bits.
                let bits = u32::reinterpret(src_value(x, w, row, c0, ncols, inv, src));
                let lsb = (bits >> 16) & 1;
                q[base] = (bits + 0x7FFFu32 + lsb) & 0xFFFF_0000u32;
            } else {
                q[base] = u32::reinterpret(src_value(x, w, row, c0, ncols, inv, src));
            }
            b += UNITS;
        }
    }
}

/// Code `k` of a packed word, as an exact f32 integer. Converted as a signed integer (the same
/// value below 256): x86 before AVX-512 has no unsigned-to-float instruction, so an unsigned
/// conversion costs a software adapter several instructions per code there.
#[allow(unused_assignments)]
#[cube]
fn code_of(word: u32, k: u32, #[comptime] kind: u32) -> f32 {
    let mut c = 0.0f32;
    if comptime![kind == 0] {
        c = f32::cast_from(i32::cast_from((word >> (4 * k)) & 0xF));
    } else {
        c = f32::cast_from(i32::cast_from((word >> (8 * k)) & 0xFF));
    }
    c
}

#[allow(unused_assignments)]
#[cube]
fn decode(word: u32, k: u32, scale: f32, offset: f32, #[comptime] kind: u32) -> f32 {
    let mut v = 0.0f32;
    if comptime![kind == 0] {
        v = f32::cast_from((word >> (4 * k)) & 0xF) * scale + offset;
    } else if comptime![kind == 1] {
        v = f32::cast_from((word >> (8 * k)) & 0xFF) * scale + offset;
    } else if comptime![kind == 2] {
        v = f16_bits_to_f32((word >> (16 * k)) & 0xFFFF);
    } else if comptime![kind == 3] {
        v = f32::reinterpret(((word >> (16 * k)) & 0xFFFF) << 16);
    } else {
        v = f32::reinterpret(word);
    }
    v
}

/// The second packed activation word of a code word's elements from flat element `e` (a
/// multiple of 4) when it has eight (4-bit codes), else 0 (not loaded).
#[allow(unused_assignments)]
#[cube]
fn act_hi(xq: &[u32], e: usize, #[comptime] per_word: u32) -> u32 {
    let mut w = 0u32;
    if comptime![per_word == 8] {
        w = xq[e / 4 + 1];
    }
    w
}

/// Element `k` (0..8) of two packed activation words (see [`act_kernel`]), as an exact f32
/// integer: its byte moved to the top, then shifted down arithmetically.
#[cube]
fn act_of(w0: u32, w1: u32, #[comptime] k: u32) -> f32 {
    let w = if comptime![k < 4] { w0 } else { w1 };
    let b = comptime![k % 4];
    f32::cast_from(i32::cast_from(w << (24 - 8 * b)) >> 24i32)
}

/// Integer mode (quantized weights, 4- or 8-bit codes): per code word, `Σ (code − zp) · q` over
/// its 8 or 4 elements is exact in f32 (|terms| ≤ 255·127), then scaled by `scale · dx` as the
/// CPU kernels scale their integer block sums; affine types add their min term from `sx` (Q8_1,
/// once per 32-block) or from `offset · dx · Σq` (Q8_K). Float mode (f16, bf16, f32 weights)
/// multiplies decoded weights by the rounded activations.
///
/// With `lanes` units on a row (a hardware GPU), unit `lane` takes words `lane, lane + lanes,
/// …`: neighbouring units read neighbouring words. With a unit per row (`lanes` 1, a software
/// adapter), the unit walks its row a weight group at a time and fetches each group's
/// `(scale, offset)` once rather than once per word (a gather per fetch on a CPU's SIMD lanes);
/// the float operations, and so the sums, are the same as a word at a time.
///
/// Row `r` of one weight (decoded as `spec` says, see [`seg_spec`]) against up to four
/// activation rows starting at flat offsets `x0..x3`; with `rows4`, rows `r..r + 4` against
/// `x0` (each activation value is loaded once for the four rows; per row the arithmetic is the
/// single-row code's, in the same order). This unit's partial sums go to `sm[u]`, `sm[64 + u]`,
/// `sm[128 + u]`, `sm[192 + u]`.
#[allow(clippy::too_many_arguments)]
#[cube]
fn row_dot(
    codes: &[u32],
    params: &[f32],
    xq: &[u32],
    dx: &[f32],
    sx: &[f32],
    sm: &mut Shared<[f32]>,
    r: u32,
    lane: u32,
    x0: usize,
    x1: usize,
    x2: usize,
    x3: usize,
    cols: u32,
    #[comptime] spec: u32,
    #[comptime] act_block: u32,
    #[comptime] tile4: bool,
    #[comptime] lanes: u32,
    #[comptime] rows4: bool,
) {
    let kind = comptime![spec & 0xF];
    let zp = comptime![(spec >> 4) & 0xFF];
    let affine = comptime![(spec >> 12) & 1 == 1];
    let q81 = comptime![(spec >> 13) & 1 == 1];
    let group = comptime![spec >> 16];
    let per_word = comptime![match kind {
        0 => 8u32,
        1 => 4u32,
        2 | 3 => 2u32,
        _ => 1u32,
    }];
    let words = cols / per_word;
    let row_word = r as usize * words as usize;
    let zpf = f32::cast_from(zp);
    let ab = act_block as usize;
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut a3 = 0.0f32;
    if comptime![kind <= 1 && rows4] {
        // Rows r..r + 4 against one activation row (decode) or four (`tile4`), a group at a
        // time: the four rows' code words are loaded once for the four activation rows, and
        // each activation word once for the four rows. `aTK`: activation row T, weight row K.
        let wpg = comptime![group / per_word];
        let n_groups = cols / group;
        let wrow = words as usize;
        let grow = n_groups as usize;
        let mut a00 = 0.0f32;
        let mut a01 = 0.0f32;
        let mut a02 = 0.0f32;
        let mut a03 = 0.0f32;
        let mut a10 = 0.0f32;
        let mut a11 = 0.0f32;
        let mut a12 = 0.0f32;
        let mut a13 = 0.0f32;
        let mut a20 = 0.0f32;
        let mut a21 = 0.0f32;
        let mut a22 = 0.0f32;
        let mut a23 = 0.0f32;
        let mut a30 = 0.0f32;
        let mut a31 = 0.0f32;
        let mut a32 = 0.0f32;
        let mut a33 = 0.0f32;
        let mut gi = 0u32;
        while gi < n_groups {
            let g0 = r as usize * grow + gi as usize;
            let (sc0, sc1) = (params[2 * g0], params[2 * (g0 + grow)]);
            let (sc2, sc3) = (params[2 * (g0 + 2 * grow)], params[2 * (g0 + 3 * grow)]);
            let (of0, of1) = (params[2 * g0 + 1], params[2 * (g0 + grow) + 1]);
            let (of2, of3) = (
                params[2 * (g0 + 2 * grow) + 1],
                params[2 * (g0 + 3 * grow) + 1],
            );
            // A group lies in one activation block: one scale per activation row.
            let cg = (gi * group) as usize;
            let e0 = dx[(x0 + cg) / ab];
            let mut e1 = 0.0f32;
            let mut e2 = 0.0f32;
            let mut e3 = 0.0f32;
            if comptime![tile4] {
                e1 = dx[(x1 + cg) / ab];
                e2 = dx[(x2 + cg) / ab];
                e3 = dx[(x3 + cg) / ab];
            }
            #[unroll]
            for j in 0..wpg {
                let wi = row_word + (gi * wpg + j) as usize;
                let (w0, w1) = (codes[wi], codes[wi + wrow]);
                let (w2, w3) = (codes[wi + 2 * wrow], codes[wi + 3 * wrow]);
                let c0 = ((gi * wpg + j) * per_word) as usize;
                let qa0 = xq[(x0 + c0) / 4];
                let qb0 = act_hi(xq, x0 + c0, per_word);
                let mut qa1 = 0u32;
                let mut qb1 = 0u32;
                let mut qa2 = 0u32;
                let mut qb2 = 0u32;
                let mut qa3 = 0u32;
                let mut qb3 = 0u32;
                if comptime![tile4] {
                    qa1 = xq[(x1 + c0) / 4];
                    qb1 = act_hi(xq, x1 + c0, per_word);
                    qa2 = xq[(x2 + c0) / 4];
                    qb2 = act_hi(xq, x2 + c0, per_word);
                    qa3 = xq[(x3 + c0) / 4];
                    qb3 = act_hi(xq, x3 + c0, per_word);
                }
                let mut i00 = 0.0f32;
                let mut i01 = 0.0f32;
                let mut i02 = 0.0f32;
                let mut i03 = 0.0f32;
                let mut i10 = 0.0f32;
                let mut i11 = 0.0f32;
                let mut i12 = 0.0f32;
                let mut i13 = 0.0f32;
                let mut i20 = 0.0f32;
                let mut i21 = 0.0f32;
                let mut i22 = 0.0f32;
                let mut i23 = 0.0f32;
                let mut i30 = 0.0f32;
                let mut i31 = 0.0f32;
                let mut i32 = 0.0f32;
                let mut i33 = 0.0f32;
                let mut s0 = 0.0f32;
                let mut s1 = 0.0f32;
                let mut s2 = 0.0f32;
                let mut s3 = 0.0f32;
                #[unroll]
                for k in 0..per_word {
                    let v0 = code_of(w0, k, kind) - zpf;
                    let v1 = code_of(w1, k, kind) - zpf;
                    let v2 = code_of(w2, k, kind) - zpf;
                    let v3 = code_of(w3, k, kind) - zpf;
                    let q0 = act_of(qa0, qb0, k);
                    i00 += v0 * q0;
                    i01 += v1 * q0;
                    i02 += v2 * q0;
                    i03 += v3 * q0;
                    if comptime![affine && !q81] {
                        s0 += q0;
                    }
                    if comptime![tile4] {
                        let q1 = act_of(qa1, qb1, k);
                        i10 += v0 * q1;
                        i11 += v1 * q1;
                        i12 += v2 * q1;
                        i13 += v3 * q1;
                        if comptime![affine && !q81] {
                            s1 += q1;
                        }
                        let q2 = act_of(qa2, qb2, k);
                        i20 += v0 * q2;
                        i21 += v1 * q2;
                        i22 += v2 * q2;
                        i23 += v3 * q2;
                        if comptime![affine && !q81] {
                            s2 += q2;
                        }
                        let q3 = act_of(qa3, qb3, k);
                        i30 += v0 * q3;
                        i31 += v1 * q3;
                        i32 += v2 * q3;
                        i33 += v3 * q3;
                        if comptime![affine && !q81] {
                            s3 += q3;
                        }
                    }
                }
                a00 += sc0 * e0 * i00;
                a01 += sc1 * e0 * i01;
                a02 += sc2 * e0 * i02;
                a03 += sc3 * e0 * i03;
                if comptime![tile4] {
                    a10 += sc0 * e1 * i10;
                    a11 += sc1 * e1 * i11;
                    a12 += sc2 * e1 * i12;
                    a13 += sc3 * e1 * i13;
                    a20 += sc0 * e2 * i20;
                    a21 += sc1 * e2 * i21;
                    a22 += sc2 * e2 * i22;
                    a23 += sc3 * e2 * i23;
                    a30 += sc0 * e3 * i30;
                    a31 += sc1 * e3 * i31;
                    a32 += sc2 * e3 * i32;
                    a33 += sc3 * e3 * i33;
                }
                // The outer `if` is resolved when the kernel is compiled, the inner one on the
                // device: kept apart on purpose (and `%`, which CubeCL expands, not
                // is_multiple_of).
                #[allow(clippy::collapsible_if, clippy::manual_is_multiple_of)]
                if comptime![affine && q81] {
                    if c0 % 32 == 0 {
                        let sv0 = sx[(x0 + c0) / 32];
                        a00 += of0 * sv0;
                        a01 += of1 * sv0;
                        a02 += of2 * sv0;
                        a03 += of3 * sv0;
                        if comptime![tile4] {
                            let sv1 = sx[(x1 + c0) / 32];
                            a10 += of0 * sv1;
                            a11 += of1 * sv1;
                            a12 += of2 * sv1;
                            a13 += of3 * sv1;
                            let sv2 = sx[(x2 + c0) / 32];
                            a20 += of0 * sv2;
                            a21 += of1 * sv2;
                            a22 += of2 * sv2;
                            a23 += of3 * sv2;
                            let sv3 = sx[(x3 + c0) / 32];
                            a30 += of0 * sv3;
                            a31 += of1 * sv3;
                            a32 += of2 * sv3;
                            a33 += of3 * sv3;
                        }
                    }
                }
                if comptime![affine && !q81] {
                    a00 += of0 * e0 * s0;
                    a01 += of1 * e0 * s0;
                    a02 += of2 * e0 * s0;
                    a03 += of3 * e0 * s0;
                    if comptime![tile4] {
                        a10 += of0 * e1 * s1;
                        a11 += of1 * e1 * s1;
                        a12 += of2 * e1 * s1;
                        a13 += of3 * e1 * s1;
                        a20 += of0 * e2 * s2;
                        a21 += of1 * e2 * s2;
                        a22 += of2 * e2 * s2;
                        a23 += of3 * e2 * s2;
                        a30 += of0 * e3 * s3;
                        a31 += of1 * e3 * s3;
                        a32 += of2 * e3 * s3;
                        a33 += of3 * e3 * s3;
                    }
                }
            }
            gi += 1;
        }
        // Slot 64·(4T + K) + unit (the layout [`qmm_kernel`] reads back).
        let u = UNIT_POS as usize;
        sm[u] = a00;
        sm[64 + u] = a01;
        sm[128 + u] = a02;
        sm[192 + u] = a03;
        if comptime![tile4] {
            sm[256 + u] = a10;
            sm[320 + u] = a11;
            sm[384 + u] = a12;
            sm[448 + u] = a13;
            sm[512 + u] = a20;
            sm[576 + u] = a21;
            sm[640 + u] = a22;
            sm[704 + u] = a23;
            sm[768 + u] = a30;
            sm[832 + u] = a31;
            sm[896 + u] = a32;
            sm[960 + u] = a33;
        }
    } else if comptime![kind <= 1] {
        // One row against one or four activation rows: a group at a time with a unit per
        // row, else word `lane + k · lanes` (one word per group in the loop below).
        let wpg = comptime![if lanes == 1 { group / per_word } else { 1u32 }];
        let n_groups = cols / comptime![wpg * per_word];
        let mut gi = lane;
        while gi < n_groups {
            let g = (r as usize * cols as usize + (gi * wpg * per_word) as usize) / group as usize;
            let scale = params[2 * g];
            let offset = params[2 * g + 1];
            #[unroll]
            for j in 0..wpg {
                let wi = gi * wpg + j;
                let word = codes[row_word + wi as usize];
                let c0 = (wi * per_word) as usize;
                let mut i0 = 0.0f32;
                let mut i1 = 0.0f32;
                let mut i2 = 0.0f32;
                let mut i3 = 0.0f32;
                let mut s0 = 0.0f32;
                let mut s1 = 0.0f32;
                let mut s2 = 0.0f32;
                let mut s3 = 0.0f32;
                let p0a = xq[(x0 + c0) / 4];
                let p0b = act_hi(xq, x0 + c0, per_word);
                let mut p1a = 0u32;
                let mut p1b = 0u32;
                let mut p2a = 0u32;
                let mut p2b = 0u32;
                let mut p3a = 0u32;
                let mut p3b = 0u32;
                if comptime![tile4] {
                    p1a = xq[(x1 + c0) / 4];
                    p1b = act_hi(xq, x1 + c0, per_word);
                    p2a = xq[(x2 + c0) / 4];
                    p2b = act_hi(xq, x2 + c0, per_word);
                    p3a = xq[(x3 + c0) / 4];
                    p3b = act_hi(xq, x3 + c0, per_word);
                }
                #[unroll]
                for k in 0..per_word {
                    let w = code_of(word, k, kind) - zpf;
                    let q0 = act_of(p0a, p0b, k);
                    i0 += w * q0;
                    if comptime![affine && !q81] {
                        s0 += q0;
                    }
                    if comptime![tile4] {
                        let q1 = act_of(p1a, p1b, k);
                        let q2 = act_of(p2a, p2b, k);
                        let q3 = act_of(p3a, p3b, k);
                        i1 += w * q1;
                        i2 += w * q2;
                        i3 += w * q3;
                        if comptime![affine && !q81] {
                            s1 += q1;
                            s2 += q2;
                            s3 += q3;
                        }
                    }
                }
                let d0 = dx[(x0 + c0) / ab];
                a0 += scale * d0 * i0;
                let mut d1 = 0.0f32;
                let mut d2 = 0.0f32;
                let mut d3 = 0.0f32;
                if comptime![tile4] {
                    d1 = dx[(x1 + c0) / ab];
                    d2 = dx[(x2 + c0) / ab];
                    d3 = dx[(x3 + c0) / ab];
                    a1 += scale * d1 * i1;
                    a2 += scale * d2 * i2;
                    a3 += scale * d3 * i3;
                }
                #[allow(clippy::collapsible_if, clippy::manual_is_multiple_of)]
                if comptime![affine && q81] {
                    if c0 % 32 == 0 {
                        a0 += offset * sx[(x0 + c0) / 32];
                        if comptime![tile4] {
                            a1 += offset * sx[(x1 + c0) / 32];
                            a2 += offset * sx[(x2 + c0) / 32];
                            a3 += offset * sx[(x3 + c0) / 32];
                        }
                    }
                }
                if comptime![affine && !q81] {
                    a0 += offset * d0 * s0;
                    if comptime![tile4] {
                        a1 += offset * d1 * s1;
                        a2 += offset * d2 * s2;
                        a3 += offset * d3 * s3;
                    }
                }
            }
            gi += lanes;
        }
    } else {
        let mut wi = lane;
        while wi < words {
            let word = codes[row_word + wi as usize];
            let c0 = (wi * per_word) as usize;
            #[unroll]
            for k in 0..per_word {
                let w = decode(word, k, 1.0f32, 0.0f32, kind);
                let c = c0 + k as usize;
                a0 += w * f32::reinterpret(xq[x0 + c]);
                if comptime![tile4] {
                    a1 += w * f32::reinterpret(xq[x1 + c]);
                    a2 += w * f32::reinterpret(xq[x2 + c]);
                    a3 += w * f32::reinterpret(xq[x3 + c]);
                }
            }
            wi += lanes;
        }
    }
    if comptime![!(kind <= 1 && rows4)] {
        let u = UNIT_POS as usize;
        sm[u] = a0;
        sm[64 + u] = a1;
        sm[128 + u] = a2;
        sm[192 + u] = a3;
    }
}

/// The compile-time half of a weight segment for [`qmm_kernel`], packed in one `u32`: code kind
/// (bits 0–3), zero point (4–11), affine (12), Q8_1 sum term (13), group size (16–31).
fn seg_spec(kind: CodeKind, group: usize, zp: u32, affine: bool, q81: bool) -> u32 {
    kind_id(kind)
        | (zp << 4)
        | ((affine as u32) << 12)
        | ((q81 as u32) << 13)
        | ((group as u32) << 16)
}

/// `y[m × out_rows]`, columns `col0..col0 + rows`: the rows of up to three weight segments
/// (consecutive in the output; `nseg` of them, `rows0` and `rows1` rows in the first two) times
/// the rounded activations (see [`act_kernel`]), plus a bias (`has_bias`, indexed by output
/// column) and a residual (`has_res`, the same shape as `y`), in one launch. A projection whose
/// weights read the same activations (q/k/v, gate/up) and a weight split in parts (a large
/// vocabulary) are one launch.
///
/// A cube of [`UNITS`] units covers 64 / `lanes` output rows and a tile of one activation row
/// (`tile4` false: decode would compute the same row four times) or four; the single-row code is
/// the first row's of the four-row code, so a sequence's result does not depend on the batch.
/// No early return: the barriers must be reached by every unit (WGSL uniformity), so a cube past
/// the last row computes row `rows - 1` again and does not write it.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
#[cube(launch_unchecked)]
fn qmm_kernel(
    codes0: &[u32],
    params0: &[f32],
    codes1: &[u32],
    params1: &[f32],
    codes2: &[u32],
    params2: &[f32],
    xq: &[u32],
    dx: &[f32],
    sx: &[f32],
    bias: &[f32],
    res: &[f32],
    y: &mut [f32],
    m: u32,
    cols: u32,
    rows0: u32,
    rows1: u32,
    rows: u32,
    col0: u32,
    out_rows: u32,
    #[comptime] spec0: u32,
    #[comptime] spec1: u32,
    #[comptime] spec2: u32,
    #[comptime] nseg: u32,
    #[comptime] act_block: u32,
    #[comptime] tile4: bool,
    #[comptime] lanes: u32,
    #[comptime] rows4: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_res: bool,
) {
    // `lanes` units share a row (a power of two, 8..=64, by the row's length).
    let lane = UNIT_POS % lanes;
    let slot = UNIT_POS / lanes;
    // `rows4` (a unit per row): each unit computes four consecutive rows, sharing
    // each activation load among them; every segment's rows are a multiple of four.
    let rows_per_cube = comptime![if rows4 { 4 * UNITS } else { UNITS / lanes }];
    let unit_row = comptime![if rows4 { 4u32 } else { 1u32 }];
    let r_cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * rows_per_cube + slot * unit_row;
    let r = r_cube.min(rows - unit_row);
    let t0 = CUBE_POS_Z * 4;
    // Rows past m read the last valid row and are never written.
    let x0 = ((t0).min(m - 1) * cols) as usize;
    let x1 = ((t0 + 1).min(m - 1) * cols) as usize;
    let x2 = ((t0 + 2).min(m - 1) * cols) as usize;
    let x3 = ((t0 + 3).min(m - 1) * cols) as usize;
    // Four partial sums per unit; sixteen for four rows by four activation rows.
    let mut sm =
        Shared::<[f32]>::new_slice(comptime![if rows4 && tile4 { 1024usize } else { 256usize }]);
    // Which segment the row is in, and its row there; the comptime tests drop the code of
    // absent segments.
    let mut seg = 0u32;
    let mut rl = r;
    if comptime![nseg > 1] {
        if r >= rows0 {
            seg = 1;
            rl = r - rows0;
        }
    }
    if comptime![nseg > 2] {
        if r >= rows0 + rows1 {
            seg = 2;
            rl = r - rows0 - rows1;
        }
    }
    if seg == 0 {
        row_dot(
            codes0, params0, xq, dx, sx, &mut sm, rl, lane, x0, x1, x2, x3, cols, spec0, act_block,
            tile4, lanes, rows4,
        );
    }
    if comptime![nseg > 1] {
        if seg == 1 {
            row_dot(
                codes1, params1, xq, dx, sx, &mut sm, rl, lane, x0, x1, x2, x3, cols, spec1,
                act_block, tile4, lanes, rows4,
            );
        }
    }
    if comptime![nseg > 2] {
        if seg == 2 {
            row_dot(
                codes2, params2, xq, dx, sx, &mut sm, rl, lane, x0, x1, x2, x3, cols, spec2,
                act_block, tile4, lanes, rows4,
            );
        }
    }
    let u = UNIT_POS as usize;
    let tile = comptime![if tile4 { 4u32 } else { 1u32 }];
    if comptime![rows4] {
        // Four rows of each activation row of the tile, each whole: no reduction, no barrier.
        #[unroll]
        for t in 0..tile {
            #[unroll]
            for k in 0..4u32 {
                if t0 + t < m && r_cube + k < rows {
                    let o = ((t0 + t) * out_rows + col0 + r_cube + k) as usize;
                    let mut v = sm[(64 * (4 * t + k)) as usize + u];
                    if comptime![has_bias] {
                        v += bias[(col0 + r_cube + k) as usize];
                    }
                    if comptime![has_res] {
                        v += res[o];
                    }
                    y[o] = v;
                }
            }
        }
    } else if comptime![lanes == 1] {
        // A unit per output row: its sums are whole, no reduction and no barrier.
        #[unroll]
        for k in 0..tile {
            if t0 + k < m && r_cube < rows {
                let o = ((t0 + k) * out_rows + col0 + r_cube) as usize;
                let mut v = sm[(64 * k) as usize + u];
                if comptime![has_bias] {
                    v += bias[(col0 + r_cube) as usize];
                }
                if comptime![has_res] {
                    v += res[o];
                }
                y[o] = v;
            }
        }
    } else {
        sync_cube();
        // Six halvings cover 64 lanes; with fewer, the first rounds (stride ≥ lanes) only
        // keep the barriers uniform.
        let mut stride = 32usize;
        let half = (lanes / 2) as usize;
        #[unroll]
        for _ in 0..6 {
            if (lane as usize) < stride && stride <= half {
                sm[u] += sm[u + stride];
                if comptime![tile4] {
                    sm[64 + u] += sm[64 + u + stride];
                    sm[128 + u] += sm[128 + u + stride];
                    sm[192 + u] += sm[192 + u + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
        if lane < tile && t0 + lane < m && r_cube < rows {
            let o = ((t0 + lane) * out_rows + col0 + r_cube) as usize;
            let mut v = sm[(64 * lane + slot * lanes) as usize];
            if comptime![has_bias] {
                v += bias[(col0 + r_cube) as usize];
            }
            if comptime![has_res] {
                v += res[o];
            }
            y[o] = v;
        }
    }
}

/// Units that share one output row of `items` code-word quads on a hardware GPU: about one
/// quad per unit (each unit then decodes ~4 words before the tree reduction), a power of two
/// between 8 and [`UNITS`] (1, a unit per row, is [`Projection::new`]'s
/// `unit_rows`). Fewer units per row mean more rows per cube and fewer reduction rounds: short
/// rows (576 columns) were reduction-bound with 64 units on one row.
fn lanes_for(items: usize) -> u32 {
    let want = items.clamp(8, UNITS as usize);
    1 << (usize::BITS - 1 - want.leading_zeros())
}

fn launch_1d(n: usize) -> (CubeCount, CubeDim) {
    let units = 64u32;
    let cubes = (n as u32).div_ceil(units).max(1);
    (
        CubeCount::Static(cubes.min(GRID_X), cubes.div_ceil(GRID_X), 1),
        CubeDim::new_1d(units),
    )
}

/// [`super::QuantOps::round_f16`] on the device.
pub(crate) fn round_f16(x: CubeTensor) -> CubeTensor {
    let x = into_contiguous(x);
    assert_eq!(
        x.dtype,
        DType::F32,
        "round_f16: x must be f32 on the device"
    );
    let n = x.meta.shape().num_elements();
    let client = x.client.clone();
    let out = client.empty(n.max(1) * 4);
    if n > 0 {
        let (count, dim) = launch_1d(n);
        unsafe {
            round_f16_kernel::launch(
                &client,
                count,
                dim,
                BufferArg::from_raw_parts(x.handle.clone(), n),
                BufferArg::from_raw_parts(out.clone(), n),
                n as u32,
            );
        }
    }
    CubeTensor::new_contiguous(
        client,
        x.device.clone(),
        x.meta.shape().clone(),
        out,
        DType::F32,
    )
}

/// RMSNorm of each row of `x` (`rows × cols`) times `w`: one cube per row sums the squares
/// (a shared-memory reduction), then writes the scaled row. One launch where the tensor code
/// (square, mean, add, sqrt, reciprocal, two products) took several.
#[cube(launch)]
fn rmsnorm_kernel(x: &[f32], w: &[f32], y: &mut [f32], rows: u32, cols: u32, eps: f32) {
    // No early return before the barriers (uniformity): a cube past the last row redoes
    // row `rows - 1` and writes nothing.
    let r_cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let r = r_cube.min(rows - 1);
    let base = (r * cols) as usize;
    let u = UNIT_POS as usize;
    let mut acc = 0.0f32;
    let mut c = UNIT_POS;
    while c < cols {
        let v = x[base + c as usize];
        acc += v * v;
        c += UNITS;
    }
    let mut sm = Shared::<[f32]>::new_slice(64usize);
    sm[u] = acc;
    sync_cube();
    let mut stride = 32usize;
    #[unroll]
    for _ in 0..6 {
        if u < stride {
            sm[u] += sm[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let inv = 1.0f32 / f32::sqrt(sm[0] / f32::cast_from(cols) + eps);
    if r_cube < rows {
        let mut c2 = UNIT_POS;
        while c2 < cols {
            let i = base + c2 as usize;
            y[i] = x[i] * inv * w[c2 as usize];
            c2 += UNITS;
        }
    }
}

/// [`super::QuantOps::rmsnorm`] on the device.
pub(crate) fn rmsnorm(x: CubeTensor, w: CubeTensor, eps: f32) -> CubeTensor {
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    assert!(
        x.dtype == DType::F32 && w.dtype == DType::F32,
        "rmsnorm: f32 on the device"
    );
    let shape = x.meta.shape().clone();
    let n = shape.num_elements();
    let cols = w.meta.shape().num_elements();
    assert!(
        cols > 0 && n.is_multiple_of(cols),
        "rmsnorm: x's rows must match w"
    );
    let rows = n / cols;
    let client = x.client.clone();
    let out = client.empty(n.max(1) * 4);
    if rows > 0 {
        let rows = rows as u32;
        unsafe {
            rmsnorm_kernel::launch(
                &client,
                CubeCount::Static(rows.min(GRID_X), rows.div_ceil(GRID_X), 1),
                CubeDim::new_1d(UNITS),
                BufferArg::from_raw_parts(x.handle.clone(), n),
                BufferArg::from_raw_parts(w.handle.clone(), cols),
                BufferArg::from_raw_parts(out.clone(), n),
                rows,
                cols as u32,
                eps,
            );
        }
    }
    CubeTensor::new_contiguous(client, x.device.clone(), shape, out, DType::F32)
}

/// RoPE in one pass, a unit per output element (see [`super::RopeShape::pair`], which this
/// mirrors): the pair's first output is `a·c − b·s`, the second `a·s + b·c`, dims past `n_rot`
/// are copied.
#[cube(launch)]
fn rope_kernel(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    y: &mut [f32],
    total: u32,
    heads: u32,
    head_dim: u32,
    n_rot: u32,
    #[comptime] neox: bool,
) {
    let i = ABSOLUTE_POS as u32;
    if i < total {
        let half = n_rot / 2;
        let d = i % head_dim;
        if d >= 2 * half {
            y[i as usize] = x[i as usize];
        } else {
            let row = i / (heads * head_dim);
            y[i as usize] = rotated(x, cos, sin, i - d, d, row, half, neox);
        }
    }
}

/// RoPE's output for dim `d` (< 2·`half`) of the head that starts at `base` in `x`, with angle
/// row `row` of `cos`/`sin` (`[rows, half]`): the pair's first output is `a·c − b·s`, the
/// second `a·s + b·c`; pairs are adjacent dims, or halves when `neox` (see
/// [`super::RopeShape::pair`]).
#[allow(clippy::too_many_arguments)]
#[cube]
pub(crate) fn rotated(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    base: u32,
    d: u32,
    row: u32,
    half: u32,
    #[comptime] neox: bool,
) -> f32 {
    let mut j = d / 2;
    // `%`, which CubeCL expands; is_multiple_of is not a device function.
    #[allow(clippy::manual_is_multiple_of)]
    let mut first = d % 2 == 0;
    let mut a = base + 2 * j;
    let mut b = a + 1;
    if comptime![neox] {
        j = d % half;
        first = d < half;
        a = base + j;
        b = a + half;
    }
    let t = (row * half + j) as usize;
    let (xa, xb) = (x[a as usize], x[b as usize]);
    let mut v = xa * sin[t] + xb * cos[t];
    if first {
        v = xa * cos[t] - xb * sin[t];
    }
    v
}

/// [`super::QuantOps::rope`] on the device.
pub(crate) fn rope(
    x: CubeTensor,
    cos: CubeTensor,
    sin: CubeTensor,
    r: super::RopeShape,
) -> CubeTensor {
    let (x, cos, sin) = (
        into_contiguous(x),
        into_contiguous(cos),
        into_contiguous(sin),
    );
    let shape = x.meta.shape().clone();
    let n = shape.num_elements();
    let n_tab = cos.meta.shape().num_elements();
    assert!(
        r.head_dim > 0 && n.is_multiple_of(r.heads * r.head_dim),
        "rope: x must be [n, heads·head_dim]"
    );
    let client = x.client.clone();
    let out = client.empty(n.max(1) * 4);
    if n > 0 {
        let (count, dim) = launch_1d(n);
        unsafe {
            rope_kernel::launch(
                &client,
                count,
                dim,
                BufferArg::from_raw_parts(x.handle.clone(), n),
                BufferArg::from_raw_parts(cos.handle.clone(), n_tab.max(1)),
                BufferArg::from_raw_parts(sin.handle.clone(), n_tab.max(1)),
                BufferArg::from_raw_parts(out.clone(), n),
                n as u32,
                r.heads as u32,
                r.head_dim as u32,
                r.n_rot as u32,
                r.neox,
            );
        }
    }
    CubeTensor::new_contiguous(client, x.device.clone(), shape, out, DType::F32)
}

/// `silu(gate) · up` = `gate / (1 + e^−gate) · up`, a unit per element.
#[cube(launch)]
fn silu_mul_kernel(g: &[f32], u: &[f32], y: &mut [f32], n: u32) {
    let i = ABSOLUTE_POS;
    if i < n as usize {
        let v = g[i];
        y[i] = v / (1.0f32 + f32::exp(-v)) * u[i];
    }
}

/// [`super::QuantOps::silu_mul`] on the device.
pub(crate) fn silu_mul(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
    let (g, u) = (into_contiguous(gate), into_contiguous(up));
    let shape = g.meta.shape().clone();
    let n = shape.num_elements();
    assert_eq!(
        n,
        u.meta.shape().num_elements(),
        "silu_mul: gate and up differ in size"
    );
    let client = g.client.clone();
    let out = client.empty(n.max(1) * 4);
    if n > 0 {
        let (count, dim) = launch_1d(n);
        unsafe {
            silu_mul_kernel::launch(
                &client,
                count,
                dim,
                BufferArg::from_raw_parts(g.handle.clone(), n),
                BufferArg::from_raw_parts(u.handle.clone(), n),
                BufferArg::from_raw_parts(out.clone(), n),
                n as u32,
            );
        }
    }
    CubeTensor::new_contiguous(client, g.device.clone(), shape, out, DType::F32)
}

/// How the CPU kernels treat `ty`: (act kind, act block, zero point, affine, Q8_1).
fn act_scheme(ty: GgmlType) -> (u32, usize, u32, bool, bool) {
    match ty {
        GgmlType::F32 => (4, 1, 0, false, false),
        GgmlType::F16 => (2, 1, 0, false, false),
        GgmlType::BF16 => (3, 1, 0, false, false),
        GgmlType::Q4_0 => (0, 32, 8, false, false),
        GgmlType::Q5_0 => (0, 32, 16, false, false),
        GgmlType::Q8_0 => (0, 32, 128, false, false),
        GgmlType::Q4_1 | GgmlType::Q5_1 => (0, 32, 0, true, true),
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q2_K => (1, 256, 0, true, false),
        GgmlType::Q6_K => (1, 256, 32, false, false),
        // Q3_K's codes are q (value q − 4); the IQ4 codes are the table level + 128.
        GgmlType::Q3_K => (1, 256, 4, false, false),
        GgmlType::IQ4_NL => (0, 32, 128, false, false),
        GgmlType::IQ4_XS => (1, 256, 128, false, false),
        _ => unreachable!("no device layout for {ty}"),
    }
}

/// Activations rounded on the device for one scheme (see [`act_kernel`]).
pub(crate) struct Acts {
    q: cubecl::server::Handle,
    dx: cubecl::server::Handle,
    sx: cubecl::server::Handle,
    n: usize,
    n_blocks: usize,
}

/// Round the `rows × cols` activations of source `src` (read from `x`, and `w` for a norm) for
/// scheme `(act, block)`: one launch.
#[allow(clippy::too_many_arguments)]
fn round_acts(
    client: &cubecl::client::Client,
    x: &CubeTensor,
    w: Option<&CubeTensor>,
    eps: f32,
    src: u32,
    rows: usize,
    cols: usize,
    (act, block): (u32, usize),
) -> Acts {
    let n = rows * cols;
    let n_blocks = if act <= 1 { n / block } else { 1 };
    // Integer quants four to a word; float activations one per word.
    let n_words = if act <= 1 { n / 4 } else { n };
    let a = Acts {
        q: client.empty(n_words.max(1) * 4),
        dx: client.empty(n_blocks.max(1) * 4),
        sx: client.empty(n_blocks.max(1) * 4),
        n: n_words,
        n_blocks: n_blocks.max(1),
    };
    if rows == 0 {
        return a;
    }
    let x_len = x.meta.shape().num_elements();
    let width = if src == src::SILU { 2 * cols } else { cols };
    assert_eq!(
        x_len,
        rows * width,
        "activations: x must be [rows, {width}]"
    );
    let (wh, w_len) = match w {
        Some(w) => (w.handle.clone(), w.meta.shape().num_elements()),
        None => (x.handle.clone(), x_len),
    };
    assert!(
        src != src::NORM || w_len == cols,
        "activations: a norm weight per column"
    );
    let r = rows as u32;
    unsafe {
        // SAFETY: unchecked indexing: rows < `rows` of `cols` (twice that for SiLU·mul, whose
        // input is gate|up), blocks within the row; `w` covers `cols` for a norm.
        act_kernel::launch_unchecked(
            client,
            CubeCount::Static(r.min(GRID_X), r.div_ceil(GRID_X), 1),
            CubeDim::new_1d(UNITS),
            BufferArg::from_raw_parts(x.handle.clone(), x_len),
            BufferArg::from_raw_parts(wh, w_len),
            BufferArg::from_raw_parts(a.q.clone(), a.n.max(1)),
            BufferArg::from_raw_parts(a.dx.clone(), a.n_blocks),
            BufferArg::from_raw_parts(a.sx.clone(), a.n_blocks),
            r,
            cols as u32,
            eps,
            src,
            act,
            if act <= 1 { block as u32 } else { 1 },
        );
    }
    a
}

/// One weight part as a [`qmm_kernel`] segment.
#[derive(Clone)]
struct Seg {
    part: Part,
    spec: u32,
}

/// One [`qmm_kernel`] launch: up to three segments, consecutive output columns from `col0`.
struct Launch {
    segs: Vec<Seg>,
    col0: usize,
    rows: usize,
    lanes: u32,
    /// A unit per row (`lanes` 1), every segment quantized (4- or 8-bit codes) with a
    /// multiple of four rows: each unit then takes four rows ([`qmm_kernel`]'s `rows4`).
    rows4: bool,
}

/// Weights that read the same rounded activations.
struct Group {
    scheme: (u32, usize),
    launches: Vec<Launch>,
}

/// One or more weights with the same input (`cols`), side by side in one output of
/// `rows` columns (the sum of theirs): q|k|v, gate|up, or one weight. Weights whose
/// activation rounding agrees share one rounding launch and one matmul launch per three
/// segments; the rest get their own. A bias over all output columns is optional.
pub(crate) struct Projection {
    groups: Vec<Group>,
    rows: usize,
    cols: usize,
    bias: Option<(cubecl::server::Handle, usize)>,
    /// One unused word, bound where a launch has no bias or no residual (a binding may not
    /// be empty), made once rather than per call.
    unused: cubecl::server::Handle,
}

impl Projection {
    /// `unit_rows`: one unit per output row (no reduction, no barrier; what a software
    /// adapter such as lavapipe, which runs a cube's units in SIMD chunks on a CPU core, does
    /// best), instead of [`lanes_for`]'s units per row (coalesced reads on a hardware GPU).
    pub(crate) fn new(
        ws: &[&QWeightHandle],
        bias: Option<&[f32]>,
        device: &CubeDevice,
        unit_rows: bool,
    ) -> Result<Projection, HandleError> {
        let cols = ws.first().map_or(0, |w| w.cols);
        let mut groups: Vec<Group> = vec![];
        let mut col = 0;
        for w in ws {
            assert_eq!(w.cols, cols, "Projection: weights with different inputs");
            let (b, _, _) = bind(w, device)?;
            let (act, block, zp, affine, q81) = act_scheme(w.ty);
            let spec = seg_spec(b.kind, b.group.max(1), zp, affine, q81);
            let integer = matches!(b.kind, CodeKind::U4 | CodeKind::U8);
            if integer {
                // row_dot's integer mode walks a row a group at a time: whole groups in a
                // row, whole words in a group.
                assert!(
                    b.group > 0
                        && cols.is_multiple_of(b.group)
                        && b.group.is_multiple_of(b.kind.per_word()),
                    "Projection: group of {} for {} columns",
                    b.group,
                    cols
                );
            }
            let lanes = if unit_rows {
                1
            } else {
                lanes_for(cols / b.kind.per_word() / 4)
            };
            let start_group = groups.last().is_none_or(|g| g.scheme != (act, block));
            if start_group {
                groups.push(Group {
                    scheme: (act, block),
                    launches: vec![],
                });
            }
            let g = groups.last_mut().expect("pushed above");
            for p in b.parts {
                let fits = g
                    .launches
                    .last()
                    .is_some_and(|l| l.segs.len() < 3 && l.lanes == lanes);
                if !fits || start_group && g.launches.is_empty() {
                    g.launches.push(Launch {
                        segs: vec![],
                        col0: col,
                        rows: 0,
                        lanes,
                        rows4: lanes == 1,
                    });
                }
                let l = g.launches.last_mut().expect("pushed above");
                col += p.rows;
                l.rows += p.rows;
                l.rows4 &= p.rows.is_multiple_of(4) && integer;
                l.segs.push(Seg { part: p, spec });
            }
        }
        let bias = bias.map(|b| {
            assert_eq!(b.len(), col, "Projection: a bias per output column");
            (device.client().create_from_slice(f32::as_bytes(b)), b.len())
        });
        Ok(Projection {
            groups,
            rows: col,
            cols,
            bias,
            unused: device.client().empty(4),
        })
    }

    /// Output columns.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Kernel launches per call.
    pub(crate) fn launches(&self) -> usize {
        self.groups.iter().map(|g| 1 + g.launches.len()).sum()
    }
}

/// `out[m × p.rows] = act(x) · Wᵀ (+ bias) (+ res)` where the activations come from `x` through
/// source `src` (see [`src`]: `w` and `eps` for a norm); `m` rows; the result has `shape`
/// (`[m, p.rows]` or any shape of as many elements).
#[allow(clippy::too_many_arguments)]
pub(crate) fn project(
    p: &Projection,
    x: &CubeTensor,
    w: Option<&CubeTensor>,
    eps: f32,
    src: u32,
    m: usize,
    res: Option<&CubeTensor>,
    shape: burn::tensor::Shape,
) -> CubeTensor {
    let client = x.client.clone();
    let out = client.empty(m.max(1) * p.rows.max(1) * 4);
    let n_out = m * p.rows;
    if m > 0 && p.rows > 0 {
        let (bias, n_bias) = p.bias.clone().unwrap_or_else(|| (p.unused.clone(), 1));
        let (res_h, n_res) = match res {
            Some(r) => {
                assert_eq!(
                    r.meta.shape().num_elements(),
                    n_out,
                    "project: residual shape"
                );
                (r.handle.clone(), n_out)
            }
            None => (p.unused.clone(), 1),
        };
        let tile4 = m > 1;
        let gz = if tile4 { (m as u32).div_ceil(TILE) } else { 1 };
        for g in &p.groups {
            let a = round_acts(&client, x, w, eps, src, m, p.cols, g.scheme);
            for l in &g.launches {
                let seg = |i: usize| l.segs.get(i).unwrap_or(&l.segs[0]);
                let rows0 = l.segs[0].part.rows as u32;
                let rows1 = l.segs.get(1).map_or(0, |s| s.part.rows as u32);
                let rows4 = l.rows4;
                let per_cube = if rows4 { 4 * UNITS } else { UNITS / l.lanes };
                let cubes = (l.rows as u32).div_ceil(per_cube);
                // SAFETY: every handle was allocated with at least `n` four-byte elements.
                let arg = |h: &cubecl::server::Handle, n: usize| unsafe {
                    BufferArg::from_raw_parts(h.clone(), n.max(1))
                };
                let (s0, s1, s2) = (seg(0), seg(1), seg(2));
                // SAFETY: unchecked indexing. Codes and parameters: a segment's row `r` < its
                // rows reads its own words and groups; activations: rows < m of `cols`; the
                // output: `m × out_rows`, columns `col0 + r` < `out_rows`; bias and residual
                // (when present) cover the output.
                unsafe {
                    qmm_kernel::launch_unchecked(
                        &client,
                        CubeCount::Static(cubes.min(GRID_X), cubes.div_ceil(GRID_X), gz),
                        CubeDim::new_1d(UNITS),
                        arg(&s0.part.codes, s0.part.n_codes),
                        arg(&s0.part.params, s0.part.n_params),
                        arg(&s1.part.codes, s1.part.n_codes),
                        arg(&s1.part.params, s1.part.n_params),
                        arg(&s2.part.codes, s2.part.n_codes),
                        arg(&s2.part.params, s2.part.n_params),
                        arg(&a.q, a.n),
                        arg(&a.dx, a.n_blocks),
                        arg(&a.sx, a.n_blocks),
                        arg(&bias, n_bias),
                        arg(&res_h, n_res),
                        arg(&out, n_out),
                        m as u32,
                        p.cols as u32,
                        rows0,
                        rows1,
                        l.rows as u32,
                        l.col0 as u32,
                        p.rows as u32,
                        s0.spec,
                        s1.spec,
                        s2.spec,
                        l.segs.len() as u32,
                        g.scheme.1 as u32,
                        tile4,
                        l.lanes,
                        rows4,
                        p.bias.is_some(),
                        res.is_some(),
                    )
                };
            }
        }
    }
    assert_eq!(shape.num_elements(), n_out, "project: output shape");
    CubeTensor::new_contiguous(client, x.device.clone(), shape, out, DType::F32)
}

/// `y = x · Wᵀ` on the device `x` lives on. The activations are first rounded as the CPU
/// kernels round them (8-bit blocks for quantized weights, f16/bf16 for half weights) and the
/// products are summed as integers per code word, so the GPU follows the CPU path's (and
/// llama.cpp's) numerics up to f32 summation order.
pub(crate) fn qmatmul(
    x: CubeTensor,
    w: &QWeightHandle,
    m: usize,
    out_shape: burn::tensor::Shape,
) -> CubeTensor {
    let device = x.device.clone();
    let p = Projection::new(&[w], None, &device, false).unwrap_or_else(|e| panic!("qmatmul: {e}"));
    let x = into_contiguous(x);
    assert_eq!(x.dtype, DType::F32, "qmatmul: x must be f32 on the device");
    project(&p, &x, None, 0.0, src::PLAIN, m, None, out_shape)
}

/// The `CubeDevice` behind a burn device, if it is one.
pub(crate) fn cube_device(d: &burn::tensor::Device) -> Option<CubeDevice> {
    match d.as_dispatch() {
        DispatchDevice::Cube(c) => Some(c.clone()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
