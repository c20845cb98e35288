//! burn integration: ember's quantized matmul as a burn backend extension.
//!
//! Model code works on backend-generic `burn::tensor::Tensor<D>` values and calls [`qmatmul`];
//! `#[backend_extension]` routes the call to the backend the tensor lives on:
//!
//! - **Flex** (CPU, the default): [`crate::quant::matmul`], ember's SIMD kernels, run directly on
//!   the GGUF blocks in the mmap. The activations are read through a zero-copy slice of the Flex
//!   tensor (one copy only if the input is a non-contiguous view) and the output `Vec<f32>` is
//!   moved into the result tensor, so the extension adds a fixed cost of a few hundred ns per call
//!   and no per-element work.
//! - **Cube** (only with this crate's `wgpu` feature): the weight is repacked once, losslessly,
//!   into one flat affine layout ([`crate::quant::repack`]: 4-, 8- or 16-bit codes plus an f32
//!   scale and offset per group), uploaded, and multiplied by a CubeCL kernel that decodes the
//!   codes in registers ([`cube`]). No type is widened to f32 weights on the device.
//!
//! Backends not listed (ndarray, libtorch, remote) panic when the op is called on them.

use std::ops::Range;
use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
pub use burn::tensor::{Device, Shape, Tensor, TensorData};

use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::{self, GgmlType, QMatRef, QuantError};

/// The CPU device ember runs on: burn-flex.
pub fn cpu() -> Device {
    Device::flex()
}

/// Errors building a [`QWeightHandle`].
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("weight bytes {start}..{end} lie outside the {file_len}-byte mapping")]
    OutOfBounds {
        start: usize,
        end: usize,
        file_len: usize,
    },
    #[error("tensor {name}: {dims:?} is not a matrix")]
    NotMatrix { name: String, dims: Vec<u64> },
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("GPU upload: {0}")]
    Device(String),
}

/// A quantized weight matrix `[rows, cols]` (row-major, rows of GGUF blocks) that points into a
/// GGUF mapping: no bytes are copied on the CPU. Cloning bumps one refcount.
#[derive(Clone, Debug)]
pub struct QWeightHandle {
    file: Arc<GgufFile>,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    start: usize,
    len: usize,
    /// The weight's copy on a GPU device, made by [`prepare`] (or the first GPU matmul).
    #[cfg(feature = "wgpu")]
    gpu: Arc<std::sync::Mutex<Option<cube::DevWeight>>>,
}

impl QWeightHandle {
    /// `bytes` is a range of `file.bytes()` holding exactly `rows` rows of `cols` elements of `ty`.
    pub fn new(
        file: Arc<GgufFile>,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Range<usize>,
    ) -> Result<Self, HandleError> {
        let file_len = file.bytes().len();
        if bytes.start > bytes.end || bytes.end > file_len {
            return Err(HandleError::OutOfBounds {
                start: bytes.start,
                end: bytes.end,
                file_len,
            });
        }
        let h = QWeightHandle {
            file,
            ty,
            rows,
            cols,
            start: bytes.start,
            len: bytes.end - bytes.start,
            #[cfg(feature = "wgpu")]
            gpu: Arc::default(),
        };
        h.mat().validate()?;
        Ok(h)
    }

    /// The GGUF tensor `t` of `file` (GGUF dims `[cols, rows]`).
    pub fn from_tensor(file: &Arc<GgufFile>, t: &TensorInfo) -> Result<Self, HandleError> {
        if t.dims.len() != 2 {
            return Err(HandleError::NotMatrix {
                name: t.name.clone(),
                dims: t.dims.clone(),
            });
        }
        let (rows, cols) = t.rows_cols();
        let start = (file.data_offset() + t.offset) as usize;
        Self::new(
            file.clone(),
            t.ty,
            rows,
            cols,
            start..start + t.n_bytes as usize,
        )
    }

