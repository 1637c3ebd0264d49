//! kiln-formats: readers and writers for the files a Llama user holds: safetensors, PyTorch zip
//! checkpoints (restricted unpickler), SentencePiece models, HF/PEFT configs and GGUF.

pub mod atomic;
pub mod checkpoint;
mod checkpoint_error;
pub mod gguf;
pub mod hf;
pub mod imatrix;
pub mod mmap;
pub mod pickle;
pub mod safetensors;
pub mod sentencepiece;
mod tensor;
pub mod torch;
