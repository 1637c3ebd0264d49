//! `#[repr(C)]` ggml block structs, with their exact little-endian byte encodings (spec §3.1–3.11).
//!
//! The structs mirror ggml's `block_*` layouts field for field; each has a compile-time check that
//! its size equals [`GgmlType::type_size`]. Bytes are converted explicitly (`from_bytes` /
//! `to_bytes`), never by transmuting, so the code is safe and endian-independent.

use half::f16;

use crate::types::GgmlType;

/// Elements per legacy block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// Copies `N` bytes starting at `off` (offsets are compile-time layout constants).
fn take<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

fn take_f16(b: &[u8], off: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes(take::<2>(b, off)))
}

fn put(out: &mut [u8], off: usize, src: &[u8]) {
    out[off..off + src.len()].copy_from_slice(src);
}

fn put_f16(out: &mut [u8], off: usize, v: f16) {
    put(out, off, &v.to_bits().to_le_bytes());
}

fn i8s<const N: usize>(a: [u8; N]) -> [i8; N] {
    a.map(|v| v as i8)
}

fn u8s<const N: usize>(a: [i8; N]) -> [u8; N] {
    a.map(|v| v as u8)
}

macro_rules! assert_block_size {
    ($t:ty, $g:expr) => {
        const _: () = assert!(std::mem::size_of::<$t>() == $g.type_size());
        impl $t {
            /// Bytes of one block.
            pub const BYTES: usize = $g.type_size();
            /// The ggml type of this block.
            pub const TYPE: GgmlType = $g;
        }
    };
}

/// Q4_0: `d:f16 | qs[16]`. `qs[j]` low nibble = element j, high nibble = element j+16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
assert_block_size!(BlockQ4_0, GgmlType::Q4_0);

impl BlockQ4_0 {
    pub fn from_bytes(b: &[u8; 18]) -> Self {
        Self {
            d: take_f16(b, 0),
            qs: take(b, 2),
        }
    }
    pub fn to_bytes(&self) -> [u8; 18] {
        let mut o = [0u8; 18];
        put_f16(&mut o, 0, self.d);
        put(&mut o, 2, &self.qs);
        o
    }
}

/// Q4_1: `d:f16 | m:f16 | qs[16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
assert_block_size!(BlockQ4_1, GgmlType::Q4_1);

impl BlockQ4_1 {
    pub fn from_bytes(b: &[u8; 20]) -> Self {
        Self {
            d: take_f16(b, 0),
            m: take_f16(b, 2),
            qs: take(b, 4),
        }
    }
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut o = [0u8; 20];
        put_f16(&mut o, 0, self.d);
        put_f16(&mut o, 2, self.m);
        put(&mut o, 4, &self.qs);
        o
    }
}

/// Q5_0: `d:f16 | qh[4] | qs[16]`. `qh` is a LE u32 holding bit 4 of element j in bit j.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
assert_block_size!(BlockQ5_0, GgmlType::Q5_0);

impl BlockQ5_0 {
    pub fn from_bytes(b: &[u8; 22]) -> Self {
        Self {
            d: take_f16(b, 0),
            qh: take(b, 2),
            qs: take(b, 6),
        }
    }
    pub fn to_bytes(&self) -> [u8; 22] {
        let mut o = [0u8; 22];
        put_f16(&mut o, 0, self.d);
        put(&mut o, 2, &self.qh);
        put(&mut o, 6, &self.qs);
        o
    }
}

/// Q5_1: `d:f16 | m:f16 | qh[4] | qs[16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
assert_block_size!(BlockQ5_1, GgmlType::Q5_1);

impl BlockQ5_1 {
    pub fn from_bytes(b: &[u8; 24]) -> Self {
        Self {
            d: take_f16(b, 0),
            m: take_f16(b, 2),
            qh: take(b, 4),
            qs: take(b, 8),
        }
    }
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut o = [0u8; 24];
        put_f16(&mut o, 0, self.d);
        put_f16(&mut o, 2, self.m);
        put(&mut o, 4, &self.qh);
        put(&mut o, 8, &self.qs);
        o
    }
}

/// Q8_0: `d:f16 | qs[32] (int8)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
assert_block_size!(BlockQ8_0, GgmlType::Q8_0);

impl BlockQ8_0 {
    pub fn from_bytes(b: &[u8; 34]) -> Self {
        Self {
            d: take_f16(b, 0),
            qs: i8s(take(b, 2)),
        }
    }
    pub fn to_bytes(&self) -> [u8; 34] {
        let mut o = [0u8; 34];
        put_f16(&mut o, 0, self.d);
        put(&mut o, 2, &u8s(self.qs));
        o
    }
}

/// Q2_K: `scales[16] | qs[64] | d:f16 | dmin:f16`. Scale byte: low nibble scale, high nibble min.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
assert_block_size!(BlockQ2K, GgmlType::Q2K);

impl BlockQ2K {
    pub fn from_bytes(b: &[u8; 84]) -> Self {
        Self {
            scales: take(b, 0),
            qs: take(b, 16),
            d: take_f16(b, 80),
            dmin: take_f16(b, 82),
        }
    }
    pub fn to_bytes(&self) -> [u8; 84] {
        let mut o = [0u8; 84];
        put(&mut o, 0, &self.scales);
        put(&mut o, 16, &self.qs);
        put_f16(&mut o, 80, self.d);
        put_f16(&mut o, 82, self.dmin);
        o
    }
}

