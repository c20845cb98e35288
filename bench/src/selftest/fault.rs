//! Test-only fault injection (`EMBER_SELFTEST_FAULT`): which matmul to break, and how.

use ember_runtime::kv::f16;
use ember_runtime::quant::{self, GgmlType, Isa};

use super::FAULT_ENV;

/// How the injected fault breaks a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Inside the kernel: the weight bytes that ISA's kernel reads have one block scale off by
    /// 2⁻⁸ (row 4's first block; for float weights, its first 32 values), as a kernel that
    /// decodes a scale slightly wrong would. Only the tight references catch it.
    Scale,
    /// After the kernel: every third output negated (a grossly wrong kernel).
    Output,
}

/// The parsed fault: a type, the ISA whose kernel gets it (`None` for float weights, whose one
/// code path serves every ISA), and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    pub ty: GgmlType,
    pub isa: Option<Isa>,
    pub mode: FaultMode,
}

pub(super) fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `TYPE[:ISA][:MODE]`, case-insensitive: `q4_k`, `q4_k:avx2`, `q4_k:neon:output`, `f16`.
/// The ISA defaults to the best one available; float types take none. MODE is `scale` (the
/// default, see [`FaultMode::Scale`]) or `output`.
pub fn parse_fault(spec: &str) -> Result<Fault, String> {
    let mut parts = spec.split(':').map(str::trim);
    let t = parts.next().unwrap_or("");
    let ty = GgmlType::SUPPORTED
        .iter()
        .copied()
        .find(|ty| ty.name().eq_ignore_ascii_case(t))
        .ok_or_else(|| format!("{FAULT_ENV}='{spec}': '{t}' is not a supported block type"))?;
    let (mut isa, mut mode) = (None, None);
    for p in parts {
        if p.eq_ignore_ascii_case("scale") && mode.is_none() {
            mode = Some(FaultMode::Scale);
        } else if p.eq_ignore_ascii_case("output") && mode.is_none() {
            mode = Some(FaultMode::Output);
        } else if isa.is_none() && mode.is_none() {
            if is_float(ty) {
                return Err(format!(
                    "{FAULT_ENV}='{spec}': {} weights run one code path on every ISA (one parity row); name no ISA",
                    ty.name()
                ));
            }
            isa = Some(
                quant::available_isas()
                    .into_iter()
                    .find(|i| i.name().eq_ignore_ascii_case(p))
                    .ok_or_else(|| {
                        format!("{FAULT_ENV}='{spec}': ISA '{p}' is not available on this CPU")
                    })?,
            );
        } else {
            return Err(format!(
                "{FAULT_ENV}='{spec}': '{p}' is not an ISA or a mode (scale, output) in its place"
            ));
        }
    }
    if isa.is_none() && !is_float(ty) {
        isa = Some(quant::best_isa());
    }
    Ok(Fault {
        ty,
        isa,
        mode: mode.unwrap_or(FaultMode::Scale),
    })
}

/// The injected [`FaultMode::Scale`] fault: a copy of `q` (a `rows × cols` matrix of `ty`) with
/// the scale of row 4's first block multiplied by 1 + 2⁻⁸ (f16 scales have 10 mantissa bits,
/// so it always changes), or for float weights row 4's first 32 values.
pub(super) fn perturb_scale(ty: GgmlType, q: &[u8], cols: usize) -> Vec<u8> {
    let mut q = q.to_vec();
    let rb = ty.row_bytes(cols).expect("block-aligned");
    let blk = 4 * rb;
    let k = 1.0 + 1.0 / 256.0;
    let f16_at = |q: &mut [u8], o: usize| {
        let d = f16::from_le_bytes([q[o], q[o + 1]]).to_f32() * k;
        q[o..o + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    };
    match ty {
        GgmlType::F32 => {
            for c in q[blk..blk + 4 * 32].chunks_exact_mut(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * k;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => (0..32).for_each(|i| f16_at(&mut q, blk + 2 * i)),
        GgmlType::BF16 => {
            for c in q[blk..blk + 2 * 32].chunks_exact_mut(2) {
                let v =
                    bf16_round(f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) * k);
                c.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        // The super-block scale d sits after ql, qh and scales (Q6_K), after scales and qs
        // (Q2_K), after hmask, qs and scales (Q3_K).
        GgmlType::Q6_K => f16_at(&mut q, blk + 208),
        GgmlType::Q2_K => f16_at(&mut q, blk + 80),
        GgmlType::Q3_K => f16_at(&mut q, blk + 108),
        // Every other block starts with its f16 scale d.
        _ => f16_at(&mut q, blk),
    }
    q
}

/// f32 → bf16 (round to nearest even) → f32, as the runtime rounds activations for BF16 weights.
pub(super) fn bf16_round(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)
}
