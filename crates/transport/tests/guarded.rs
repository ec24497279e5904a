//! The executor, run on random layouts against guarded memory: every registered region sits
//! flush against an inaccessible page (before or after it), so a single byte read or written
//! outside a region kills the test with SIGSEGV (mapped memory) or fails it with EFAULT (cross-
//! memory attach). Operations are built the agent's way, through `Region::at`, and every
//! destination element is compared with the logical tensor.

use proptest::prelude::*;
use tensorbus_planner::{BatchPlan, BatchTensor, DType, DeviceMesh, Layout, PairPlan, Placement, Scope, TensorMeta};
use tensorbus_transport::exec::{execute, ExecPlan, Loc, Op, Region};
use tensorbus_transport::TransportError;

/// `len` bytes of read-write memory with a `PROT_NONE` page right before (`at_end == false`) or
/// right after (`at_end == true`) them.
struct Guarded {
    base: *mut u8,
    total: usize,
    data: *mut u8,
}

const PAGE: usize = 4096;

impl Guarded {
    fn new(len: usize, at_end: bool) -> Guarded {
        let body = len.div_ceil(PAGE).max(1) * PAGE;
        let total = body + 2 * PAGE;
        // SAFETY: a fresh anonymous mapping, then protections inside it.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(base.add(PAGE) as *mut libc::c_void, body, libc::PROT_READ | libc::PROT_WRITE),
                0
            );
            let data = if at_end { base.add(PAGE + body - len) } else { base.add(PAGE) };
            Guarded { base, total, data }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.total) };
    }
}

fn placements(ndim_mesh: usize, ndim_tensor: usize) -> impl Strategy<Value = Vec<Placement>> {
    prop::collection::vec(
        prop_oneof![Just(Placement::Replicate), (0..ndim_tensor).prop_map(Placement::Shard)],
        ndim_mesh,
    )
}

fn mesh() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![prop::collection::vec(1usize..5, 1), prop::collection::vec(1usize..4, 2)]
}

#[derive(Debug, Clone)]
struct Case {
    src: (Vec<usize>, Vec<Placement>),
    dst: (Vec<usize>, Vec<Placement>),
    shape: Vec<u64>,
    dtype: DType,
    bucket: u64,
    /// Per region: guard after (true) or before, and whether it is reached by cross-memory attach.
    flags: Vec<(bool, bool)>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..4, mesh(), mesh()).prop_flat_map(|(nd, sm, dm)| {
        (
            placements(sm.len(), nd),
            placements(dm.len(), nd),
            prop::collection::vec(0u64..13, nd),
            prop::sample::select(vec![DType::U8, DType::BF16, DType::F32, DType::F64]),
            prop::sample::select(vec![8u64, 24, 64, 4096]),
            prop::collection::vec((any::<bool>(), prop::bool::weighted(0.25)), 32),
        )
            .prop_map(move |(sp, dp, shape, dtype, bucket, flags)| Case {
                src: (sm.clone(), sp),
                dst: (dm.clone(), dp),
                shape,
                dtype,
                bucket,
                flags,
            })
    })
}

/// The byte of the logical tensor at element `e`, byte `b`.
fn value(e: u64, b: u64) -> u8 {
    (e.wrapping_mul(31).wrapping_add(b * 7) % 251) as u8
}

/// Row-major element index of the global tensor for a local element of `rank`.
fn global_index(layout: &Layout, shape: &[u64], rank: usize, local: u64) -> u64 {
    let bx = layout.local_box(shape, rank);
    let lshape: Vec<u64> = bx.iter().map(|r| r.end - r.start).collect();
    let mut rem = local;
    let mut coords = vec![0u64; shape.len()];
    for d in (0..shape.len()).rev() {
        coords[d] = rem % lshape[d] + bx[d].start;
        rem /= lshape[d];
    }
    coords.iter().zip(shape).fold(0, |acc, (&c, &n)| acc * n + c)
}

