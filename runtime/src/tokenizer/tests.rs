use super::*;
use crate::gguf::{Array, Value};

/// A tiny SPM vocab: pieces with scores, bytes, control tokens.
fn spm_md() -> Metadata {
    let mut toks: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32, 0.0, 0.0];
    for b in 0..=255u32 {
        toks.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (t, s) in [
        ("▁", -1.0f32),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("he", -3.0),
        ("ll", -3.5),
        ("▁he", -4.0),
        ("llo", -4.5),
        ("▁hello", -5.0),
        ("hello", -6.0),
    ] {
        toks.push(t.into());
        types.push(1);
        scores.push(s);
    }
    let mut md = Metadata::default();
    md.insert(keys::TOK_MODEL, Value::String("llama".into()));
    md.insert(keys::TOK_TOKENS, Value::Array(Array::Strings(toks)));
    md.insert(keys::TOK_TYPES, Value::Array(Array::I32(types)));
    md.insert(keys::TOK_SCORES, Value::Array(Array::F32(scores)));
    md
}

fn id(t: &Tokenizer, s: &str) -> u32 {
    (0..t.vocab_size() as u32)
        .find(|&i| t.token_text(i) == s)
        .unwrap()
}

#[test]
fn tokenizer_spm_merges_by_score_and_byte_fallback() {
    let t = Tokenizer::from_gguf(&spm_md()).unwrap();
    assert_eq!(t.model_kind(), "llama");
    assert!(t.add_bos_default());
    assert_eq!(t.bos_id(), Some(1));
    let ids = t.encode("hello", false, false).unwrap();
    assert_eq!(ids, vec![id(&t, "▁hello")]);
    // "!" is not a piece: byte fallback 0x21.
    let ids = t.encode("hello!", true, false).unwrap();
    assert_eq!(ids, vec![1, id(&t, "▁hello"), 3 + 0x21]);
    assert_eq!(t.decode(&ids), "hello!");
    // Control text is literal unless parse_special.
    let lit = t.encode("</s>", false, false).unwrap();
    assert!(!lit.contains(&2));
    assert_eq!(
        t.encode("hello</s>", false, true).unwrap(),
        vec![id(&t, "▁hello"), 2]
    );
    assert!(t.is_eog(2));
}

#[test]
fn tokenizer_stream_decoder_holds_partial_utf8() {
    let t = Tokenizer::from_gguf(&spm_md()).unwrap();
    // "é" = C3 A9, sent as two byte tokens.
    let mut d = StreamDecoder::new(&t);
    assert_eq!(d.push(3 + 0xC3), "");
    assert_eq!(d.push(3 + 0xA9), "é");
    assert_eq!(d.push(3 + 0xF0), "");
    assert_eq!(d.finish(), "\u{FFFD}");
}

#[test]
fn tokenizer_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<StreamDecoder<'static>>();
}

#[test]
fn tokenizer_byte_level_table_roundtrip() {
    let (fwd, inv) = byte_level_tables();
    assert_eq!(fwd[b' ' as usize], 'Ġ');
    assert_eq!(fwd[b'\n' as usize], 'Ċ');
    for b in 0..256usize {
        assert_eq!(inv[fwd[b] as usize], b as i16);
    }
}

#[test]
fn tokenizer_rejects_unknown_model_and_pre() {
    let mut md = spm_md();
    md.insert(keys::TOK_MODEL, Value::String("bert".into()));
    assert!(
        matches!(Tokenizer::from_gguf(&md), Err(TokenizerError::UnsupportedModel(m)) if m == "bert")
    );
    let mut md = spm_md();
    md.insert(keys::TOK_MODEL, Value::String("gpt2".into()));
    md.insert(keys::TOK_PRE, Value::String("mystery".into()));
    md.insert(keys::TOK_MERGES, Value::Array(Array::Strings(vec![])));
    let e = Tokenizer::from_gguf(&md).unwrap_err();
    assert!(e.to_string().contains("mystery"), "{e}");
}
