//! safetensors (being written).
