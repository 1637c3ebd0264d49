//! Fuzz target: GgufHeader::parse must never panic, whatever the bytes, and anything it accepts
//! must have every tensor's data inside the input.
#![no_main]

use kiln_formats::gguf::GgufHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = GgufHeader::parse(data) {
        for t in &h.tensors {
            let end = h.data_offset + t.offset + t.n_bytes();
            assert!(end <= data.len() as u64);
        }
    }
});
