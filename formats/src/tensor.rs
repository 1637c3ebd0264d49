//! Tensor types shared by the checkpoint readers: element type, metadata, borrowed data and the
//! byte range a scanned file holds, plus the overflow-checked element count.

/// Element type of a checkpoint tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Upper-case name as safetensors spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Name, type and shape of a tensor.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    /// PyTorch order, rows first.
    pub shape: Vec<usize>,
}

/// A tensor's bytes, borrowed from the memory map.
pub struct TensorData<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Contiguous little-endian elements.
    pub bytes: &'a [u8],
}

impl TensorData<'_> {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// The elements widened exactly to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.to_f32_into(&mut out);
        out
    }

    /// The elements widened exactly to f32, replacing the contents of `out` (its capacity is reused).
    pub fn to_f32_into(&self, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(self.n_elements());
        match self.dtype {
            DType::F32 => out.extend(
                self.bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }
}

/// One tensor found while scanning a file: meta and absolute byte range within that file.
#[derive(Clone, Debug)]
pub struct FileTensor {
    pub meta: TensorMeta,
    pub offset: usize,
    pub len: usize,
}

/// Row-major element count of `shape`, or None on overflow.
pub(crate) fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact() {
        let f16s = [
            half::f16::from_f32(1.5),
            half::f16::MAX,
            half::f16::MIN_POSITIVE_SUBNORMAL,
        ];
        let bytes: Vec<u8> = f16s.iter().flat_map(|v| v.to_le_bytes()).collect();
        let td = TensorData {
            dtype: DType::F16,
            shape: &[3],
            bytes: &bytes,
        };
        assert_eq!(td.n_elements(), 3);
        assert_eq!(td.to_f32(), vec![1.5, 65504.0, 2f32.powi(-24)]);
        let b = [
            half::bf16::from_f32(-3.0).to_le_bytes(),
            half::bf16::from_bits(0x3f81).to_le_bytes(),
        ]
        .concat();
        let td = TensorData {
            dtype: DType::BF16,
            shape: &[2],
            bytes: &b,
        };
        assert_eq!(td.to_f32(), vec![-3.0, f32::from_bits(0x3f81_0000)]);
        let b: Vec<u8> = [0.1f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let td = TensorData {
            dtype: DType::F32,
            shape: &[2],
            bytes: &b,
        };
        let mut out = vec![9.0; 10];
        td.to_f32_into(&mut out);
        assert_eq!(out, vec![0.1, -2.0]);
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(DType::F32.name(), "F32");
    }
}
