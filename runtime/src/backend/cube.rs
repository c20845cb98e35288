//! The CubeCL (wgpu) arm of [`super::QuantOps`].
//!
//! One kernel, `qmm`, computes `y[m × rows] = x[m × cols] · Wᵀ` for every repacked layout
//! ([`CodeKind`] is a compile-time parameter, so each layout gets its own specialised shader):
//!
//! * one cube (workgroup) of [`UNITS`] units per output row `r` and per tile of [`TILE`] input
//!   rows; cubes are laid out on a 2-D grid so that vocabularies over 65,535 rows fit;
//! * each unit walks the row's code words with a stride of [`UNITS`] words, decodes the 8, 4 or 2
//!   codes of a word with one `(scale, offset)` fetch (a word never straddles a group), and
//!   accumulates [`TILE`] dot products;
//! * a shared-memory tree reduction finishes the sums.
//!
//! Decode (m = 1) reads every weight byte once, which is what bounds decode on any device.

use burn::backend::DispatchDevice;
use burn::tensor::DType;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeDevice, kernel::into_contiguous};

use super::{HandleError, QWeightHandle};
use crate::quant::repack::{CodeKind, repack};

/// Units per cube.
pub const UNITS: u32 = 64;
/// Input rows per cube.
pub const TILE: u32 = 4;
/// Cubes per grid row (under the 65,535 limit of every API).
const GRID_X: u32 = 32_768;

/// A weight in device memory.
pub(crate) struct DevWeight {
    device: CubeDevice,
    codes: cubecl::server::Handle,
    params: cubecl::server::Handle,
    n_codes: usize,
    n_params: usize,
    kind: CodeKind,
    group: usize,
    bytes: usize,
}

impl std::fmt::Debug for DevWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevWeight({:?}, group {}, {} bytes)", self.kind, self.group, self.bytes)
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
    codes: cubecl::server::Handle,
    params: cubecl::server::Handle,
    n_codes: usize,
    n_params: usize,
    kind: CodeKind,
    group: usize,
}

