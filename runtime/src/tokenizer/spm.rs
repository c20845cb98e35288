//! SentencePiece-style BPE by token score (`tokenizer.ggml.model = "llama"`), llama.cpp's
//! `llm_tokenizer_spm`.

use super::*;

/// The SPM model from GGUF metadata: scores, the `<0xXX>` byte tokens, `add_space_prefix`.
pub(super) fn build_spm(
    md: &Metadata,
    vocab: &VocabTable,
    n: usize,
) -> Result<SpmModel, TokenizerError> {
    let scores = match md.get_f32s(keys::TOK_SCORES) {
        Some(s) if s.len() == n => s.to_vec(),
        Some(_) => {
            return Err(TokenizerError::Invalid(format!(
                "{} length != token count",
                keys::TOK_SCORES
            )));
        }
        None => return Err(TokenizerError::MissingKey(keys::TOK_SCORES)),
    };
    let mut byte_tokens = [None; 256];
    for (b, slot) in byte_tokens.iter_mut().enumerate() {
        let hex = format!("<0x{b:02X}>");
        *slot = vocab.get(&hex).or_else(|| {
            std::str::from_utf8(&[b as u8])
                .ok()
                .and_then(|s| vocab.get(s))
        });
    }
    Ok(SpmModel {
        scores,
        byte_tokens,
        add_space_prefix: md.get_bool(keys::TOK_ADD_SPACE_PREFIX).unwrap_or(true),
    })
}

#[derive(Clone, Copy)]
struct SpmSym {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

struct SpmBigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for SpmBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for SpmBigram {}
impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for SpmBigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl SpmModel {
    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on already-escaped text.
    pub(super) fn tokenize(&self, vocab: &VocabTable, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<SpmSym> = Vec::with_capacity(text.len());
        for (idx, (start, c)) in text.char_indices().enumerate() {
            let idx = idx as isize;
            let len = c.len_utf8();
            let end = start + len;
            syms.push(SpmSym {
                start,
                len,
                prev: idx - 1,
                next: if end == text.len() { -1 } else { idx + 1 },
            });
        }
        if syms.is_empty() {
            return;
        }
        let mut heap = BinaryHeap::new();
        let try_add =
            |syms: &[SpmSym], heap: &mut BinaryHeap<SpmBigram>, left: isize, right: isize| {
                if left < 0 || right < 0 {
                    return;
                }
                let (l, r) = (syms[left as usize], syms[right as usize]);
                let s = &text[l.start..l.start + l.len + r.len];
                if let Some(id) = vocab.get(s) {
                    heap.push(SpmBigram {
                        left: left as usize,
                        right: right as usize,
                        score: self.scores[id as usize],
                        size: s.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(&syms, &mut heap, i as isize - 1, i as isize);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if r.next >= 0 {
                syms[r.next as usize].prev = bg.left as isize;
            }
            let prev = syms[bg.left].prev;
            let next = syms[bg.left].next;
            try_add(&syms, &mut heap, prev, bg.left as isize);
            try_add(&syms, &mut heap, bg.left as isize, next);
        }
        let mut i = 0isize;
        while i != -1 {
            let s = syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match vocab.get(piece) {
                Some(id) => out.push(id),
                None => {
                    // Merged symbols are always tokens, so only single chars
                    // land here: emit their bytes.
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize] {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }
}
