//! Fuzz the GGUF parser: any byte string must parse or fail with an error,
//! never panic, overflow or read out of bounds; and whatever parses must give
//! tensor views that lie inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = ember_runtime::gguf::parse_bytes(data) {
        for t in &g.tensors {
            let b = g.tensor_bytes(t);
            assert_eq!(b.len() as u64, t.n_bytes);
        }
        let _ = ember_runtime::tokenizer::Tokenizer::from_gguf(&g.metadata);
    }
});