/// Q3_K: `hmask[32] | qs[64] | scales[12] | d:f16`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}
assert_block_size!(BlockQ3K, GgmlType::Q3K);

impl BlockQ3K {
    pub fn from_bytes(b: &[u8; 110]) -> Self {
        Self {
            hmask: take(b, 0),
            qs: take(b, 32),
            scales: take(b, 96),
            d: take_f16(b, 108),
        }
    }
    pub fn to_bytes(&self) -> [u8; 110] {
        let mut o = [0u8; 110];
        put(&mut o, 0, &self.hmask);
        put(&mut o, 32, &self.qs);
        put(&mut o, 96, &self.scales);
        put_f16(&mut o, 108, self.d);
        o
    }
}

/// Q4_K: `d:f16 | dmin:f16 | scales[12] | qs[128]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
assert_block_size!(BlockQ4K, GgmlType::Q4K);

impl BlockQ4K {
    pub fn from_bytes(b: &[u8; 144]) -> Self {
        Self {
            d: take_f16(b, 0),
            dmin: take_f16(b, 2),
            scales: take(b, 4),
            qs: take(b, 16),
        }
    }
    pub fn to_bytes(&self) -> [u8; 144] {
        let mut o = [0u8; 144];
        put_f16(&mut o, 0, self.d);
        put_f16(&mut o, 2, self.dmin);
        put(&mut o, 4, &self.scales);
        put(&mut o, 16, &self.qs);
        o
    }
}

/// Q5_K: `d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
assert_block_size!(BlockQ5K, GgmlType::Q5K);

impl BlockQ5K {
    pub fn from_bytes(b: &[u8; 176]) -> Self {
        Self {
            d: take_f16(b, 0),
            dmin: take_f16(b, 2),
            scales: take(b, 4),
            qh: take(b, 16),
            qs: take(b, 48),
        }
    }
    pub fn to_bytes(&self) -> [u8; 176] {
        let mut o = [0u8; 176];
        put_f16(&mut o, 0, self.d);
        put_f16(&mut o, 2, self.dmin);
        put(&mut o, 4, &self.scales);
        put(&mut o, 16, &self.qh);
        put(&mut o, 48, &self.qs);
        o
    }
}

/// Q6_K: `ql[128] | qh[64] | scales[16] (int8) | d:f16`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
assert_block_size!(BlockQ6K, GgmlType::Q6K);

impl BlockQ6K {
    pub fn from_bytes(b: &[u8; 210]) -> Self {
        Self {
            ql: take(b, 0),
            qh: take(b, 128),
            scales: i8s(take(b, 192)),
            d: take_f16(b, 208),
        }
    }
    pub fn to_bytes(&self) -> [u8; 210] {
        let mut o = [0u8; 210];
        put(&mut o, 0, &self.ql);
        put(&mut o, 128, &self.qh);
        put(&mut o, 192, &u8s(self.scales));
        put_f16(&mut o, 208, self.d);
        o
    }
}

/// Q8_K: `d:f32 | qs[256] (int8) | bsums[16] (int16)`. Intermediate type, never stored in files.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
assert_block_size!(BlockQ8K, GgmlType::Q8K);

impl BlockQ8K {
    pub fn from_bytes(b: &[u8; 292]) -> Self {
        let mut bsums = [0i16; QK_K / 16];
        for (k, s) in bsums.iter_mut().enumerate() {
            *s = i16::from_le_bytes(take::<2>(b, 260 + 2 * k));
        }
        Self {
            d: f32::from_le_bytes(take::<4>(b, 0)),
            qs: i8s(take(b, 4)),
            bsums,
        }
    }
    pub fn to_bytes(&self) -> [u8; 292] {
        let mut o = [0u8; 292];
        put(&mut o, 0, &self.d.to_le_bytes());
        put(&mut o, 4, &u8s(self.qs));
        for (k, s) in self.bsums.iter().enumerate() {
            put(&mut o, 260 + 2 * k, &s.to_le_bytes());
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern<const N: usize>() -> [u8; N] {
        let mut a = [0u8; N];
        for (i, v) in a.iter_mut().enumerate() {
            *v = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        a
    }

    macro_rules! round_trip {
        ($t:ty, $n:expr) => {{
            let b = pattern::<$n>();
            assert_eq!(<$t>::from_bytes(&b).to_bytes(), b);
            assert_eq!(<$t>::BYTES, $n);
        }};
    }

    #[test]
    fn byte_round_trips() {
        round_trip!(BlockQ4_0, 18);
        round_trip!(BlockQ4_1, 20);
        round_trip!(BlockQ5_0, 22);
        round_trip!(BlockQ5_1, 24);
        round_trip!(BlockQ8_0, 34);
        round_trip!(BlockQ2K, 84);
        round_trip!(BlockQ3K, 110);
        round_trip!(BlockQ4K, 144);
        round_trip!(BlockQ5K, 176);
        round_trip!(BlockQ6K, 210);
        round_trip!(BlockQ8K, 292);
    }

    #[test]
    fn field_offsets() {
        let b = pattern::<84>();
        let q = BlockQ2K::from_bytes(&b);
        assert_eq!(q.d.to_bits(), u16::from_le_bytes([b[80], b[81]]));
        let b = pattern::<292>();
        let q = BlockQ8K::from_bytes(&b);
        assert_eq!(q.bsums[15], i16::from_le_bytes([b[290], b[291]]));
    }
}
