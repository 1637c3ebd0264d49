//! Fuzz target: the restricted unpickler and the PyTorch zip reader on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_formats::pickle::unpickle(data);
    let _ = kiln_formats::pickle::load_state_dict(data);
    if data.starts_with(b"PK") {
        let _ = kiln_formats::torch::read_tensors(Path::new("fuzz.bin"), data);
    }
});
