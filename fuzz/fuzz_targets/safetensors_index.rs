//! Fuzz target: sharded-index JSON parsing and the safetensors header scan on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ =
        kiln_formats::checkpoint::parse_weight_map(Path::new("model.safetensors.index.json"), data);
    let _ = kiln_formats::safetensors::scan(Path::new("fuzz.safetensors"), data);
});
