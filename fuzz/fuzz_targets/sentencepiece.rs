//! Fuzz target: SentencePiece `tokenizer.model` parsing must never panic on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = kiln_formats::sentencepiece::SpModel::parse(data) {
        // A parsed model is internally consistent: every piece maps back to its own id.
        for (i, p) in m.pieces.iter().enumerate() {
            assert_eq!(m.piece_to_id(&p.piece), Some(i as u32));
        }
    }
});
