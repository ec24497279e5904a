//! Element-wise reductions of partial values, by dtype: integers exactly (in i128), floating
//! point in f64 with one rounding back to the element type.

use half::{bf16, f16};
use tensorbus_planner::{DType, ReduceOp};

use crate::TransportError;

/// Whether partial values of `dtype` can be reduced.
pub fn supported(dtype: DType) -> bool {
    use DType::*;
    matches!(dtype, U8 | I8 | I16 | U16 | I32 | U32 | I64 | U64 | F16 | BF16 | F32 | F64)
}

macro_rules! int_reduce {
    ($t:ty, $dst:expr, $srcs:expr, $op:expr) => {{
        let n = $dst.len() / std::mem::size_of::<$t>();
        for i in 0..n {
            let at = |s: &[u8]| {
                <$t>::from_ne_bytes(
                    s[i * std::mem::size_of::<$t>()..(i + 1) * std::mem::size_of::<$t>()].try_into().unwrap(),
                ) as i128
            };
            let mut acc = at($srcs[0]);
            for s in &$srcs[1..] {
                let v = at(s);
                acc = match $op {
                    ReduceOp::Sum | ReduceOp::Avg => acc + v,
                    ReduceOp::Max => acc.max(v),
                    ReduceOp::Min => acc.min(v),
                };
            }
            if $op == ReduceOp::Avg {
                acc /= $srcs.len() as i128;
            }
            let out = (acc as $t).to_ne_bytes();
            $dst[i * std::mem::size_of::<$t>()..(i + 1) * std::mem::size_of::<$t>()].copy_from_slice(&out);
        }
    }};
}

macro_rules! float_reduce {
    ($t:ty, $to:expr, $from:expr, $dst:expr, $srcs:expr, $op:expr) => {{
        const W: usize = std::mem::size_of::<$t>();
        let n = $dst.len() / W;
        for i in 0..n {
            let at = |s: &[u8]| -> f64 { $to(<$t>::from_ne_bytes(s[i * W..(i + 1) * W].try_into().unwrap())) };
            let mut acc = at($srcs[0]);
            for s in &$srcs[1..] {
                let v = at(s);
                acc = match $op {
                    ReduceOp::Sum | ReduceOp::Avg => acc + v,
                    ReduceOp::Max => acc.max(v),
                    ReduceOp::Min => acc.min(v),
                };
            }
            if $op == ReduceOp::Avg {
                acc /= $srcs.len() as f64;
            }
            let out: $t = $from(acc);
            $dst[i * W..(i + 1) * W].copy_from_slice(&out.to_ne_bytes());
        }
    }};
}

/// `dst[i] = op(srcs[0][i], srcs[1][i], ...)` element-wise. All slices have `dst.len()` bytes.
pub fn reduce(dtype: DType, op: ReduceOp, dst: &mut [u8], srcs: &[&[u8]]) -> Result<(), TransportError> {
    use DType::*;
    debug_assert!(srcs.iter().all(|s| s.len() == dst.len()) && !srcs.is_empty());
    match dtype {
        U8 => int_reduce!(u8, dst, srcs, op),
        I8 => int_reduce!(i8, dst, srcs, op),
        I16 => int_reduce!(i16, dst, srcs, op),
        U16 => int_reduce!(u16, dst, srcs, op),
        I32 => int_reduce!(i32, dst, srcs, op),
        U32 => int_reduce!(u32, dst, srcs, op),
        I64 => int_reduce!(i64, dst, srcs, op),
        U64 => int_reduce!(u64, dst, srcs, op),
        F32 => float_reduce!(f32, |x: f32| x as f64, |x: f64| x as f32, dst, srcs, op),
        F64 => float_reduce!(f64, |x: f64| x, |x: f64| x, dst, srcs, op),
        F16 => float_reduce!(f16, |x: f16| x.to_f64(), f16::from_f64, dst, srcs, op),
        BF16 => float_reduce!(bf16, |x: bf16| x.to_f64(), bf16::from_f64, dst, srcs, op),
        _ => return Err(TransportError::Unsupported(format!("Partial reduction of {dtype}"))),
    }
    Ok(())
}

/// Writes `v` as one element of `dtype` (used by tests and the demo to build exact values).
pub fn write_value(dtype: DType, v: f64, out: &mut [u8]) {
    use DType::*;
    match dtype {
        U8 => out.copy_from_slice(&(v as u8).to_ne_bytes()),
        I8 => out.copy_from_slice(&(v as i8).to_ne_bytes()),
        I16 => out.copy_from_slice(&(v as i16).to_ne_bytes()),
        U16 => out.copy_from_slice(&(v as u16).to_ne_bytes()),
        I32 => out.copy_from_slice(&(v as i32).to_ne_bytes()),
        U32 => out.copy_from_slice(&(v as u32).to_ne_bytes()),
        I64 => out.copy_from_slice(&(v as i64).to_ne_bytes()),
        U64 => out.copy_from_slice(&(v as u64).to_ne_bytes()),
        F32 => out.copy_from_slice(&(v as f32).to_ne_bytes()),
        F64 => out.copy_from_slice(&v.to_ne_bytes()),
        F16 => out.copy_from_slice(&f16::from_f64(v).to_ne_bytes()),
        BF16 => out.copy_from_slice(&bf16::from_f64(v).to_ne_bytes()),
        _ => panic!("write_value: {dtype} has no numeric encoding here"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(dtype: DType, vals: &[f64]) -> Vec<u8> {
        let es = dtype.size();
        let mut out = vec![0u8; vals.len() * es];
        for (i, v) in vals.iter().enumerate() {
            write_value(dtype, *v, &mut out[i * es..(i + 1) * es]);
        }
        out
    }

    #[test]
    fn reduces_every_supported_dtype_exactly_on_small_integers() {
        for dtype in DType::ALL.into_iter().filter(|d| supported(*d)) {
            let a = enc(dtype, &[1.0, 5.0, 2.0]);
            let b = enc(dtype, &[3.0, 1.0, 2.0]);
            for (op, want) in [
                (ReduceOp::Sum, [4.0, 6.0, 4.0]),
                (ReduceOp::Max, [3.0, 5.0, 2.0]),
                (ReduceOp::Min, [1.0, 1.0, 2.0]),
                (ReduceOp::Avg, [2.0, 3.0, 2.0]),
            ] {
                let mut out = vec![0u8; a.len()];
                reduce(dtype, op, &mut out, &[&a, &b]).unwrap();
                assert_eq!(out, enc(dtype, &want), "{dtype} {op:?}");
            }
        }
        assert!(reduce(DType::Bool, ReduceOp::Sum, &mut [0], &[&[1]]).is_err());
    }
}
