//! The decoder's fused kernels on a wgpu device, for the device executor
//! (`ember_models::device`). A decode step of a layer is ten launches:
//!
//! | launches | what |
//! |---:|---|
//! | 2 | [`project`]: RMSNorm fused with the activation rounding, then q\|k\|v (+ biases) as one matmul |
//! | 1 | [`rope_store`]: RoPE of q and k, k and v written into the paged pools at f16 precision |
//! | 1 | [`attention`]: paged attention over the block table, on the device |
//! | 2 | [`project`]: the attention output rounded, then Wo with the residual add fused |
//! | 2 | [`project`]: RMSNorm + rounding, then gate\|up as one matmul |
//! | 2 | [`project`]: SiLU·mul fused with the rounding, then Wdown with the residual add |
//!
//! Weights whose activation rounding differs (a q/k/v mix of Q8_0-style and K-quant blocks)
//! take one more pair of launches per extra scheme; [`Projection::launches`] says how many.
//! Every op follows the CPU path's numerics (`crate::ops`, `crate::quant`) up to the order of
//! f32 sums; `tests/gpu_parity.rs` holds each to the CPU kernels.

use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::cube::{self, paged};
use super::{Device, HandleError, QWeightHandle, Tensor};

/// The tensor's own CubeCL tensor (its buffer, not a copy).
fn cube_of<const D: usize>(t: &Tensor<D>) -> CubeTensor {
    match t.clone().into_dispatch().kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c)) => c,
        _ => panic!("a fused GPU op got a tensor that is not a float tensor on a wgpu device"),
    }
}

/// An input, made contiguous if it is a view.
fn to_cube<const D: usize>(t: &Tensor<D>) -> CubeTensor {
    into_contiguous(cube_of(t))
}

/// A pool tensor's buffer, to be written in place: it must be contiguous as it is (the pools
/// are made by `zeros` and `cat`), since a contiguous copy would take the writes instead.
fn pool(t: &Tensor<2>) -> CubeTensor {
    let c = cube_of(t);
    assert!(
        c.is_contiguous(),
        "a KV pool must be contiguous to be written in place"
    );
    c
}

