//! sentencepiece (being written).
