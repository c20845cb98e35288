//! The type table and hand-built blocks → exact values.

use super::*;

// ---------------------------------------------------------------------------------------------
// Type table

#[test]
fn type_ids_names_and_sizes() {
    for t in GgmlType::ALL {
        assert_eq!(GgmlType::from_u32(t.id()), Some(t), "{t}");
    }
    for bad in [4u32, 5, 31, 32, 33, 36, 37, 38, 40, 1000] {
        assert_eq!(GgmlType::from_u32(bad), None, "id {bad}");
    }
    let expect: &[(GgmlType, u32, &str, usize, usize)] = &[
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
        (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
        (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
        (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
        (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
        (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
        (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
        (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
        (GgmlType::BF16, 30, "BF16", 1, 2),
        (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    ];
    for &(t, id, name, bl, bb) in expect {
        assert_eq!(
            (t.id(), t.name(), t.block_len(), t.block_bytes()),
            (id, name, bl, bb)
        );
    }
    assert_eq!(GgmlType::Q4_K.row_bytes(896), None);
    assert_eq!(GgmlType::Q4_K.row_bytes(1024), Some(4 * 144));
    assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(18 * 20));
    assert_eq!(GgmlType::F16.row_bytes(7), Some(14));
    assert_eq!(
        GgmlType::SUPPORTED
            .iter()
            .filter(|t| t.is_supported())
            .count(),
        15
    );
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ] {
        assert!(t.is_supported(), "{t}");
    }
    assert!(!GgmlType::IQ2_XXS.is_supported() && !GgmlType::Q8_1.is_supported());
}

#[test]
fn errors_are_reported() {
    let mut out = vec![0f32; 32];
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out),
        Err(QuantError::BadSrcLen {
            expected: 18,
            got: 17,
            ..
        })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q4_K, &[0u8; 144], &mut out),
        Err(QuantError::NotBlockMultiple { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0f32; 256]),
        Err(QuantError::Unsupported(GgmlType::IQ2_XXS))
    ));
    assert!(matches!(
        quantize(GgmlType::Q8_0, &[0.0; 33]),
        Err(QuantError::NotBlockMultiple { .. })
    ));
    assert!(matches!(
        quantize(GgmlType::IQ2_XXS, &[0.0; 256]),
        Err(QuantError::Unsupported(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Hand-built blocks -> exact values

fn deq(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; ty.block_len() * b.len() / ty.block_bytes()];
    dequantize(ty, b, &mut y).unwrap();
    y
}

#[test]
fn layout_float_types() {
    let mut b = Vec::new();
    b.extend_from_slice(&1.5f32.to_le_bytes());
    b.extend_from_slice(&(-2.25f32).to_le_bytes());
    assert_eq!(deq(GgmlType::F32, &b), vec![1.5, -2.25]);
    assert_eq!(
        deq(GgmlType::F16, &[0x00, 0x3E, 0x00, 0xC0]),
        vec![1.5, -2.0]
    );
    // bf16 is the top half of an f32: 0x3FC0 = 1.5, 0xC010 = -2.25.
    assert_eq!(
        deq(GgmlType::BF16, &[0xC0, 0x3F, 0x10, 0xC0]),
        vec![1.5, -2.25]
    );
}

#[test]
fn layout_q4_0_and_q4_1() {
    // Low nibble of qs[j] is element j, high nibble is element j + 16.
    let mut b = vec![0u8; 18];
    b[..2].copy_from_slice(&f16b(0.5));
    for j in 0..16 {
        b[2 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(y[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
    }
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&f16b(2.0));
    b[2..4].copy_from_slice(&f16b(-1.0));
    for j in 0..16 {
        b[4 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], 2.0 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 2.0 * (15 - j) as f32 - 1.0);
    }
}

#[test]
fn layout_q5_0_and_q5_1() {
    // qh is a little-endian u32 after the scale(s); bit i is bit 4 of element i.
    let qh: u32 = 0x8000_0001 | 0x0001_0000 | 0x0000_0100;
    let mut b = vec![0u8; 22];
    b[..2].copy_from_slice(&f16b(1.0));
    b[2..6].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        b[6 + j] = j as u8 | ((j as u8) << 4);
    }
    let y = deq(GgmlType::Q5_0, &b);
    let expect = |i: usize| {
        let hi = if [0, 8, 16, 31].contains(&i) {
            16.0
        } else {
            0.0
        };
        (i % 16) as f32 + hi - 16.0
    };
    for i in 0..32 {
        assert_eq!(y[i], expect(i), "Q5_0 element {i}");
    }
    let qh: u32 = 0xAAAA_AAAA;
    let mut b = vec![0u8; 24];
    b[..2].copy_from_slice(&f16b(0.5));
    b[2..4].copy_from_slice(&f16b(1.0));
    b[4..8].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        b[8 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q5_1, &b);
    for i in 0..32 {
        let lo = if i < 16 { i } else { 15 - (i - 16) } as f32;
        let hi = if i % 2 == 1 { 16.0 } else { 0.0 };
        assert_eq!(y[i], 0.5 * (lo + hi) + 1.0, "Q5_1 element {i}");
    }
}

#[test]
fn layout_q8_0() {
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&f16b(0.25));
    for j in 0..32 {
        b[2 + j] = (j as i8 - 16) as u8;
    }
    b[2 + 31] = 0x80; // -128
    let y = deq(GgmlType::Q8_0, &b);
    for j in 0..31 {
        assert_eq!(y[j], 0.25 * (j as f32 - 16.0));
    }
    assert_eq!(y[31], -32.0);
}

const K_SC: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 63];
const K_MN: [u8; 8] = [0, 1, 2, 3, 40, 50, 60, 63];
/// `K_SC`/`K_MN` packed by hand: bytes 0..4 = sc[0..4] | (sc[4..8] >> 4) << 6,
/// bytes 4..8 = mn[0..4] | (mn[4..8] >> 4) << 6, bytes 8..12 = sc[4..8] & 15 | (mn[4..8] & 15) << 4.
const K_SCALES: [u8; 12] = [1, 2, 3, 196, 128, 193, 194, 195, 133, 38, 199, 255];

#[test]
fn layout_k_scale_packing() {
    assert_eq!(pack_scale_min_k4(&K_SC, &K_MN), K_SCALES);
    for s in 0..8 {
        assert_eq!(scale_min_k4(s, &K_SCALES), (K_SC[s], K_MN[s]));
    }
}

#[test]
fn layout_q4_k() {
    let mut b = vec![0u8; 144];
    b[..2].copy_from_slice(&f16b(1.0));
    b[2..4].copy_from_slice(&f16b(0.5));
    b[4..16].copy_from_slice(&K_SCALES);
    for i in 0..128 {
        let l = (i % 16) as u8;
        b[16 + i] = l | ((15 - l) << 4);
    }
    let y = deq(GgmlType::Q4_K, &b);
    for c in 0..4 {
        for l in 0..32 {
            let q = (l % 16) as f32;
            let (s1, s2) = (2 * c, 2 * c + 1);
            assert_eq!(y[64 * c + l], K_SC[s1] as f32 * q - 0.5 * K_MN[s1] as f32);
            assert_eq!(
                y[64 * c + 32 + l],
                K_SC[s2] as f32 * (15.0 - q) - 0.5 * K_MN[s2] as f32
            );
        }
    }
}

#[test]
fn layout_q5_k() {
    let mut b = vec![0u8; 176];
    b[..2].copy_from_slice(&f16b(1.0));
    b[2..4].copy_from_slice(&f16b(0.5));
    b[4..16].copy_from_slice(&K_SCALES);
    for l in 0..32 {
        b[16 + l] = (l as u8) | if l == 3 { 0xC0 } else { 0 }; // qh[l]: bit s = sub-block s
    }
    for i in 0..128 {
        b[48 + i] = 0x21; // low nibble 1, high nibble 2
    }
    let y = deq(GgmlType::Q5_K, &b);
    for s in 0..8 {
        for l in 0..32 {
            let lo = if s % 2 == 0 { 1.0 } else { 2.0 };
            let bit = if s < 5 {
                (l >> s) & 1
            } else if l == 3 && s >= 6 {
                1
            } else {
                0
            };
            let q = lo + 16.0 * bit as f32;
            assert_eq!(
                y[32 * s + l],
                K_SC[s] as f32 * q - 0.5 * K_MN[s] as f32,
                "el {s},{l}"
            );
        }
    }
}

#[test]
fn layout_q6_k() {
    let mut b = vec![0u8; 210];
    let sc: Vec<i8> = (0..16)
        .map(|s| (s as i8 + 1) * if s % 2 == 1 { -1 } else { 1 })
        .collect();
    for s in 0..16 {
        b[192 + s] = sc[s] as u8;
    }
    b[208..210].copy_from_slice(&f16b(0.5));
    b[0] = 0x21; // el 0 low bits 1, el 64 low bits 2
    b[32 + 5] = 0x43; // el 37 low bits 3, el 101 low bits 4
    b[128 + 5] = 0b11_10_01_00; // qh: el 5 +0, el 37 +16, el 69 +32, el 101 +48
    b[64] = 0x0F; // second half: el 128 low bits 15
    b[128 + 32] = 0x03; // el 128 +48
    let y = deq(GgmlType::Q6_K, &b);
    let mut expect: Vec<f32> = (0..256).map(|e| 0.5 * sc[e / 16] as f32 * -32.0).collect();
    for (e, q) in [
        (0, 1),
        (64, 2),
        (5, 0),
        (37, 19),
        (69, 32),
        (101, 52),
        (128, 63),
    ] {
        expect[e] = 0.5 * sc[e / 16] as f32 * (q as f32 - 32.0);
    }
    assert_eq!(y, expect);
    assert_eq!(y[101], 70.0);
    assert_eq!(y[128], 139.5);
}

/// ggml's `kvalues_iq4nl`, written out again here so that a typo in the kernels' copy shows.
const KV: [f32; 16] = [
    -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0,
    89.0, 113.0,
];

#[test]
fn layout_q2_k() {
    // scales[16] | qs[64] | d | dmin. Sub-block s: scale s & 15 = s, min = (3s + 1) & 15.
    let mut b = vec![0u8; 84];
    for s in 0..16 {
        b[s] = s as u8 | ((((3 * s + 1) & 15) as u8) << 4);
    }
    // Byte i of qs holds four 2-bit fields; field f is (i + f) % 4.
    for i in 0..64 {
        b[16 + i] = (0..4).map(|f| (((i + f) % 4) as u8) << (2 * f)).sum();
    }
    b[80..82].copy_from_slice(&f16b(0.5));
    b[82..84].copy_from_slice(&f16b(0.25));
    let y = deq(GgmlType::Q2_K, &b);
    // ggml's walk: per 128-half n, per shift 2j, 16 elements of q[l] then 16 of q[l + 16],
    // each run with the next scale byte.
    let mut want = vec![];
    let mut is = 0;
    for n in 0..2 {
        for j in 0..4 {
            for h in 0..2 {
                let (sc, mn) = ((b[is] & 15) as f32, (b[is] >> 4) as f32);
                is += 1;
                for l in 0..16 {
                    let q = (b[16 + 32 * n + 16 * h + l] >> (2 * j)) & 3;
                    want.push(0.5 * sc * q as f32 - 0.25 * mn);
                }
            }
        }
    }
    assert_eq!(y, want);
    // Spot values: element 0 is field 0 of byte 0 (0), sub-block 0 (scale 0, min 1);
    // element 47 is field 1 of byte 15 (0), sub-block 2 (scale 2, min 7);
    // element 129 is field 0 of byte 33 (1), sub-block 8 (scale 8, min 9).
    assert_eq!(
        (y[0], y[47], y[129]),
        (-0.25, -1.75, 0.5 * 8.0 - 0.25 * 9.0)
    );
}

#[test]
fn layout_q3_k() {
    // hmask[32] | qs[64] | scales[12] | d. Scales packed by hand from 16 six-bit values: the
    // low nibbles in bytes 0..8 (s < 8 low, s ≥ 8 high nibble of byte s − 8), the high 2 bits
    // of scale s at bits 2·(s / 4) of byte 8 + s % 4.
    let sc6: Vec<u8> = (0..16).map(|s| ((13 * s + 5) % 64) as u8).collect();
    let mut b = vec![0u8; 110];
    for s in 0..16 {
        if s < 8 {
            b[96 + s] |= sc6[s] & 15;
        } else {
            b[96 + s - 8] |= (sc6[s] & 15) << 4;
        }
        b[96 + 8 + s % 4] |= (sc6[s] >> 4) << (2 * (s / 4));
    }
    for l in 0..32 {
        b[l] = (l * 37 + 11) as u8; // hmask
    }
    for i in 0..64 {
        b[32 + i] = (i * 73 + 29) as u8; // qs
    }
    b[108..110].copy_from_slice(&f16b(0.5));
    let y = deq(GgmlType::Q3_K, &b);
    // ggml's walk: the hmask bit m runs 1, 2, 4, … across both halves.
    let mut want = vec![];
    let (mut is, mut m) = (0, 1u8);
    for n in 0..2 {
        for j in 0..4 {
            for h in 0..2 {
                let dl = 0.5 * (sc6[is] as f32 - 32.0);
                is += 1;
                for l in 16 * h..16 * h + 16 {
                    let lo = (b[32 + 32 * n + l] >> (2 * j)) & 3;
                    let q = lo as i32 - if b[l] & m != 0 { 0 } else { 4 };
                    want.push(dl * q as f32);
                }
            }
            m <<= 1;
        }
    }
    assert_eq!(y, want);
    // Element 0: qs[0] = 29 → low bits 1, hmask[0] = 11 has bit 0 → q = 1; scale 5 − 32.
    assert_eq!(y[0], 0.5 * -27.0);
}

#[test]
fn layout_iq4_nl() {
    let mut b = vec![0u8; 18];
    b[..2].copy_from_slice(&f16b(0.5));
    for j in 0..16 {
        b[2 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::IQ4_NL, &b);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * KV[j], "element {j}");
        assert_eq!(y[j + 16], 0.5 * KV[15 - j], "element {}", j + 16);
    }
    assert_eq!((y[0], y[15], y[16]), (-63.5, 56.5, 56.5));
}

#[test]
fn layout_iq4_xs() {
    // d | scales_h (u16 LE) | scales_l[4] | qs[128]. Sub-block s: ls = nibble s of scales_l |
    // bits 2s.. of scales_h << 4; x = d·(ls − 32)·kv.
    let ls: Vec<u16> = (0..8).map(|s| (s * 9 + 3) % 64).collect();
    let mut b = vec![0u8; 136];
    b[..2].copy_from_slice(&f16b(0.25));
    let mut h = 0u16;
    for s in 0..8 {
        b[4 + s / 2] |= ((ls[s] & 15) as u8) << (4 * (s % 2));
        h |= (ls[s] >> 4) << (2 * s);
    }
    b[2..4].copy_from_slice(&h.to_le_bytes());
    for i in 0..128 {
        b[8 + i] = (i * 53 + 7) as u8;
    }
    let y = deq(GgmlType::IQ4_XS, &b);
    for s in 0..8 {
        let dl = 0.25 * (ls[s] as f32 - 32.0);
        for j in 0..16 {
            let q = b[8 + 16 * s + j];
            assert_eq!(y[32 * s + j], dl * KV[(q & 15) as usize], "{s} {j}");
            assert_eq!(y[32 * s + 16 + j], dl * KV[(q >> 4) as usize], "{s} {j}+16");
        }
    }
    // Element 0: qs[0] = 7 → −10; sub-block 0: ls = 3.
    assert_eq!(y[0], 0.25 * (3.0 - 32.0) * -10.0);
}