fn bind(w: &QWeightHandle, device: &CubeDevice) -> Result<(Bound, usize, bool), HandleError> {
    let mut slot = w.gpu.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = slot.as_ref()
        && d.device == *device
    {
        let b = Bound {
            codes: d.codes.clone(),
            params: d.params.clone(),
            n_codes: d.n_codes,
            n_params: d.n_params,
            kind: d.kind,
            group: d.group,
        };
        return Ok((b, d.bytes, false));
    }
    let r = repack(w.mat())?;
    if r.kind == CodeKind::F16 || r.kind == CodeKind::Bf16 {
        // Two codes per word must not straddle rows: the kernel walks whole words per row.
        if w.cols % 2 != 0 {
            return Err(HandleError::Device(format!("{} matrix with an odd column count ({})", w.ty, w.cols)));
        }
    }
    let client = device.client();
    let limit = client.properties().memory.max_page_size as usize;
    if 4 * r.codes.len() > limit {
        return Err(HandleError::Device(format!(
            "{} × {} {} weight needs a {}-byte buffer; the adapter allows {limit}",
            w.rows,
            w.cols,
            w.ty,
            4 * r.codes.len()
        )));
    }
    let codes = client.create_from_slice(u32::as_bytes(&r.codes));
    // A zero-length binding is not allowed; raw float layouts get one unused word.
    let params_v = if r.params.is_empty() { vec![0f32] } else { r.params.clone() };
    let params = client.create_from_slice(f32::as_bytes(&params_v));
    let bytes = r.bytes();
    let d = DevWeight {
        device: device.clone(),
        codes: codes.clone(),
        params: params.clone(),
        n_codes: r.codes.len(),
        n_params: params_v.len(),
        kind: r.kind,
        group: r.group,
        bytes,
    };
    let b = Bound { codes, params, n_codes: d.n_codes, n_params: d.n_params, kind: d.kind, group: d.group };
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

#[cube(launch)]
fn qmm_kernel(
    codes: &[u32],
    params: &[f32],
    x: &[f32],
    y: &mut [f32],
    m: u32,
    rows: u32,
    cols: u32,
    #[comptime] kind: u32,
    #[comptime] per_word: u32,
    #[comptime] group: u32,
) {
    // No early return: the barriers below must be reached by every unit (WGSL uniformity), so a
    // cube past the last row computes row `rows - 1` again and does not write it.
    let r_cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let r = (r_cube).min(rows - 1);
    let t0 = CUBE_POS_Z * 4;
    // Rows past m read the last valid row and are never written.
    let x0 = ((t0).min(m - 1) * cols) as usize;
    let x1 = ((t0 + 1).min(m - 1) * cols) as usize;
    let x2 = ((t0 + 2).min(m - 1) * cols) as usize;
    let x3 = ((t0 + 3).min(m - 1) * cols) as usize;
    let words = cols / per_word;
    let row_word = r as usize * words as usize;
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut a3 = 0.0f32;
    let mut wi = UNIT_POS;
    while wi < words {
        let word = codes[row_word + wi as usize];
        let c0 = (wi * per_word) as usize;
        let mut scale = 1.0f32;
        let mut offset = 0.0f32;
        if comptime![kind <= 1] {
            let g = (r as usize * cols as usize + c0) / group as usize;
            scale = params[2 * g];
            offset = params[2 * g + 1];
        }
        #[unroll]
        for k in 0..per_word {
            let w = decode(word, k, scale, offset, kind);
            let c = c0 + k as usize;
            a0 += w * x[x0 + c];
            a1 += w * x[x1 + c];
            a2 += w * x[x2 + c];
            a3 += w * x[x3 + c];
        }
        wi += 64;
    }
    let mut sm = Shared::<[f32]>::new_slice(256usize);
    let u = UNIT_POS as usize;
    sm[u] = a0;
    sm[64 + u] = a1;
    sm[128 + u] = a2;
    sm[192 + u] = a3;
    sync_cube();
    let mut stride = 32usize;
    #[unroll]
    for _ in 0..6 {
        if u < stride {
            sm[u] += sm[u + stride];
            sm[64 + u] += sm[64 + u + stride];
            sm[128 + u] += sm[128 + u + stride];
            sm[192 + u] += sm[192 + u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if u < 4 && t0 + UNIT_POS < m && r_cube < rows {
        y[((t0 + UNIT_POS) * rows + r) as usize] = sm[64 * u];
    }
}

/// `y = x · Wᵀ` on the device `x` lives on.
pub(crate) fn qmatmul(x: CubeTensor, w: &QWeightHandle, m: usize, out_shape: burn::tensor::Shape) -> CubeTensor {
    let device = x.device.clone();
    let (b, _, _) = bind(w, &device).unwrap_or_else(|e| panic!("qmatmul: {e}"));
    let x = into_contiguous(x);
    assert_eq!(x.dtype, DType::F32, "qmatmul: x must be f32 on the device");
    let client = x.client.clone();
    let out = client.empty(m.max(1) * w.rows * 4);
    if m > 0 && w.rows > 0 {
        let rows = w.rows as u32;
        let gx = rows.min(GRID_X);
        let gy = rows.div_ceil(GRID_X);
        let gz = (m as u32).div_ceil(TILE);
        let kind = b.kind;
        unsafe {
            qmm_kernel::launch(
                &client,
                CubeCount::Static(gx, gy, gz),
                CubeDim::new_1d(UNITS),
                BufferArg::from_raw_parts(b.codes, b.n_codes),
                BufferArg::from_raw_parts(b.params, b.n_params),
                BufferArg::from_raw_parts(x.handle.clone(), m * w.cols),
                BufferArg::from_raw_parts(out.clone(), m * w.rows),
                m as u32,
                rows,
                w.cols as u32,
                kind_id(kind),
                kind.per_word() as u32,
                b.group.max(1) as u32,
            );
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
