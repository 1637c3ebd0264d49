//! hf (being written).
