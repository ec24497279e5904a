//! Deterministic test data: what every element of a logical tensor holds, what each source rank
//! holds of it (partial values included), and the check of a received shard.

use tensorbus_planner::{DType, Layout, Placement, ReduceOp};
use tensorbus_transport::reduce::write_value;

fn mix(t: u64, g: u64) -> u64 {
    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ g.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 29)
}

/// Index of `rank` along the layout's Partial mesh dims, and how many partial holders there are.
fn partial_index(layout: &Layout, rank: usize) -> (usize, usize) {
    let coords = layout.mesh().coords(rank);
    let (mut idx, mut n) = (0, 1);
    for (i, p) in layout.placements().iter().enumerate() {
        if let Placement::Partial(_) = p {
            idx = idx * layout.mesh().shape()[i] + coords[i];
            n *= layout.mesh().shape()[i];
        }
    }
    (idx, n)
}

/// Small integer value of element `g` for numeric patterns (exact in every float dtype).
fn small(t: u64, g: u64) -> f64 {
    (mix(t, g) % 16) as f64
}

/// Fills `buf` (the local shard of `rank` in `layout`) for tensor `t` of global `shape`.
///
/// Without Partial: byte `b` of element `g` is a hash of `(t, g, b)` (any dtype). With Partial:
/// the rank's partial index `k` holds `small(g) + k`, so the logical value under `op` is exact.
pub fn fill(layout: &Layout, shape: &[u64], dtype: DType, t: u64, rank: usize, buf: &mut [u8]) {
    let (k, _) = partial_index(layout, rank);
    let partial = layout.partial_op().is_some();
    for_each_element(layout, shape, rank, |local, g| {
        let es = dtype.size();
        let out = &mut buf[local * es..(local + 1) * es];
        if partial {
            write_value(dtype, small(t, g) + k as f64, out);
        } else {
            let h = mix(t, g);
            for (b, o) in out.iter_mut().enumerate() {
                *o = (h >> (8 * (b % 8))) as u8 ^ (b as u8).wrapping_mul(37);
            }
        }
    });
}

/// Counts the elements of `buf` (the local shard of `rank` in the destination layout) that differ
/// from the logical tensor the source layout `src` describes.
pub fn mismatches(src: &Layout, dst: &Layout, shape: &[u64], dtype: DType, t: u64, rank: usize, buf: &[u8]) -> u64 {
    let es = dtype.size();
    let mut expected = vec![0u8; es];
    let (_, n) = partial_index(src, 0);
    let mut bad = 0;
    for_each_element(dst, shape, rank, |local, g| {
        match src.partial_op() {
            Some(op) => {
                let v = small(t, g);
                let nf = n as f64;
                let want = match op {
                    ReduceOp::Sum => nf * v + nf * (nf - 1.0) / 2.0,
                    ReduceOp::Avg => v + (nf - 1.0) / 2.0,
                    ReduceOp::Max => v + nf - 1.0,
                    ReduceOp::Min => v,
                };
                write_value(dtype, want, &mut expected);
            }
            None => {
                let h = mix(t, g);
                for (b, o) in expected.iter_mut().enumerate() {
                    *o = (h >> (8 * (b % 8))) as u8 ^ (b as u8).wrapping_mul(37);
                }
            }
        }
        if buf[local * es..(local + 1) * es] != expected[..] {
            bad += 1;
        }
    });
    bad
}

/// Calls `f(local_index, global_linear_index)` for every element of `rank`'s shard.
fn for_each_element(layout: &Layout, shape: &[u64], rank: usize, mut f: impl FnMut(usize, u64)) {
    let bx = layout.local_box(shape, rank);
    let lshape: Vec<u64> = bx.iter().map(|r| r.end - r.start).collect();
    let n: u64 = lshape.iter().product();
    if n == 0 {
        return;
    }
    let mut idx = vec![0u64; shape.len()];
    for local in 0..n as usize {
        let g = idx.iter().zip(&bx).zip(shape).fold(0u64, |a, ((i, r), &s)| a * s + i + r.start);
        f(local, g);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < lshape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}