fn run(c: &Case) -> Result<(), TestCaseError> {
    let src = Layout::new(DeviceMesh::new(c.src.0.clone()).unwrap(), c.src.1.clone()).unwrap();
    let dst = Layout::new(DeviceMesh::new(c.dst.0.clone()).unwrap(), c.dst.1.clone()).unwrap();
    let pair = PairPlan::new(src.clone(), dst.clone()).unwrap();
    let es = c.dtype.size() as u64;
    let t = BatchTensor { pair: 0, meta: TensorMeta::new("t", c.shape.clone(), c.dtype) };
    let plan = BatchPlan::build(&[&pair], &[t], Some(c.bucket.max(es)), Scope::All).unwrap();

    let mut flags = c.flags.iter().cycle();
    let me = std::process::id();
    let mut region = |layout: &Layout, rank: usize, fill: bool| -> (Guarded, Region, u64) {
        let numel: u64 = layout.local_shape(&c.shape, rank).iter().product();
        let nbytes = numel * es;
        let &(at_end, remote) = flags.next().unwrap();
        let g = Guarded::new(nbytes as usize, at_end);
        if fill {
            for e in 0..numel {
                let ge = global_index(layout, &c.shape, rank, e);
                for b in 0..es {
                    // SAFETY: inside the region's nbytes.
                    unsafe { *g.data.add((e * es + b) as usize) = value(ge, b) };
                }
            }
        }
        let loc = if remote { Loc::Remote { pid: me, addr: g.data as u64 } } else { Loc::Local(g.data) };
        (g, Region { loc, nbytes }, numel)
    };
    let srcs: Vec<_> = (0..src.world_size()).map(|r| region(&src, r, true)).collect();
    let dsts: Vec<_> = (0..dst.world_size()).map(|r| region(&dst, r, false)).collect();

    let mut buckets = Vec::new();
    for b in plan.buckets() {
        let mut ops = Vec::new();
        for ch in plan.chunks(b) {
            let (s, d) = (&srcs[ch.src_rank as usize].1, &dsts[ch.dst_rank as usize].1);
            for (so, doff, len) in ch.runs() {
                ops.push(Op::Copy { src: s.at(so, len).unwrap(), dst: d.at(doff, len).unwrap(), len });
            }
        }
        buckets.push(ops);
    }
    let exec = ExecPlan { buckets, bucket_size: c.bucket, links: Vec::new(), device: None };
    // SAFETY: every location came from Region::at over live guarded regions.
    let (bytes, _) = unsafe { execute(&exec, 3, 0, true) }.map_err(|e| TestCaseError::fail(e.to_string()))?;
    let expected: u64 = dsts.iter().map(|d| d.1.nbytes).sum();
    prop_assert_eq!(bytes, expected, "every destination byte is written once");
    for (r, (g, _, numel)) in dsts.iter().enumerate() {
        for e in 0..*numel {
            let ge = global_index(&dst, &c.shape, r, e);
            for b in 0..es {
                // SAFETY: inside the region.
                let got = unsafe { *g.data.add((e * es + b) as usize) };
                prop_assert_eq!(got, value(ge, b), "rank {} element {} byte {}", r, e, b);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_layouts_never_touch_a_byte_outside_their_regions(c in case()) {
        run(&c)?;
    }

    /// Hostile runs (any offset and length) are refused by `Region::at`, never wrapped.
    #[test]
    fn region_at_refuses_every_run_outside(nbytes in 0u64..1 << 40, offset in any::<u64>(), len in any::<u64>()) {
        let r = Region { loc: Loc::Remote { pid: 1, addr: 1 << 20 }, nbytes };
        match r.at(offset, len) {
            Ok(Loc::Remote { addr, .. }) => {
                prop_assert!(offset as u128 + len as u128 <= nbytes as u128);
                prop_assert_eq!(addr, (1 << 20) + offset);
            }
            Ok(other) => prop_assert!(false, "{:?}", other),
            Err(TransportError::OutOfBounds { .. }) => prop_assert!(offset as u128 + len as u128 > nbytes as u128),
            Err(e) => prop_assert!(false, "{}", e),
        }
    }
}

#[test]
fn a_guard_page_is_really_there() {
    // The guarded region refuses cross-memory attach one byte past its end.
    let g = Guarded::new(100, true);
    let mut b = [0u8; 1];
    // SAFETY: reading into a local byte.
    let e = unsafe { tensorbus_transport::cma::read(std::process::id(), g.data as u64 + 100, b.as_mut_ptr(), 1) };
    assert!(e.is_err(), "the byte after the region is readable");
    // SAFETY: as above, the last byte inside.
    unsafe { tensorbus_transport::cma::read(std::process::id(), g.data as u64 + 99, b.as_mut_ptr(), 1) }.unwrap();
}