    /// The borrowed view the kernels take.
    #[inline]
    pub fn mat(&self) -> QMatRef<'_> {
        QMatRef {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: &self.file.bytes()[self.start..self.start + self.len],
        }
    }
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Custom ops on burn backends. The `Cube` arm exists only with this crate's `wgpu` feature.
#[backend_extension(Flex, Cube: cfg(feature = "wgpu"))]
pub trait QuantOps: Backend {
    /// `y[.., rows] = x[.., cols] · Wᵀ` for a float `x` whose last dimension is `w.cols()`.
    fn qmatmul(x: FloatTensor<Self>, w: &QWeightHandle) -> FloatTensor<Self>;
    /// Every element rounded to the nearest f16 value (kept in f32): the precision of
    /// llama.cpp's f16 KV cache, for backends without f16 storage.
    fn round_f16(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// RMSNorm of every row of `x` (`[.., cols]`) times `w` (`[cols]`), as [`crate::ops::rmsnorm`].
    fn rmsnorm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;
    /// RoPE of `x` (`[n, heads·head_dim]`) with angle tables `cos`, `sin` (`[n, n_rot/2]`), in
    /// one pass; see [`RopeShape`].
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        shape: RopeShape,
    ) -> FloatTensor<Self>;
    /// `silu(gate) · up`, elementwise, as [`crate::ops::silu_mul`] computes it.
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// How [`QuantOps::rope`] reads a row: `heads` heads of `head_dim`, the first `n_rot` dims of
/// each rotated in pairs, adjacent (2i, 2i+1) or halves (i, i + n_rot/2) when `neox`.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub heads: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub neox: bool,
}

impl RopeShape {
    /// Output element `i` of row-major `[n, heads·head_dim]` as the two inputs it rotates
    /// (flat indices into `x`), the angle-table index, and whether it is the pair's first
    /// output (`a·c − b·s`) or second (`a·s + b·c`); `None` past `n_rot` (copied as is).
    #[inline]
    pub fn pair(&self, i: usize) -> Option<(usize, usize, usize, bool)> {
        let (hd, half) = (self.head_dim, self.n_rot / 2);
        let d = i % hd;
        if d >= 2 * half {
            return None;
        }
        let (base, row) = (i - d, i / (self.heads * hd));
        let (j, first) = if self.neox {
            (d % half, d < half)
        } else {
            (d / 2, d.is_multiple_of(2))
        };
        let (a, b) = if self.neox {
            (base + j, base + j + half)
        } else {
            (base + 2 * j, base + 2 * j + 1)
        };
        Some((a, b, row * half + j, first))
    }
}

#[cfg(feature = "wgpu")]
impl QuantOps for burn::backend::Cube {
    fn qmatmul(x: FloatTensor<Self>, w: &QWeightHandle) -> FloatTensor<Self> {
        let (m, shape) = out_shape(&x.shape(), w);
        cube::qmatmul(x, w, m, shape)
    }
    fn round_f16(x: FloatTensor<Self>) -> FloatTensor<Self> {
        cube::round_f16(x)
    }
    fn rmsnorm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        cube::rmsnorm(x, w, eps)
    }
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        shape: RopeShape,
    ) -> FloatTensor<Self> {
        cube::rope(x, cos, sin, shape)
    }
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        cube::silu_mul(gate, up)
    }
}

fn out_shape(x: &Shape, w: &QWeightHandle) -> (usize, Shape) {
    let r = x.num_dims();
    assert!(r >= 1, "qmatmul: x must have at least one dimension");
    assert_eq!(
        x[r - 1],
        w.cols,
        "qmatmul: x's last dimension must equal the weight's cols"
    );
    let m = x
        .num_elements()
        .checked_div(w.cols)
        .unwrap_or(x.num_elements());
    let mut s = x.clone();
    s[r - 1] = w.rows;
    (m, s)
}