fn from_cube<const D: usize>(c: CubeTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Float(c)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

fn cube_device(device: &Device) -> Result<burn_cubecl::CubeDevice, HandleError> {
    cube::cube_device(device)
        .ok_or_else(|| HandleError::Device("fused GPU ops need a wgpu device".into()))
}

/// Weights that read the same input, side by side in one output: q|k|v, gate|up, or one
/// weight. Built once at load, from weights [`super::prepare`] uploads (or uploads itself).
pub struct Projection(cube::Projection);

impl Projection {
    /// `bias`, if any, covers every output column (zeros where a weight has none).
    /// `software`: the adapter runs shaders on CPU cores (lavapipe): each unit computes whole
    /// output rows (no reductions, no barriers), 1.4× the decode speed of the GPU layout there
    /// (measured on SmolLM2). On a hardware GPU, several units share a row and read it coalesced.
    pub fn new(
        ws: &[&QWeightHandle],
        bias: Option<&[f32]>,
        device: &Device,
        software: bool,
    ) -> Result<Projection, HandleError> {
        let d = cube_device(device)?;
        cube::Projection::new(ws, bias, &d, software).map(Projection)
    }
    /// Output columns (the weights' rows together).
    pub fn rows(&self) -> usize {
        self.0.rows()
    }
    /// Kernel launches per [`project`] call: one rounding per activation scheme, one matmul
    /// per three weight segments.
    pub fn launches(&self) -> usize {
        self.0.launches()
    }
}

/// What a [`project`] multiplies, rounded for the weights as the CPU kernels round it.
pub enum Input<'a> {
    /// The rows of a tensor as they are.
    Plain(&'a Tensor<2>),
    /// `rmsnorm(x) · w` of each row, with `eps`.
    Norm(&'a Tensor<2>, &'a Tensor<1>, f32),
    /// `silu(gate) · up` of a `[rows, 2·ff]` gate|up output.
    SiluMul(&'a Tensor<2>),
}

/// `input · Wᵀ (+ bias) (+ residual)`, `[rows, p.rows()]`, in [`Projection::launches`] launches.
pub fn project(p: &Projection, input: Input<'_>, residual: Option<&Tensor<2>>) -> Tensor<2> {
    let (x, w, eps, src, rows) = match input {
        Input::Plain(x) => (to_cube(x), None, 0.0, cube::src::PLAIN, x.dims()[0]),
        Input::Norm(x, w, eps) => (
            to_cube(x),
            Some(to_cube(w)),
            eps,
            cube::src::NORM,
            x.dims()[0],
        ),
        Input::SiluMul(x) => (to_cube(x), None, 0.0, cube::src::SILU, x.dims()[0]),
    };
    let res = residual.map(to_cube);
    let shape = burn::tensor::Shape::new([rows, p.rows()]);
    from_cube(cube::project(
        &p.0,
        &x,
        w.as_ref(),
        eps,
        src,
        rows,
        res.as_ref(),
        shape,
    ))
}

pub use paged::HeadShape;

/// The largest buffer `device` can bind (what one KV pool or weight part may take), if it is a
/// wgpu device.
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    cube::cube_device(device).map(|d| d.client().properties().memory.max_page_size)
}

/// One forward pass's view of the paged cache on the device: the block tables, and per row its
/// table, context length and the slot its new K/V row goes to. Uploaded once per pass.
pub struct PassTables(paged::PassTables);

impl PassTables {
    /// `tables`: the items' block tables, concatenated; `rows`: per row `(offset of its item's
    /// table in tables, positions it attends = its position + 1, slot of its position)`.
    pub fn new(
        device: &Device,
        tables: &[u32],
        rows: &[(u32, u32, u32)],
        block_size: usize,
    ) -> Result<PassTables, HandleError> {
        let d = cube_device(device)?;
        Ok(PassTables(paged::PassTables::new(
            &d.client(),
            tables,
            rows,
            block_size,
        )))
    }
}

/// RoPE of q and k in a q|k|v projection output (`[rows, q_dim + 2·kv_dim]`) with angle tables
/// `cos`, `sin` (`[rows, n_rot/2]`); k and v rounded to f16 precision and written into
/// `k_pool`/`v_pool` at each row's slot, in place. Returns q, rotated and at f16 precision.
pub fn rope_store(
    qkv: &Tensor<2>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    pt: &PassTables,
    k_pool: &Tensor<2>,
    v_pool: &Tensor<2>,
    s: HeadShape,
) -> Tensor<2> {
    let q = paged::rope_store(
        &to_cube(qkv),
        &to_cube(cos),
        &to_cube(sin),
        &pt.0,
        &pool(k_pool),
        &pool(v_pool),
        s,
    );
    from_cube(q)
}

/// Causal attention of `q` (`[rows, heads·head_dim]`, from [`rope_store`]) over each row's
/// cached positions, read from the pools through the block tables; with `window`, each row
/// sees only its last `window` positions (sliding-window layers).
pub fn attention(
    q: &Tensor<2>,
    k_pool: &Tensor<2>,
    v_pool: &Tensor<2>,
    pt: &PassTables,
    s: HeadShape,
    window: Option<usize>,
) -> Tensor<2> {
    from_cube(paged::attention(
        &to_cube(q),
        &pool(k_pool),
        &pool(v_pool),
        &pt.0,
        s,
        window,
    ))
}

/// Submit what this thread has queued for `t`'s device and wait, asleep, until the device
/// thread has taken it (not until the adapter has run it): for the thread that drives a
/// software adapter (lavapipe), whose shaders run on worker threads of this process.
///
/// CubeCL's client spins (hundreds of thousands of `spin_loop` rounds before it yields) when
/// its queue to the device thread is full, which it is while that thread waits on the adapter.
/// On a hardware GPU that costs an idle core; on a software adapter it takes the core from the
/// rasterizer threads that do the work: `perf` put 30% of a decode run's samples in that spin
/// on a 2-core machine. Handing the queue over twice per layer keeps it from filling, so the
/// launching thread sleeps instead. (Running that thread at `SCHED_IDLE` measured ~4% faster,
/// but would starve ember whenever anything else on the machine wants the cores.)
pub fn hand_over(t: &Tensor<2>) {
    if let Err(e) = cube_of(t).client.flush() {
        // The read of the pass's results reports a failed device; nothing to add here.
        log::debug!("device queue flush: {e:?}");
    }
}
