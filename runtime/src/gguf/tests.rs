use super::*;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv(keys::ARCHITECTURE, Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(2))
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv(
            keys::TOK_TOKENS,
            Value::Array(Array::Strings(vec!["a".into(), "b".into()])),
        )
        .kv(keys::TOK_ADD_BOS, Value::Bool(true))
        .tensor(
            "w",
            &[4, 2],
            GgmlType::F32,
            f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
        )
        .tensor("v", &[3], GgmlType::F32, f32_bytes(&[9., 10., 11.]));
    w
}

#[test]
fn round_trip_metadata_and_tensors() {
    let g = parse_bytes(&sample().to_bytes()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata.architecture(), Some("llama"));
    assert_eq!(g.metadata.arch_u64("llama", ArchKey::BlockCount), Some(2));
    assert_eq!(
        g.metadata.arch_f64("llama", ArchKey::RopeFreqBase),
        Some(10000.0)
    );
    assert_eq!(
        g.metadata.get_strings(keys::TOK_TOKENS).unwrap(),
        &["a".to_string(), "b".to_string()]
    );
    assert_eq!(g.metadata.get_bool(keys::TOK_ADD_BOS), Some(true));
    let w = g.tensor("w").unwrap();
    assert_eq!(w.rows_cols(), (2, 4));
    assert_eq!(
        g.tensor_bytes(w),
        &f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.])[..]
    );
    let v = g.tensor("v").unwrap();
    assert_eq!(v.offset % 32, 0);
    assert_eq!(g.tensor_bytes(v), &f32_bytes(&[9., 10., 11.])[..]);
    assert!(g.tensor("missing").is_none());
    assert!(matches!(
        g.require_tensor("missing"),
        Err(GgufError::MissingTensor { .. })
    ));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample().to_bytes();
    for cut in 0..bytes.len() - 1 {
        match parse_bytes(&bytes[..cut]) {
            Err(GgufError::Truncated { .. }) | Err(GgufError::DataPastEnd { .. }) => {}
            Err(e) => panic!("cut at {cut}: unexpected error kind {e}"),
            Ok(_) => {
                // Only acceptable if the cut fell in trailing tensor padding: not here,
                // the last tensor ends the file.
                panic!("cut at {cut} parsed")
            }
        }
    }
}

/// A cheap stable-toolchain cousin of the cargo-fuzz target: thousands of
/// seeded byte mutations of a valid file must each parse or fail cleanly.
#[test]
fn mutated_files_never_panic() {
    let base = sample().to_bytes();
    let mut rng = crate::sample::Rng::new(7);
    let mut parsed = 0;
    for _ in 0..5000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() % b.len() as u64) as usize;
            b[i] = match rng.next_u64() % 3 {
                0 => rng.next_u64() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        if let Ok(g) = parse_bytes(&b) {
            parsed += 1;
            for t in &g.tensors {
                assert_eq!(g.tensor_bytes(t).len() as u64, t.n_bytes);
            }
        }
    }
    // Mutations in tensor data leave the file valid; most others do not.
    assert!(parsed > 0 && parsed < 5000, "{parsed}");
}

#[test]
fn bad_magic_and_version() {
    let mut b = sample().to_bytes();
    b[0] = b'X';
    assert!(matches!(parse_bytes(&b), Err(GgufError::BadMagic { .. })));
    let mut b = sample().to_bytes();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    let e = parse_bytes(&b).unwrap_err();
    assert!(matches!(
        e,
        GgufError::UnsupportedVersion { version: 7, .. }
    ));
    assert!(e.to_string().contains("unsupported GGUF version 7"));
    let mut w = sample();
    w.version = 2;
    assert_eq!(parse_bytes(&w.to_bytes()).unwrap().version, 2);
}

#[test]
fn dims_overflow_and_unknown_type() {
    let mut w = GgufWriter::new();
    w.tensor("big", &[u64::MAX / 2, 4], GgmlType::F32, vec![]);
    assert!(matches!(
        parse_bytes(&w.to_bytes()),
        Err(GgufError::DimsOverflow { .. })
    ));
    let mut w = GgufWriter::new();
    w.tensor("t", &[32], GgmlType::F32, vec![0; 128]);
    let mut b = w.to_bytes();
    // The type id sits right after name (8+1), n_dims (4) and one dim (8).
    let p = 24 + 8 + 1 + 4 + 8;
    b[p..p + 4].copy_from_slice(&999u32.to_le_bytes());
    assert!(matches!(
        parse_bytes(&b),
        Err(GgufError::UnknownType { type_id: 999, .. })
    ));
}

#[test]
fn data_past_end() {
    let mut w = GgufWriter::new();
    w.tensor("t", &[64], GgmlType::F32, vec![0; 64]); // 256 bytes declared, 64 present
    let e = parse_bytes(&w.to_bytes()).unwrap_err();
    assert!(matches!(e, GgufError::DataPastEnd { .. }), "{e}");
}