impl QuantOps for Flex {
    fn qmatmul(x: FlexTensor, w: &QWeightHandle) -> FlexTensor {
        let (m, shape) = out_shape(&x.shape(), w);
        // Zero-copy for a contiguous f32 tensor (the normal case); one copy for a strided view.
        let x = if x.as_slice::<f32>().is_some() {
            x
        } else {
            x.to_contiguous()
        };
        let xs = x
            .as_slice::<f32>()
            .expect("qmatmul: x must be an f32 tensor");
        let mut y = vec![0f32; m * w.rows];
        quant::matmul(w.mat(), xs, m, &mut y);
        // Moves the allocation into the tensor; no copy.
        FlexTensor::from_data(TensorData::new(y, shape))
    }
    fn round_f16(x: FlexTensor) -> FlexTensor {
        let shape = x.shape();
        let x = if x.as_slice::<f32>().is_some() {
            x
        } else {
            x.to_contiguous()
        };
        let v: Vec<f32> = x
            .as_slice::<f32>()
            .expect("round_f16: f32 tensor")
            .iter()
            .map(|&v| crate::ops::round_f16(v))
            .collect();
        FlexTensor::from_data(TensorData::new(v, shape))
    }
    fn rmsnorm(x: FlexTensor, w: FlexTensor, eps: f32) -> FlexTensor {
        let shape = x.shape();
        let (x, w) = (x.to_contiguous(), w.to_contiguous());
        let xs = x
            .as_slice::<f32>()
            .expect("rmsnorm: x must be an f32 tensor");
        let ws = w
            .as_slice::<f32>()
            .expect("rmsnorm: w must be an f32 tensor");
        assert!(
            !ws.is_empty() && xs.len().is_multiple_of(ws.len()),
            "rmsnorm: x's rows must match w"
        );
        let mut y = vec![0f32; xs.len()];
        crate::ops::rmsnorm(xs, ws, eps, &mut y);
        FlexTensor::from_data(TensorData::new(y, shape))
    }
    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, r: RopeShape) -> FlexTensor {
        let shape = x.shape();
        let (x, cos, sin) = (x.to_contiguous(), cos.to_contiguous(), sin.to_contiguous());
        fn f32s(t: &FlexTensor) -> &[f32] {
            t.as_slice::<f32>().expect("rope: f32 tensors")
        }
        let (xs, c, s) = (f32s(&x), f32s(&cos), f32s(&sin));
        let y: Vec<f32> = (0..xs.len())
            .map(|i| match r.pair(i) {
                None => xs[i],
                Some((a, b, t, true)) => xs[a] * c[t] - xs[b] * s[t],
                Some((a, b, t, false)) => xs[a] * s[t] + xs[b] * c[t],
            })
            .collect();
        FlexTensor::from_data(TensorData::new(y, shape))
    }
    fn silu_mul(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let shape = gate.shape();
        let (g, u) = (gate.to_contiguous(), up.to_contiguous());
        let g = g.as_slice::<f32>().expect("silu_mul: f32 tensors");
        let u = u.as_slice::<f32>().expect("silu_mul: f32 tensors");
        assert_eq!(g.len(), u.len(), "silu_mul: gate and up differ in size");
        let mut y = g.to_vec();
        crate::ops::silu_mul(&mut y, u);
        FlexTensor::from_data(TensorData::new(y, shape))
    }
}

/// Kernel launches issued while `f` runs, by kernel name (empty without the `wgpu` feature, or
/// when `f` ran on the CPU). Process-wide: launches from other threads in that window count
/// too, so measure with nothing else on the GPU.
pub fn count_launches<R>(f: impl FnOnce() -> R) -> (R, Launches) {
    #[cfg(feature = "wgpu")]
    {
        use burn_cubecl::cubecl::logging::{LaunchObservation, LaunchObserver};

        #[derive(Default)]
        struct Counter(std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>);
        impl LaunchObserver for Counter {
            fn launched(&self, kernel: &'static str) {
                *self
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(kernel)
                    .or_default() += 1;
            }
        }
        let counter = Arc::new(Counter::default());
        let watching = LaunchObservation::new(counter.clone());
        let r = f();
        drop(watching);
        let by_kernel = counter.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (r, Launches { by_kernel })
    }
    #[cfg(not(feature = "wgpu"))]
    (f(), Launches::default())
}

/// What [`count_launches`] saw.
#[derive(Clone, Debug, Default)]
pub struct Launches {
    /// Launches per kernel name (as the kernel names itself).
    pub by_kernel: std::collections::BTreeMap<&'static str, usize>,
}

impl Launches {
    pub fn total(&self) -> usize {
        self.by_kernel.values().sum()
    }
}

/// The GPU arm: weights repacked losslessly at upload ([`crate::quant::repack`]) and multiplied
/// by one CubeCL kernel that decodes codes in registers. Nothing is widened to f32 weights.
#[cfg(feature = "wgpu")]
pub(crate) mod cube;

