//! GGUF metadata value types and values (spec §1.1): the 13 type ids, scalar values and
//! homogeneous arrays, with typed accessors and JSON conversion.

use std::fmt;

/// A GGUF metadata value type, with its on-disk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// Every type, in id order.
    pub const ALL: [GgufValueType; 13] = [
        GgufValueType::U8,
        GgufValueType::I8,
        GgufValueType::U16,
        GgufValueType::I16,
        GgufValueType::U32,
        GgufValueType::I32,
        GgufValueType::F32,
        GgufValueType::Bool,
        GgufValueType::String,
        GgufValueType::Array,
        GgufValueType::U64,
        GgufValueType::I64,
        GgufValueType::F64,
    ];

    /// The id stored in the file.
    pub const fn id(self) -> u32 {
        match self {
            GgufValueType::U8 => 0,
            GgufValueType::I8 => 1,
            GgufValueType::U16 => 2,
            GgufValueType::I16 => 3,
            GgufValueType::U32 => 4,
            GgufValueType::I32 => 5,
            GgufValueType::F32 => 6,
            GgufValueType::Bool => 7,
            GgufValueType::String => 8,
            GgufValueType::Array => 9,
            GgufValueType::U64 => 10,
            GgufValueType::I64 => 11,
            GgufValueType::F64 => 12,
        }
    }

    /// The type with on-disk id `id`.
    pub fn from_id(id: u32) -> Option<GgufValueType> {
        Self::ALL.get(usize::try_from(id).ok()?).copied()
    }

    /// ggml's short name ("u32", "str", "arr", ...).
    pub const fn name(self) -> &'static str {
        match self {
            GgufValueType::U8 => "u8",
            GgufValueType::I8 => "i8",
            GgufValueType::U16 => "u16",
            GgufValueType::I16 => "i16",
            GgufValueType::U32 => "u32",
            GgufValueType::I32 => "i32",
            GgufValueType::F32 => "f32",
            GgufValueType::Bool => "bool",
            GgufValueType::String => "str",
            GgufValueType::Array => "arr",
            GgufValueType::U64 => "u64",
            GgufValueType::I64 => "i64",
            GgufValueType::F64 => "f64",
        }
    }

    /// Encoded size of one value of a fixed-size type; `None` for strings and arrays.
    pub const fn fixed_size(self) -> Option<usize> {
        match self {
            GgufValueType::U8 | GgufValueType::I8 | GgufValueType::Bool => Some(1),
            GgufValueType::U16 | GgufValueType::I16 => Some(2),
            GgufValueType::U32 | GgufValueType::I32 | GgufValueType::F32 => Some(4),
            GgufValueType::U64 | GgufValueType::I64 | GgufValueType::F64 => Some(8),
            GgufValueType::String | GgufValueType::Array => None,
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous array value. Arrays of arrays do not exist in GGUF (llama.cpp rejects them).
///
/// Empty arrays are valid in the format and ggml reads and writes them; note that the Python
/// `gguf` writer silently skips empty arrays (and empty strings) instead of writing them.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// JSON for a float: a number when finite, else the strings "NaN", "inf" or "-inf".
fn float_json(x: f64) -> serde_json::Value {
    match serde_json::Number::from_f64(x) {
        Some(n) => serde_json::Value::Number(n),
        None if x.is_nan() => serde_json::Value::String("NaN".into()),
        None if x > 0.0 => serde_json::Value::String("inf".into()),
        None => serde_json::Value::String("-inf".into()),
    }
}

impl GgufValue {
    /// The value's type (`Array` for arrays; see [`GgufArray::elem_type`] for the element type).
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as an `i128` if it is any integer type (not bool).
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer type whose value fits in a `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_integer().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer type whose value fits in a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_integer().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer type whose value fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_integer().and_then(|v| i64::try_from(v).ok())
    }

    /// `F32`, or `F64` rounded to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An `Array`.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as JSON. Arrays are converted in full (callers truncate if they want);
    /// non-finite floats become the strings "NaN", "inf" and "-inf".
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            GgufValue::U8(v) => J::from(*v),
            GgufValue::I8(v) => J::from(*v),
            GgufValue::U16(v) => J::from(*v),
            GgufValue::I16(v) => J::from(*v),
            GgufValue::U32(v) => J::from(*v),
            GgufValue::I32(v) => J::from(*v),
            GgufValue::F32(v) => float_json(f64::from(*v)),
            GgufValue::Bool(v) => J::from(*v),
            GgufValue::String(v) => J::from(v.as_str()),
            GgufValue::Array(a) => a.to_json(),
            GgufValue::U64(v) => J::from(*v),
            GgufValue::I64(v) => J::from(*v),
            GgufValue::F64(v) => float_json(*v),
        }
    }
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type (never `Array`).
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// The array as a JSON array, in full.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        fn map<T: Copy>(v: &[T], f: impl Fn(T) -> J) -> J {
            J::Array(v.iter().map(|&x| f(x)).collect())
        }
        match self {
            GgufArray::U8(v) => map(v, J::from),
            GgufArray::I8(v) => map(v, J::from),
            GgufArray::U16(v) => map(v, J::from),
            GgufArray::I16(v) => map(v, J::from),
            GgufArray::U32(v) => map(v, J::from),
            GgufArray::I32(v) => map(v, J::from),
            GgufArray::F32(v) => map(v, |x| float_json(f64::from(x))),
            GgufArray::Bool(v) => map(v, J::from),
            GgufArray::String(v) => J::Array(v.iter().map(|s| J::from(s.as_str())).collect()),
            GgufArray::U64(v) => map(v, J::from),
            GgufArray::I64(v) => map(v, J::from),
            GgufArray::F64(v) => map(v, float_json),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for (i, t) in GgufValueType::ALL.iter().enumerate() {
            assert_eq!(t.id() as usize, i);
            assert_eq!(GgufValueType::from_id(t.id()), Some(*t));
        }
        assert_eq!(GgufValueType::from_id(13), None);
        assert_eq!(GgufValueType::from_id(u32::MAX), None);
    }

    #[test]
    fn integer_accessors_convert_when_they_fit() {
        assert_eq!(GgufValue::U8(7).as_u32(), Some(7));
        assert_eq!(GgufValue::I32(-1).as_u32(), None);
        assert_eq!(GgufValue::I32(-1).as_i64(), Some(-1));
        assert_eq!(GgufValue::U64(u64::MAX).as_u32(), None);
        assert_eq!(GgufValue::U64(u64::MAX).as_u64(), Some(u64::MAX));
        assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(GgufValue::I64(5).as_u32(), Some(5));
        assert_eq!(GgufValue::Bool(true).as_u32(), None);
        assert_eq!(GgufValue::F32(1.0).as_u32(), None);
        assert_eq!(GgufValue::F64(0.5).as_f32(), Some(0.5));
        assert_eq!(GgufValue::String("x".into()).as_str(), Some("x"));
        assert_eq!(GgufValue::Bool(true).as_bool(), Some(true));
    }

    #[test]
    fn json_conversion() {
        let v = GgufValue::Array(GgufArray::F32(vec![1.5, f32::NAN, f32::NEG_INFINITY]));
        assert_eq!(v.to_json(), serde_json::json!([1.5, "NaN", "-inf"]));
        let s = GgufValue::Array(GgufArray::String(vec!["a".into(), "b".into()]));
        assert_eq!(s.to_json(), serde_json::json!(["a", "b"]));
        assert_eq!(GgufValue::I8(-3).to_json(), serde_json::json!(-3));
        assert_eq!(GgufValue::Bool(false).to_json(), serde_json::json!(false));
        assert_eq!(
            v.as_array().map(|a| (a.len(), a.elem_type())),
            Some((3, GgufValueType::F32))
        );
    }
}
