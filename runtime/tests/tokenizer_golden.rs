//! Tokenizer conformance against llama.cpp:
//! * llama.cpp's `test-tokenizer-0` golden files (`ggml-vocab-*.gguf` + `.inp`/`.out`),
//!   tokenized like that test does: no BOS/EOS (`add_special = false`), special
//!   text not parsed;
//! * reference tokenizations of real prompts (llama.cpp, special tokens parsed);
//! * chat templates embedded in the real models;
//! * streaming detokenization.
//!
//! Files live in `$EMBER_MODELS` or `<repo>/models/cache`; run `models/fetch.sh`
//! to get them. Missing files fail the tests (they are not skipped).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ember_runtime::chat::{ChatMessage, ChatTemplate, render_chatml};
use ember_runtime::gguf::GgufFile;
use ember_runtime::tokenizer::{StreamDecoder, Tokenizer};

fn cache_dir() -> PathBuf {
    match std::env::var_os("EMBER_MODELS") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cache"),
    }
}

fn require(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "missing test file {}: run `models/fetch.sh` (or set EMBER_MODELS to the cache directory)",
        path.display()
    );
    path
}

fn load(path: &Path) -> (Tokenizer, GgufFile, f64) {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&f.metadata)
        .unwrap_or_else(|e| panic!("tokenizer for {}: {e}", path.display()));
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "tokenizer {}: from_gguf {:.1} ms ({} tokens)",
        path.file_name().unwrap().to_string_lossy(),
        ms,
        tok.vocab_size()
    );
    (tok, f, ms)
}