/// The decoder's fused kernels on a wgpu device (what the device executor runs).
#[cfg(feature = "wgpu")]
pub mod gpu;

/// Copy `w` to `device` ahead of use, in the device's layout, and return the device bytes it
/// takes (0 on the CPU, where weights stay in the mapping). Idempotent.
pub fn prepare(w: &QWeightHandle, device: &Device) -> Result<usize, HandleError> {
    #[cfg(feature = "wgpu")]
    if let Some(d) = cube::cube_device(device) {
        return cube::prepare(w, &d);
    }
    let _ = (w, device);
    Ok(0)
}

/// Model-facing op: `x[.., cols] · Wᵀ -> [.., rows]` on whatever backend `x` lives on.
pub fn qmatmul<const D: usize>(x: Tensor<D>, w: &QWeightHandle) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as QuantOps>::qmatmul(x.into_dispatch(), w))
}

/// [`QuantOps::rmsnorm`] on whatever backend `x` lives on: one kernel on the GPU.
pub fn rmsnorm<const D: usize>(x: Tensor<D>, w: &Tensor<1>, eps: f32) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as QuantOps>::rmsnorm(
        x.into_dispatch(),
        w.clone().into_dispatch(),
        eps,
    ))
}

/// [`QuantOps::rope`] on whatever backend `x` lives on: one kernel on the GPU.
pub fn rope(x: Tensor<2>, cos: &Tensor<2>, sin: &Tensor<2>, shape: RopeShape) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as QuantOps>::rope(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        shape,
    ))
}

/// [`QuantOps::silu_mul`] on whatever backend the tensors live on: one kernel on the GPU.
pub fn silu_mul(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as QuantOps>::silu_mul(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// [`QuantOps::round_f16`] on whatever backend `x` lives on.
pub fn round_f16<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as QuantOps>::round_f16(x.into_dispatch()))
}

/// Host-buffer convenience for callers that keep activations in `Vec<f32>`: moves `x`
/// (`m × w.cols()`) into a CPU tensor, runs [`qmatmul`] and moves the result back out. On Flex
/// neither direction copies.
pub fn qmatmul_vec(x: Vec<f32>, m: usize, w: &QWeightHandle) -> Vec<f32> {
    let x = Tensor::<2>::from_data(TensorData::new(x, [m, w.cols]), &cpu());
    qmatmul(x, w)
        .into_data()
        .try_into_vec::<f32>()
        .expect("qmatmul output is f32")
}

