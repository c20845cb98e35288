//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the merge table and llama.cpp's
//! rank-ordered merge loop (`llm_tokenizer_bpe_session`).

use super::*;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

pub(super) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

pub(super) fn build_bpe(
    md: &Metadata,
    vocab: &VocabTable,
    pre: PreType,
) -> Result<BpeModel, TokenizerError> {
    let merges_raw = md
        .get_strings(keys::TOK_MERGES)
        .ok_or(TokenizerError::MissingKey(keys::TOK_MERGES))?;
    let mut merges: HashMap<u64, (u32, u32), FxBuildHasher> =
        HashMap::with_capacity_and_hasher(merges_raw.len(), FxBuildHasher);
    let mut skipped = 0usize;
    let mut joined = String::new();
    for (rank, m) in merges_raw.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte.
        let Some(pos) = m
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&c| c == b' ')
            .map(|p| p + 1)
        else {
            skipped += 1;
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        let (Some(a_id), Some(b_id)) = (vocab.get(a), vocab.get(b)) else {
            // Could only ever apply to a symbol that is not a token itself.
            skipped += 1;
            continue;
        };
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        let new_id = vocab.get(&joined).unwrap_or(EMPTY);
        // First (lowest-rank) occurrence wins, like llama.cpp's bpe_ranks.emplace.
        merges
            .entry(pair_key(a_id, b_id))
            .or_insert((rank as u32, new_id));
    }
    if skipped > 0 {
        log::warn!("tokenizer: ignored {skipped} BPE merges whose parts are not tokens");
    }

    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in pre.regexes() {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(backend)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let (_, byte_inv) = byte_level_tables();
    Ok(BpeModel {
        pre: PreTokenizerWrapper::Sequence(Sequence::new(steps)),
        merges,
        ignore_merges: pre == PreType::Llama3,
        byte_inv,
    })
}

#[inline]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[derive(Clone, Copy)]
struct BpeSym {
    start: u32,
    len: u32,
    /// Token id of the symbol's text, EMPTY when it is not a token.
    id: u32,
    prev: i32,
    next: i32,
}

struct BpeBigram {
    rank: u32,
    left: u32,
    right: u32,
    llen: u32,
    rlen: u32,
    new_id: u32,
}

impl PartialEq for BpeBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for BpeBigram {}
impl PartialOrd for BpeBigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for BpeBigram {
    /// Max-heap order: lowest rank first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then_with(|| o.left.cmp(&self.left))
    }
}

impl BpeModel {
    pub(super) fn tokenize(
        &self,
        vocab: &VocabTable,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut pts = PreTokenizedString::from(text);
        self.pre.pre_tokenize(&mut pts).map_err(backend)?;
        let mut syms: Vec<BpeSym> = Vec::new();
        let mut heap: BinaryHeap<BpeBigram> = BinaryHeap::new();
        for (word, _, _) in pts.get_splits(OffsetReferential::Normalized, OffsetType::None) {
            if word.is_empty() {
                continue;
            }
            if self.ignore_merges
                && let Some(id) = vocab.get(word)
            {
                out.push(id);
                continue;
            }
            self.merge_word(vocab, word, &mut syms, &mut heap, out);
        }
        Ok(())
    }

    /// llama.cpp's `llm_tokenizer_bpe_session::tokenize` for one pre-tokenized word.
    fn merge_word(
        &self,
        vocab: &VocabTable,
        word: &str,
        syms: &mut Vec<BpeSym>,
        heap: &mut BinaryHeap<BpeBigram>,
        out: &mut Vec<u32>,
    ) {
        syms.clear();
        heap.clear();
        let n_chars = word.chars().count() as i32;
        let mut buf = [0u8; 4];
        for (i, (start, c)) in word.char_indices().enumerate() {
            let i = i as i32;
            let id = vocab.get(c.encode_utf8(&mut buf)).unwrap_or(EMPTY);
            syms.push(BpeSym {
                start: start as u32,
                len: c.len_utf8() as u32,
                id,
                prev: i - 1,
                next: if i + 1 == n_chars { -1 } else { i + 1 },
            });
        }
        let add = |syms: &[BpeSym], heap: &mut BinaryHeap<BpeBigram>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            if ls.id == EMPTY || rs.id == EMPTY {
                return;
            }
            if let Some(&(rank, new_id)) = self.merges.get(&pair_key(ls.id, rs.id)) {
                heap.push(BpeBigram {
                    rank,
                    left: l as u32,
                    right: r as u32,
                    llen: ls.len,
                    rlen: rs.len,
                    new_id,
                });
            }
        };
        for i in 1..syms.len() as i32 {
            add(syms, heap, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left as usize], syms[bg.right as usize]);
            if l.len == 0 || r.len == 0 || l.len != bg.llen || r.len != bg.rlen {
                continue; // outdated
            }
            {
                let ls = &mut syms[bg.left as usize];
                ls.len += r.len;
                ls.id = bg.new_id;
                ls.next = r.next;
            }
            syms[bg.right as usize].len = 0;
            if r.next >= 0 {
                syms[r.next as usize].prev = bg.left as i32;
            }
            add(syms, heap, l.prev, bg.left as i32);
            add(syms, heap, bg.left as i32, r.next);
        }
        let mut i = 0i32;
        while i >= 0 {
            let s = syms[i as usize];
            if s.id != EMPTY {
                out.push(s.id);
            } else {
                // Not a token: fall back to one token per (byte-level) char.
                let t = &word[s.start as usize..(s.start + s.len) as usize];
                for c in t.chars() {
                    if let Some(id) = vocab.get(c.encode_utf8(&mut buf)) {
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
    }

    /// llama.cpp's `llama_decode_text`: byte-level chars back to bytes; chars
    /// outside the table pass through as UTF-8.
    pub(super) fn decode_piece(&self, text: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(text.len());
        for c in text.chars() {
            let cp = c as usize;
            match self.byte_inv.get(cp) {
                Some(&b) if b >= 0 => v.push(b as u8),
                _ => {
                    let mut buf = [0u8; 4];
                    v.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        v
    }
}
