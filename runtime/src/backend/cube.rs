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
//! * each unit walks its row's code words with a stride of `lanes` words, decodes the 8, 4 or 2
//!   codes of a word with one `(scale, offset)` fetch (a word never straddles a group), and
//!   accumulates the tile's dot products;
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
    row0: usize,
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
            row0,
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

/// The activation rounding ember's CPU kernels (and llama.cpp) apply before their integer dots.
/// For quantized weights (`act` 0: Q8_0/Q8_1 blocks of 32 with an f16 scale; `act` 1: Q8_K
/// blocks of 256 with an f32 scale) it writes the integer quants `q` (as f32, exactly), the
/// block scales `dx` and, for Q8_1, `sx = f16(d·Σq)`. For float weights it writes each value
/// rounded to f16 (`act` 2) or bf16 (3) in `q`. One unit per block.
#[allow(unused_assignments)]
#[cube(launch)]
fn quantize_act_kernel(
    x: &[f32],
    q: &mut [f32],
    dx: &mut [f32],
    sx: &mut [f32],
    n_blocks: u32,
    #[comptime] act: u32,
    #[comptime] block: u32,
    #[comptime] q81: bool,
) {
    let b = ABSOLUTE_POS;
    if b < n_blocks as usize {
        let base = b * block as usize;
        if comptime![act == 0] {
            let mut amax = 0.0f32;
            for j in 0..block as usize {
                amax = amax.max(x[base + j].abs());
            }
            let d = amax / 127.0f32;
            let mut id = 0.0f32;
            if d != 0.0f32 {
                id = 1.0f32 / d;
            }
            let mut sum = 0.0f32;
            for j in 0..block as usize {
                let v = round_away(x[base + j] * id);
                sum += v;
                q[base + j] = v;
            }
            dx[b] = round_f16_value(d);
            if comptime![q81] {
                sx[b] = round_f16_value(d * sum);
            }
        } else if comptime![act == 1] {
            let mut amax = 0.0f32;
            let mut max = 0.0f32;
            for j in 0..block as usize {
                let v = x[base + j];
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0f32 {
                for j in 0..block as usize {
                    q[base + j] = 0.0f32;
                }
                dx[b] = 0.0f32;
            } else {
                let iscale = -127.0f32 / max;
                for j in 0..block as usize {
                    // ggml's nearest_int: ties to even (WGSL round), clamped at 127.
                    q[base + j] = (iscale * x[base + j]).round().min(127.0f32);
                }
                dx[b] = 1.0f32 / iscale;
            }
        } else if comptime![act == 2] {
            q[b] = round_f16_value(x[b]);
        } else {
            // bf16: round to nearest even on the top 16 bits.
            let bits = u32::reinterpret(x[b]);
            let lsb = (bits >> 16) & 1;
            q[b] = f32::reinterpret((bits + 0x7FFFu32 + lsb) & 0xFFFF_0000u32);
        }
    }
}

/// Code `k` of a packed word, as an exact f32 integer.
#[allow(unused_assignments)]
#[cube]
fn code_of(word: u32, k: u32, #[comptime] kind: u32) -> f32 {
    let mut c = 0.0f32;
    if comptime![kind == 0] {
        c = f32::cast_from((word >> (4 * k)) & 0xF);
    } else {
        c = f32::cast_from((word >> (8 * k)) & 0xFF);
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

/// Integer mode (quantized weights): per code word, `Σ (code − zp) · q` over its 8 or 4
/// elements is exact in f32 (|terms| ≤ 255·127), then scaled by `scale · dx` as the CPU kernels
/// scale their integer block sums; affine types add their min term from `sx` (Q8_1, once per
/// 32-block) or from `offset · dx · Σq` (Q8_K). Float mode multiplies decoded weights by the
/// rounded activations.
#[cube(launch)]
fn qmm_kernel(
    codes: &[u32],
    params: &[f32],
    xq: &[f32],
    dx: &[f32],
    sx: &[f32],
    y: &mut [f32],
    m: u32,
    rows: u32,
    cols: u32,
    row0: u32,
    out_rows: u32,
    #[comptime] kind: u32,
    #[comptime] per_word: u32,
    #[comptime] group: u32,
    #[comptime] zp: u32,
    #[comptime] affine: bool,
    #[comptime] q81: bool,
    #[comptime] act_block: u32,
    #[comptime] tile4: bool,
    #[comptime] lanes: u32,
) {
    // `tile4`: a cube computes 4 activation rows (m > 1); else 1 (decode at m = 1 would compute
    // the same row 4 times). The single-row code is the first row's of the 4-row code, so the
    // result is the same either way.
    // No early return: the barriers below must be reached by every unit (WGSL uniformity), so a
    // cube past the last row computes row `rows - 1` again and does not write it.
    // `lanes` units share a row (a power of two, 8..=64, by the row's length); the cube's
    // 64 units cover 64 / lanes rows.
    let lane = UNIT_POS % lanes;
    let slot = UNIT_POS / lanes;
    let rows_per_cube = comptime![UNITS / lanes];
    let r_cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * rows_per_cube + slot;
    let r = (r_cube).min(rows - 1);
    let t0 = CUBE_POS_Z * 4;
    // Rows past m read the last valid row and are never written.
    let x0 = ((t0).min(m - 1) * cols) as usize;
    let x1 = ((t0 + 1).min(m - 1) * cols) as usize;
    let x2 = ((t0 + 2).min(m - 1) * cols) as usize;
    let x3 = ((t0 + 3).min(m - 1) * cols) as usize;
    let words = cols / per_word;
    let row_word = r as usize * words as usize;
    let zpf = f32::cast_from(zp);
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut a3 = 0.0f32;
    let mut wi = lane;
    while wi < words {
        let word = codes[row_word + wi as usize];
        let c0 = (wi * per_word) as usize;
        if comptime![kind <= 1] {
            let g = (r as usize * cols as usize + c0) / group as usize;
            let scale = params[2 * g];
            let offset = params[2 * g + 1];
            let mut i0 = 0.0f32;
            let mut i1 = 0.0f32;
            let mut i2 = 0.0f32;
            let mut i3 = 0.0f32;
            let mut s0 = 0.0f32;
            let mut s1 = 0.0f32;
            let mut s2 = 0.0f32;
            let mut s3 = 0.0f32;
            #[unroll]
            for k in 0..per_word {
                let w = code_of(word, k, kind) - zpf;
                let c = c0 + k as usize;
                let q0 = xq[x0 + c];
                i0 += w * q0;
                if comptime![affine && !q81] {
                    s0 += q0;
                }
                if comptime![tile4] {
                    let (q1, q2, q3) = (xq[x1 + c], xq[x2 + c], xq[x3 + c]);
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
            let ab = act_block as usize;
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
            // The outer `if` is resolved when the kernel is compiled, the inner one on the
            // device: kept apart on purpose (and `%`, which CubeCL expands, not is_multiple_of).
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
        } else {
            #[unroll]
            for k in 0..per_word {
                let w = decode(word, k, 1.0f32, 0.0f32, kind);
                let c = c0 + k as usize;
                a0 += w * xq[x0 + c];
                if comptime![tile4] {
                    a1 += w * xq[x1 + c];
                    a2 += w * xq[x2 + c];
                    a3 += w * xq[x3 + c];
                }
            }
        }
        wi += lanes;
    }
    let mut sm = Shared::<[f32]>::new_slice(256usize);
    let u = UNIT_POS as usize;
    sm[u] = a0;
    sm[64 + u] = a1;
    sm[128 + u] = a2;
    sm[192 + u] = a3;
    sync_cube();
    // Six halvings cover 64 lanes; with fewer, the first rounds (stride ≥ lanes) only keep
    // the barriers uniform.
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
    let tile = comptime![if tile4 { 4u32 } else { 1u32 }];
    if lane < tile && t0 + lane < m && r_cube < rows {
        // `r` is the row within this part of the weight; `row0 + r` within the whole output.
        y[((t0 + lane) * out_rows + row0 + r) as usize] = sm[(64 * lane + slot * lanes) as usize];
    }
}

/// Units that share one output row of `words` code words: about a quarter as many as there
/// are words (each unit then decodes ~4 words before the tree reduction), a power of two
/// between 8 and [`UNITS`]. Fewer units per row mean more rows per cube and fewer reduction
/// rounds: short rows (576 columns) were reduction-bound with 64 units on one row.
fn lanes_for(words: usize) -> u32 {
    let want = (words / 4).clamp(8, UNITS as usize);
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
            let base = i - d;
            let row = i / (heads * head_dim);
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
            if first {
                y[i as usize] = xa * cos[t] - xb * sin[t];
            } else {
                y[i as usize] = xa * sin[t] + xb * cos[t];
            }
        }
    }
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

/// Activations rounded for `ty` on the device: `(q, dx, sx)` buffers (see
/// `quantize_act_kernel`); `None` for f32 weights (used as they are).
struct ActBufs {
    q: cubecl::server::Handle,
    dx: cubecl::server::Handle,
    n_dx: usize,
    sx: cubecl::server::Handle,
    n_sx: usize,
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
        GgmlType::Q4_K | GgmlType::Q5_K => (1, 256, 0, true, false),
        GgmlType::Q6_K => (1, 256, 32, false, false),
        _ => unreachable!("no device layout for {ty}"),
    }
}

fn quantize_act(x: &CubeTensor, ty: GgmlType, n: usize) -> Option<ActBufs> {
    let (act, block, _, _, q81) = act_scheme(ty);
    if act == 4 {
        return None;
    }
    let client = &x.client;
    let n_blocks = n / block;
    let quant = act <= 1;
    let n_dx = if quant { n_blocks.max(1) } else { 1 };
    let n_sx = if q81 { n_blocks.max(1) } else { 1 };
    let bufs = ActBufs {
        q: client.empty(n.max(1) * 4),
        dx: client.empty(n_dx * 4),
        n_dx,
        sx: client.empty(n_sx * 4),
        n_sx,
    };
    let (count, dim) = launch_1d(n_blocks);
    unsafe {
        quantize_act_kernel::launch(
            client,
            count,
            dim,
            BufferArg::from_raw_parts(x.handle.clone(), n),
            BufferArg::from_raw_parts(bufs.q.clone(), n),
            BufferArg::from_raw_parts(bufs.dx.clone(), n_dx),
            BufferArg::from_raw_parts(bufs.sx.clone(), n_sx),
            n_blocks as u32,
            act,
            block as u32,
            q81,
        );
    }
    Some(bufs)
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
    let (b, _, _) = bind(w, &device).unwrap_or_else(|e| panic!("qmatmul: {e}"));
    let x = into_contiguous(x);
    assert_eq!(x.dtype, DType::F32, "qmatmul: x must be f32 on the device");
    let client = x.client.clone();
    let n = m * w.cols;
    let (_, act_block, zp, affine, q81) = act_scheme(w.ty);
    let act = quantize_act(&x, w.ty, n).unwrap_or_else(|| ActBufs {
        q: x.handle.clone(),
        dx: client.empty(4),
        n_dx: 1,
        sx: client.empty(4),
        n_sx: 1,
    });
    let out = client.empty(m.max(1) * w.rows * 4);
    if m > 0 && w.rows > 0 {
        let lanes = lanes_for(w.cols / b.kind.per_word());
        // A tile of one row for decode (m = 1), else of TILE rows.
        let tile4 = m > 1;
        let gz = if tile4 { (m as u32).div_ceil(TILE) } else { 1 };
        let kind = b.kind;
        for p in &b.parts {
            let rows = p.rows as u32;
            let cubes = rows.div_ceil(UNITS / lanes);
            unsafe {
                qmm_kernel::launch(
                    &client,
                    CubeCount::Static(cubes.min(GRID_X), cubes.div_ceil(GRID_X), gz),
                    CubeDim::new_1d(UNITS),
                    BufferArg::from_raw_parts(p.codes.clone(), p.n_codes),
                    BufferArg::from_raw_parts(p.params.clone(), p.n_params),
                    BufferArg::from_raw_parts(act.q.clone(), n),
                    BufferArg::from_raw_parts(act.dx.clone(), act.n_dx),
                    BufferArg::from_raw_parts(act.sx.clone(), act.n_sx),
                    BufferArg::from_raw_parts(out.clone(), m * w.rows),
                    m as u32,
                    rows,
                    w.cols as u32,
                    p.row0 as u32,
                    w.rows as u32,
                    kind_id(kind),
                    kind.per_word() as u32,
                    b.group.max(1) as u32,
                    zp,
                    affine,
                    q81,
                    act_block as u32,
                    tile4,
                    lanes,
                );
            }
        }
    }
    CubeTensor::new_contiguous(client, device, out_shape, out, DType::F32)
}

/// The `CubeDevice` behind a burn device, if it is one.
pub(crate) fn cube_device(d: &burn::tensor::Device) -> Option<CubeDevice> {
    match d.as_dispatch() {
        DispatchDevice::Cube(c) => Some(c.clone()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
