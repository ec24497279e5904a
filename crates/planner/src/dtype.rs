//! Element types: every dtype a PyTorch user sends, with its size and its torch name.

use crate::PlanError;
use std::fmt;
use std::str::FromStr;

/// A tensor element type. Names follow torch (`torch.float32` is `"float32"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3FN,
    F8E4M3FNUZ,
    F8E5M2,
    F8E5M2FNUZ,
    F8E8M0FNU,
    /// `torch.complex32` (two f16).
    C32,
    C64,
    C128,
}

impl DType {
    pub const ALL: [DType; 21] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0FNU,
        DType::C32,
        DType::C64,
        DType::C128,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        use DType::*;
        match self {
            Bool | U8 | I8 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F8E8M0FNU => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 | C32 => 4,
            I64 | U64 | F64 | C64 => 8,
            C128 => 16,
        }
    }

    /// The torch name (`"bfloat16"`, `"float8_e4m3fn"`, ...).
    pub const fn name(self) -> &'static str {
        use DType::*;
        match self {
            Bool => "bool",
            U8 => "uint8",
            I8 => "int8",
            I16 => "int16",
            U16 => "uint16",
            I32 => "int32",
            U32 => "uint32",
            I64 => "int64",
            U64 => "uint64",
            F16 => "float16",
            BF16 => "bfloat16",
            F32 => "float32",
            F64 => "float64",
            F8E4M3FN => "float8_e4m3fn",
            F8E4M3FNUZ => "float8_e4m3fnuz",
            F8E5M2 => "float8_e5m2",
            F8E5M2FNUZ => "float8_e5m2fnuz",
            F8E8M0FNU => "float8_e8m0fnu",
            C32 => "complex32",
            C64 => "complex64",
            C128 => "complex128",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = PlanError;
    /// Accepts torch names (with or without `torch.`), numpy names and short forms (`f32`, `bf16`).
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let t = s.trim().trim_start_matches("torch.");
        if let Some(d) = DType::ALL.iter().find(|d| d.name() == t) {
            return Ok(*d);
        }
        use DType::*;
        Ok(match t {
            "f16" | "half" => F16,
            "bf16" => BF16,
            "f32" | "float" => F32,
            "f64" | "double" => F64,
            "u8" => U8,
            "i8" => I8,
            "i16" | "short" => I16,
            "u16" => U16,
            "i32" | "int" => I32,
            "u32" => U32,
            "i64" | "long" => I64,
            "u64" => U64,
            "bool_" => Bool,
            "chalf" => C32,
            "c64" | "cfloat" => C64,
            "c128" | "cdouble" => C128,
            _ => return Err(PlanError::UnknownDType(s.to_string())),
        })
    }
}
