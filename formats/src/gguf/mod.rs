//! GGUF v3: value types, a validating mmap reader and a streaming writer (spec §1.1).