/// llama.cpp's test-tokenizer-0 reads the `.inp` file as cases each followed
/// by "\n__ggml_vocab_test__\n", and the `.out` file as one line of ids per case.
fn golden(name: &str) {
    let dir = cache_dir().join("vocab");
    let gguf = require(dir.join(format!("ggml-vocab-{name}.gguf")));
    let inp =
        std::fs::read_to_string(require(dir.join(format!("ggml-vocab-{name}.gguf.inp")))).unwrap();
    let out =
        std::fs::read_to_string(require(dir.join(format!("ggml-vocab-{name}.gguf.out")))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut cases = Vec::new();
    let mut rest = inp.as_str();
    while let Some(p) = rest.find(sep) {
        cases.push(&rest[..p]);
        rest = &rest[p + sep.len()..];
    }
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|x| x.parse::<u32>().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        cases.len(),
        expected.len(),
        "{name}: .inp/.out case counts differ"
    );
    assert!(
        cases.len() >= 40,
        "{name}: only {} cases parsed",
        cases.len()
    );

    let (tok, _f, _) = load(&gguf);
    let mut failures = Vec::new();
    for (text, want) in cases.iter().zip(&expected) {
        let got = tok.encode(text, false, false).unwrap();
        if &got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {}/{} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_llama_spm() {
    golden("llama-spm");
}

#[test]
fn golden_llama_bpe() {
    golden("llama-bpe");
}

#[test]
fn golden_qwen2() {
    golden("qwen2");
}

#[test]
fn golden_gpt2() {
    golden("gpt-2");
}

#[test]
fn golden_llama_spm_decode_roundtrip() {
    let (tok, _f, _) = load(&require(
        cache_dir().join("vocab/ggml-vocab-llama-spm.gguf"),
    ));
    for text in [
        "Hello world",
        " Hello World!",
        "this is 🦙.cpp",
        "Привет мир",
        "\n\n  tabs\tand spaces  ",
    ] {
        let ids = tok.encode(text, false, false).unwrap();
        assert_eq!(tok.decode(&ids), text, "ids {ids:?}");
        let with_bos = tok.encode(text, true, false).unwrap();
        assert_eq!(with_bos[0], tok.bos_id().unwrap());
        assert_eq!(tok.decode(&with_bos), text);
    }
}

struct RefCase {
    prompt: &'static str,
    add_bos: bool,
    ids: &'static [u32],
}

/// The prompts' token ids from llama.cpp 0c1e570, as in `tests/fixtures/dev-smollm2-135m-instruct-q4_1.json`.
const SMOL_CASES: &[RefCase] = &[
    RefCase {
        prompt: "The capital of France is",
        add_bos: false,
        ids: &[504, 3575, 282, 4649, 314],
    },
    RefCase {
        prompt: "Once upon a time, in a small village,",
        add_bos: false,
        ids: &[6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28],
    },
    RefCase {
        prompt: "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        add_bos: false,
        ids: &[
            1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198,
        ],
    },
    RefCase {
        prompt: "def add(a, b):\n    return",
        add_bos: false,
        ids: &[1604, 803, 24, 81, 28, 278, 727, 472, 1003],
    },
    RefCase {
        prompt: "Edge devices like the Jetson Orin run language models",
        add_bos: false,
        ids: &[
            36270, 3381, 702, 260, 530, 1175, 258, 1816, 254, 1658, 1789, 2859,
        ],
    },
];

/// The prompts' token ids from llama.cpp 0c1e570, as in `tests/fixtures/dev-qwen2.5-coder-0.5b-instruct-q4_k_m.json`.
const QWEN_CASES: &[RefCase] = &[
    RefCase {
        prompt: "def fibonacci(n):",
        add_bos: false,
        ids: &[750, 75698, 1445, 1648],
    },
    RefCase {
        prompt: "The three pillars of latency are",
        add_bos: false,
        ids: &[785, 2326, 63882, 315, 39270, 525],
    },
    RefCase {
        prompt: "<|im_start|>user\nWrite a haiku about memory bandwidth.<|im_end|>\n<|im_start|>assistant\n",
        add_bos: false,
        ids: &[
            151644, 872, 198, 7985, 264, 6386, 38242, 911, 4938, 33394, 13, 151645, 198, 151644,
            77091, 198,
        ],
    },
];

/// (generated ids, llama.cpp's generated text) pairs from the same references.
const SMOL_GEN: &[(&[u32], &str)] = &[(
    &[
        7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33, 2215, 701,
        30, 198, 198, 504, 1797, 1918,
    ],
    " Paris.\n\nThe United States has a population of approximately 311 million people.\n\nThe United States",
)];
const QWEN_GEN: &[(&[u32], &str)] = &[(
    &[
        198, 262, 421, 308, 2651, 220, 15, 510, 286, 470, 330, 7928, 1946, 698, 262, 4409, 308,
        621, 220, 16, 510, 286, 470, 220,
    ],
    "\n    if n <= 0:\n        return \"Invalid input\"\n    elif n == 1:\n        return ",
)];

fn check_reference(
    file: &str,
    cases: &[RefCase],
    gen_cases: &[(&[u32], &str)],
    pre: &str,
) -> Tokenizer {
    let (tok, _f, _) = load(&require(cache_dir().join(file)));
    assert_eq!(tok.model_kind(), "gpt2");
    assert_eq!(tok.pre_kind(), pre);
    assert!(
        !tok.add_bos_default(),
        "{file}: add_bos_token is false in the GGUF"
    );
    for c in cases {
        let ids = tok.encode(c.prompt, c.add_bos, true).unwrap();
        assert_eq!(ids, c.ids, "{file}: {:?}", c.prompt);
        // Round trip: control tokens rendered when asked, hidden otherwise.
        assert_eq!(tok.decode_with_special(&ids, true), c.prompt);
        let plain: String = c
            .prompt
            .replace("<|im_start|>", "")
            .replace("<|im_end|>", "");
        assert_eq!(tok.decode(&ids), plain);
    }
    for (ids, text) in gen_cases {
        assert_eq!(tok.decode(ids), *text, "{file}: decode of generated ids");
        let mut sd = StreamDecoder::new(&tok);
        let mut streamed: String = ids.iter().map(|&i| sd.push(i)).collect();
        streamed.push_str(&sd.finish());
        assert_eq!(streamed, *text);
    }
    // Without parse_special the control text is plain text.
    let lit = tok.encode("<|im_start|>", false, false).unwrap();
    assert!(
        lit.len() > 1,
        "{file}: literal <|im_start|> should be several tokens, got {lit:?}"
    );
    assert_eq!(tok.decode(&lit), "<|im_start|>");
    tok
}

#[test]
fn reference_smollm2() {
    let tok = check_reference(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        SMOL_CASES,
        SMOL_GEN,
        "smollm",
    );
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(tok.is_eog(2), "<|im_end|>");
    assert!(tok.is_eog(0), "<|endoftext|>");
    assert!(!tok.is_eog(1), "<|im_start|>");
    assert!(!tok.is_eog(504));
    assert_eq!(tok.token_text(1), "<|im_start|>");
    assert_eq!(tok.token_bytes(1), b"<|im_start|>");
    assert_eq!(tok.token_bytes(7042), b" Paris");
}

#[test]
fn reference_qwen25() {
    let tok = check_reference(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        QWEN_CASES,
        QWEN_GEN,
        "qwen2",
    );
    assert_eq!(tok.vocab_size(), 151936);
    assert_eq!(tok.eos_id(), Some(151645));
    assert!(tok.is_eog(151645), "<|im_end|>");
    assert!(tok.is_eog(151643), "<|endoftext|>");
    assert!(!tok.is_eog(151644), "<|im_start|>");
    assert!(!tok.is_eog(198));
    // <tool_call> is user-defined: recognised even without parse_special.
    assert_eq!(
        tok.encode("<tool_call>", false, false).unwrap(),
        vec![151657]
    );
    assert_eq!(tok.token_bytes(198), b"\n");
}

/// The whole Qwen2.5 vocabulary (151936 tokens, 151387 merges) builds, and building it again
/// gives a tokenizer that encodes and decodes the same. How long building takes is a measurement,
/// not a check: `cargo run --release -p ember-runtime --example tokenizer_load`.
#[test]
fn qwen_vocab_builds_the_same_twice() {
    let f = GgufFile::open(require(
        cache_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ))
    .unwrap();
    let a = Tokenizer::from_gguf(&f.metadata).unwrap();
    let b = Tokenizer::from_gguf(&f.metadata).unwrap();
    assert_eq!((a.vocab_size(), b.vocab_size()), (151936, 151936));
    let text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # 数 🦙";
    let ids = a.encode(text, false, true).unwrap();
    assert_eq!(b.encode(text, false, true).unwrap(), ids);
    assert!(
        ids.len() > 20 && ids.len() < text.len(),
        "merges applied: {ids:?}"
    );
    assert_eq!(a.decode(&ids), text);
}

#[test]
fn stream_decoder_emoji_over_byte_tokens() {
    // SPM: 🦙 has no piece, so it is four <0xXX> byte tokens.
    let (tok, _f, _) = load(&require(
        cache_dir().join("vocab/ggml-vocab-llama-spm.gguf"),
    ));
    let ids = tok.encode("🦙!", false, false).unwrap();
    assert_eq!(ids, vec![29871, 243, 162, 169, 156, 29991]);
    let mut sd = StreamDecoder::new(&tok);
    let chunks: Vec<String> = ids.iter().map(|&i| sd.push(i)).collect();
    assert_eq!(chunks, vec![" ", "", "", "", "🦙", "!"]);
    assert_eq!(sd.finish(), "");

    // Byte-level BPE: a ZWJ emoji sequence split into byte pieces.
    let (tok, _f, _) = load(&require(
        cache_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ));
    let text = "ok 😶‍🌫️ 🦙🦙 done";
    let ids = tok.encode(text, false, false).unwrap();
    let mut sd = StreamDecoder::new(&tok);
    let mut out = String::new();
    let mut partial_steps = 0;
    for &i in &ids {
        let c = sd.push(i);
        assert!(!c.contains('\u{FFFD}'), "chunk {c:?}");
        if c.is_empty() {
            partial_steps += 1;
        }
        out.push_str(&c);
    }
    out.push_str(&sd.finish());
    assert_eq!(out, text);
    assert!(
        partial_steps > 0,
        "expected some emoji split across tokens: {ids:?}"
    );
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are a terse assistant."),
        ChatMessage::new("user", "What is 2+2?"),
    ]
}

const EXPECTED_CHATML: &str = "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn chat_template_smollm2() {
    let f = GgufFile::open(require(cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"))).unwrap();
    let t = ChatTemplate::from_metadata(&f.metadata)
        .expect("SmolLM2 has a template")
        .unwrap();
    assert_eq!(t.render(&conversation(), true).unwrap(), EXPECTED_CHATML);
    assert_eq!(render_chatml(&conversation(), true), EXPECTED_CHATML);
    // No system message: the template's default one is inserted.
    let out = t
        .render(&[ChatMessage::new("user", "What is 2+2?")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    // The rendered prompt tokenizes like llama.cpp's reference (user-only part).
    let tok = Tokenizer::from_gguf(&f.metadata).unwrap();
    let user_only = out.split_once("<|im_end|>\n").unwrap().1;
    assert_eq!(
        tok.encode(user_only, false, true).unwrap(),
        SMOL_CASES[2].ids
    );
}

#[test]
fn chat_template_qwen25() {
    let f = GgufFile::open(require(
        cache_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ))
    .unwrap();
    let t = ChatTemplate::from_metadata(&f.metadata)
        .expect("Qwen2.5 has a template")
        .unwrap();
    assert_eq!(t.render(&conversation(), true).unwrap(), EXPECTED_CHATML);
    assert_eq!(
        t.render(&conversation(), false).unwrap(),
        EXPECTED_CHATML
            .strip_suffix("<|im_start|>assistant\n")
            .unwrap()
    );
    let out = t
        .render(
            &[ChatMessage::new(
                "user",
                "Write a haiku about memory bandwidth.",
            )],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a haiku about memory bandwidth.<|im_end|>\n<|im_start|>assistant\n"
    );
    let tok = Tokenizer::from_gguf(&f.metadata).unwrap();
    let user_only = out.split_once("<|im_end|>\n").unwrap().1;
    assert_eq!(
        tok.encode(user_only, false, true).unwrap(),
        QWEN_CASES[2].ids
    );
}

#[test]
fn chat_template_fallback_chatml_without_template() {
    let f = GgufFile::open(require(cache_dir().join("vocab/ggml-vocab-llama-bpe.gguf"))).unwrap();
    assert!(ChatTemplate::from_metadata(&f.metadata).is_none());
    let t = ChatTemplate::from_metadata_or_builtin(&f.metadata).unwrap();
    assert_eq!(t.render(&conversation(), true).unwrap(), EXPECTED_CHATML);
}