/// The CPU's fused form for weights that read the same host activations (q/k/v, gate/up):
/// one activation quantization per format and one parallel section for all of them
/// ([`quant::matmul_many`]), on the GGUF blocks in the mapping. `ys[i]` is resized to
/// `m × ws[i].rows()` (its capacity reused). Each result is bit-identical to [`qmatmul`] on Flex for that weight.
pub fn qmatmul_many_host(x: &[f32], m: usize, ws: &[&QWeightHandle], ys: &mut [Vec<f32>]) {
    assert_eq!(
        ws.len(),
        ys.len(),
        "qmatmul_many_host: one output per weight"
    );
    let mats: Vec<QMatRef<'_>> = ws.iter().map(|w| w.mat()).collect();
    for (y, w) in ys.iter_mut().zip(ws) {
        // Every element is overwritten: keep the old contents rather than zero them.
        let n = m * w.rows;
        if y.len() > n {
            y.truncate(n);
        } else {
            y.resize(n, 0.0);
        }
    }
    let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
    quant::matmul_many(&mats, x, m, &mut outs);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, parse_bytes};

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// An in-memory GGUF file with one (rows × cols) matrix per type.
    fn file_with(types: &[GgmlType], rows: usize, cols: usize) -> Arc<GgufFile> {
        let mut seed = 7u64;
        let mut w = GgufWriter::new();
        for ty in types {
            let f = rand_vec(rows * cols, &mut seed);
            let q = quant::quantize(*ty, &f).unwrap();
            w.tensor(
                format!("w.{}", ty.name()),
                &[cols as u64, rows as u64],
                *ty,
                q,
            );
        }
        Arc::new(parse_bytes(&w.to_bytes()).unwrap())
    }

    fn handle(file: &Arc<GgufFile>, ty: GgmlType) -> QWeightHandle {
        QWeightHandle::from_tensor(
            file,
            file.require_tensor(&format!("w.{}", ty.name())).unwrap(),
        )
        .unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    const TYPES: [GgmlType; 3] = [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K];

    #[test]
    fn extension_matches_quant_matmul_bit_for_bit() {
        let (rows, cols) = (96, 256);
        let file = file_with(&TYPES, rows, cols);
        let mut seed = 11u64;
        for ty in TYPES {
            let w = handle(&file, ty);
            // The handle points into the mapping: no copy of the blocks.
            assert!(std::ptr::eq(
                w.mat().data.as_ptr(),
                file.tensor_bytes(file.require_tensor(&format!("w.{}", ty.name())).unwrap())
                    .as_ptr()
            ));
            for m in [1usize, 7] {
                let x = rand_vec(m * cols, &mut seed);
                let mut want = vec![0f32; m * rows];
                quant::matmul(w.mat(), &x, m, &mut want);
                let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, cols]), &cpu());
                let y = qmatmul(t, &w);
                assert_eq!(y.dims(), [m, rows]);
                let got = y.into_data().try_into_vec::<f32>().unwrap();
                assert_eq!(bits(&got), bits(&want), "{ty} m={m}");
                assert_eq!(
                    bits(&qmatmul_vec(x, m, &w)),
                    bits(&want),
                    "{ty} m={m} (vec)"
                );
            }
        }
    }

    #[test]
    fn rank3_input() {
        let (rows, cols) = (32, 64);
        let file = file_with(&[GgmlType::Q8_0], rows, cols);
        let w = handle(&file, GgmlType::Q8_0);
        let mut seed = 3u64;
        let x = rand_vec(2 * 3 * cols, &mut seed);
        let mut want = vec![0f32; 6 * rows];
        quant::matmul(w.mat(), &x, 6, &mut want);
        let y = qmatmul(
            Tensor::<3>::from_data(TensorData::new(x, [2, 3, cols]), &cpu()),
            &w,
        );
        assert_eq!(y.dims(), [2, 3, rows]);
        assert_eq!(
            bits(&y.into_data().try_into_vec::<f32>().unwrap()),
            bits(&want)
        );
    }

    #[test]
    fn non_contiguous_input() {
        let (rows, cols, m) = (64, 128, 5);
        let file = file_with(&[GgmlType::Q4_1], rows, cols);
        let w = handle(&file, GgmlType::Q4_1);
        let mut seed = 5u64;
        // x stored transposed ([cols, m]) and viewed as [m, cols].
        let xt = rand_vec(cols * m, &mut seed);
        let mut x = vec![0f32; m * cols];
        for i in 0..m {
            for j in 0..cols {
                x[i * cols + j] = xt[j * m + i];
            }
        }
        let mut want = vec![0f32; m * rows];
        quant::matmul(w.mat(), &x, m, &mut want);
        let view = Tensor::<2>::from_data(TensorData::new(xt, [cols, m]), &cpu()).transpose();
        let got = qmatmul(view, &w).into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn vec_round_trip_does_not_copy() {
        // Vec -> Flex tensor -> Vec keeps the allocation (what `linear()` relies on).
        let v: Vec<f32> = (0..1024).map(|i| i as f32).collect();
        let p = v.as_ptr();
        let t = Tensor::<2>::from_data(TensorData::new(v, [4, 256]), &cpu());
        let back = t.into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(back.as_ptr(), p);
    }

    #[test]
    fn bad_handles_are_rejected() {
        let file = file_with(&[GgmlType::Q8_0], 4, 32);
        let len = file.bytes().len();
        assert!(matches!(
            QWeightHandle::new(file.clone(), GgmlType::Q8_0, 4, 32, len - 8..len + 8),
            Err(HandleError::OutOfBounds { .. })
        ));
        assert!(matches!(
            QWeightHandle::new(file, GgmlType::Q8_0, 4, 32, 0..10),
            Err(HandleError::Quant(_))
        ));
    }
}
