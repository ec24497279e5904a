//! The planner against a brute-force, element-by-element reference over random meshes,
//! placements (nested, uneven, Partial), shapes, dtypes and bucket sizes.

use proptest::prelude::*;
use tensorbus_planner::*;

/// Test pattern: byte `b` of element `g` (global linear index) of tensor `t`.
fn pattern(t: usize, g: u64, b: usize) -> u8 {
    let mut x =
        (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ g.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (b as u64) << 7;
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    (x >> 29) as u8
}

fn linear(shape: &[u64], idx: &[u64]) -> u64 {
    idx.iter().zip(shape).fold(0, |a, (&i, &n)| a * n + i)
}

fn unravel(shape: &[u64], mut lin: u64) -> Vec<u64> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = lin % shape[d];
        lin /= shape[d];
    }
    idx
}

/// Weight of a source rank's partial value: 1 + its index along the Partial mesh dims.
fn partial_weight(layout: &Layout, rank: usize) -> u8 {
    let coords = layout.mesh().coords(rank);
    let mut w = 0usize;
    for (i, p) in layout.placements().iter().enumerate() {
        if let Placement::Partial(_) = p {
            w = w * layout.mesh().shape()[i] + coords[i];
        }
    }
    1 + w as u8
}

/// A rank's local shard, filled from the global pattern (scaled by its partial weight).
fn local_buffer(layout: &Layout, meta: &TensorMeta, t: usize, rank: usize, weight: u8) -> Vec<u8> {
    let bx = layout.local_box(&meta.shape, rank);
    let lshape: Vec<u64> = bx.iter().map(|r| r.end - r.start).collect();
    let n: u64 = lshape.iter().product();
    let es = meta.dtype.size();
    let mut buf = vec![0u8; n as usize * es];
    for l in 0..n {
        let li = unravel(&lshape, l);
        let gi: Vec<u64> = li.iter().zip(&bx).map(|(i, r)| i + r.start).collect();
        let g = linear(&meta.shape, &gi);
        for b in 0..es {
            buf[l as usize * es + b] = pattern(t, g, b).wrapping_mul(weight);
        }
    }
    buf
}

/// Global index of byte `off` of `rank`'s local shard.
fn global_of(layout: &Layout, meta: &TensorMeta, rank: usize, off: u64) -> Vec<u64> {
    let bx = layout.local_box(&meta.shape, rank);
    let lshape: Vec<u64> = bx.iter().map(|r| r.end - r.start).collect();
    let li = unravel(&lshape, off / meta.dtype.size() as u64);
    li.iter().zip(&bx).map(|(i, r)| i + r.start).collect()
}

#[derive(Debug, Clone)]
struct Case {
    pairs: Vec<(Layout, Layout)>,
    tensors: Vec<BatchTensor>,
    bucket_size: u64,
}

fn mesh_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=4, 1..=4).prop_filter("at most 64 ranks", |s| s.iter().product::<usize>() <= 64)
}

fn placement(ndim: usize, allow_partial: bool) -> BoxedStrategy<Placement> {
    let mut opts: Vec<BoxedStrategy<Placement>> = vec![Just(Placement::Replicate).boxed()];
    if ndim > 0 {
        opts.push((0..ndim).prop_map(Placement::Shard).boxed());
        opts.push((0..ndim).prop_map(Placement::Shard).boxed());
    }
    if allow_partial {
        opts.push(Just(Placement::Partial(ReduceOp::Sum)).boxed());
    }
    prop::strategy::Union::new(opts).boxed()
}

fn layout(ndim: usize, allow_partial: bool) -> impl Strategy<Value = Layout> {
    mesh_shape().prop_flat_map(move |shape| {
        let n = shape.len();
        prop::collection::vec(placement(ndim, allow_partial), n)
            .prop_map(move |pl| Layout::from_parts(shape.clone(), pl).expect("valid layout"))
    })
}

fn case() -> impl Strategy<Value = Case> {
    (0usize..=3, 1usize..=2)
        .prop_flat_map(|(ndim, npairs)| {
            let pairs = prop::collection::vec((layout(ndim, true), layout(ndim, false)), npairs);
            let shapes = prop::collection::vec(
                (
                    prop::collection::vec(prop_oneof![1 => Just(0u64), 9 => 1u64..=9], ndim),
                    prop::sample::select(DType::ALL.to_vec()),
                    0..npairs,
                ),
                1..=3,
            );
            (pairs, shapes, prop_oneof![1u64..=4, 16u64..=64, 65u64..=4096, Just(DEFAULT_BUCKET_SIZE)])
        })
        .prop_map(|(pairs, shapes, bucket_size)| Case {
            pairs,
            tensors: shapes
                .into_iter()
                .enumerate()
                .map(|(i, (shape, dtype, pair))| BatchTensor {
                    pair,
                    meta: TensorMeta::new(format!("t{i}"), shape, dtype),
                })
                .collect(),
            bucket_size,
        })
}

fn check_case(c: &Case) -> Result<(), TestCaseError> {
    let plans: Vec<PairPlan> = c.pairs.iter().map(|(s, d)| PairPlan::new(s.clone(), d.clone()).unwrap()).collect();
    let refs: Vec<&PairPlan> = plans.iter().collect();
    let max_es = c.tensors.iter().map(|t| t.meta.dtype.size() as u64).max().unwrap();
    if c.bucket_size < max_es {
        let e = BatchPlan::build(&refs, &c.tensors, Some(c.bucket_size), Scope::All).unwrap_err();
        prop_assert!(matches!(e, PlanError::BucketTooSmall { .. }), "{e}");
        return Ok(());
    }
    let plan = BatchPlan::build(&refs, &c.tensors, Some(c.bucket_size), Scope::All).unwrap();

    // Real buffers: every source rank's shard, every destination rank's (zeroed) shard.
    let mut src_bufs = Vec::new();
    let mut dst_bufs = Vec::new();
    let mut writes = Vec::new();
    for (t, bt) in c.tensors.iter().enumerate() {
        let p = &plans[bt.pair];
        src_bufs.push(
            (0..p.src().world_size())
                .map(|r| local_buffer(p.src(), &bt.meta, t, r, partial_weight(p.src(), r)))
                .collect::<Vec<_>>(),
        );
        let d: Vec<Vec<u8>> = (0..p.dst().world_size())
            .map(|r| {
                vec![
                    0u8;
                    p.dst().local_shape(&bt.meta.shape, r).iter().product::<u64>() as usize * bt.meta.dtype.size()
                ]
            })
            .collect();
        writes.push(d.iter().map(|b| vec![0u8; b.len()]).collect::<Vec<_>>());
        dst_bufs.push(d);
    }

    let mut total = 0u64;
    for b in plan.buckets() {
        prop_assert!(b.bytes <= c.bucket_size, "bucket of {} bytes exceeds {}", b.bytes, c.bucket_size);
        let chunks = plan.chunks(b);
        prop_assert_eq!(chunks.iter().map(|c| c.bytes()).sum::<u64>(), b.bytes);
        for ch in chunks {
            prop_assert_eq!((ch.src_rank, ch.dst_rank), (b.src_rank, b.dst_rank));
            let bt = &c.tensors[ch.tensor as usize];
            prop_assert_eq!(bt.pair as u32, b.pair);
            let p = &plans[bt.pair];
            let es = bt.meta.dtype.size() as u64;
            for (so, doff, len) in ch.runs() {
                prop_assert!(len > 0 && so % es == 0 && doff % es == 0 && len % es == 0, "run not element-aligned");
                // Brute force: each element the run moves is the same global element at both ends.
                for e in (0..len).step_by(es as usize) {
                    prop_assert_eq!(
                        global_of(p.src(), &bt.meta, ch.src_rank as usize, so + e),
                        global_of(p.dst(), &bt.meta, ch.dst_rank as usize, doff + e)
                    );
                }
                let dst = &mut dst_bufs[ch.tensor as usize][ch.dst_rank as usize];
                prop_assert!(doff + len <= dst.len() as u64, "write beyond destination shard");
                for k in 0..len as usize {
                    let mut v = 0u8;
                    for r in p.contributors(ch.src_rank as usize) {
                        let src = &src_bufs[ch.tensor as usize][r as usize];
                        prop_assert!(so + len <= src.len() as u64, "read beyond source shard of rank {}", r);
                        v = v.wrapping_add(src[so as usize + k]);
                    }
                    dst[doff as usize + k] = v;
                    writes[ch.tensor as usize][ch.dst_rank as usize][doff as usize + k] += 1;
                }
                total += len;
            }
        }
    }

    // Every destination byte written exactly once, with the logical value.
    let mut minimum = 0u64;
    for (t, bt) in c.tensors.iter().enumerate() {
        let p = &plans[bt.pair];
        let nparts = (0..p.src().world_size()).map(|r| partial_weight(p.src(), r)).max().unwrap() as u32;
        let scale = (nparts * (nparts + 1) / 2) as u8;
        for r in 0..p.dst().world_size() {
            prop_assert!(
                writes[t][r].iter().all(|&w| w == 1),
                "tensor {} dst rank {}: a byte written {:?} times",
                t,
                r,
                writes[t][r].iter().find(|&&w| w != 1)
            );
            let expected = local_buffer(p.dst(), &bt.meta, t, r, scale);
            prop_assert!(dst_bufs[t][r] == expected, "tensor {} dst rank {} differs from the reference", t, r);
            minimum += expected.len() as u64;
        }
    }
    prop_assert_eq!(total, minimum);
    prop_assert_eq!(plan.total_bytes(), minimum);

    // Rank-local shares are exactly the full plan's buckets of that rank, on both sides.
    let max_src = plans.iter().map(|p| p.src().world_size()).min().unwrap();
    let max_dst = plans.iter().map(|p| p.dst().world_size()).min().unwrap();
    for (side, n) in [(Side::Src, max_src), (Side::Dst, max_dst)] {
        for r in 0..n {
            let local = BatchPlan::build(&refs, &c.tensors, Some(c.bucket_size), Scope::Rank(side, r)).unwrap();
            let mine: Vec<_> = plan
                .buckets()
                .iter()
                .filter(|b| (if side == Side::Src { b.src_rank } else { b.dst_rank }) as usize == r)
                .map(|b| (b.clone(), plan.chunks(b).to_vec()))
                .collect();
            let theirs: Vec<_> = local.buckets().iter().map(|b| (b.clone(), local.chunks(b).to_vec())).collect();
            prop_assert_eq!(mine.len(), theirs.len());
            for ((b1, c1), (b2, c2)) in mine.iter().zip(&theirs) {
                prop_assert_eq!(
                    (b1.pair, b1.src_rank, b1.dst_rank, b1.seq, b1.bytes),
                    (b2.pair, b2.src_rank, b2.dst_rank, b2.seq, b2.bytes)
                );
                prop_assert_eq!(c1, c2);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
    #[test]
    fn plan_matches_reference(c in case()) {
        check_case(&c)?;
    }
}

#[test]
fn global_shape_recovered_from_uneven_local_shapes() {
    let l = Layout::from_parts([3, 2], vec![Placement::Shard(0), Placement::Shard(0)]).unwrap();
    for n in 0..20u64 {
        let global = vec![n, 5];
        let locals: Vec<Vec<u64>> = (0..6).map(|r| l.local_shape(&global, r)).collect();
        assert_eq!(l.global_shape_from_locals("w", &locals).unwrap(), global);
    }
    let mut locals: Vec<Vec<u64>> = (0..6).map(|r| l.local_shape(&[7, 5], r)).collect();
    locals[5][1] = 4;
    assert!(matches!(l.global_shape_from_locals("w", &locals), Err(PlanError::LocalShapeMismatch { rank: 5, .. })));
}

#[test]
fn torch_chunking_rule_for_uneven_shards() {
    // torch.chunk(arange(10), 4) -> sizes [3, 3, 3, 1]; 5 split 4 ways -> [2, 2, 1, 0].
    let l = Layout::from_parts([4], vec![Placement::Shard(0)]).unwrap();
    let sizes: Vec<u64> = (0..4).map(|r| l.local_shape(&[10], r)[0]).collect();
    assert_eq!(sizes, [3, 3, 3, 1]);
    let sizes: Vec<u64> = (0..4).map(|r| l.local_shape(&[5], r)[0]).collect();
    assert_eq!(sizes, [2, 2, 1, 0]);
    // 2 split 4 ways: [1, 1, 0, 0], empty shards start at the end.
    assert_eq!(l.local_box(&[2], 3), vec![2..2]);
    // Nested: mesh (2, 3) both Shard(0) over 10 rows: outer [5, 5], then each 5 split 3 -> [2, 2, 1].
    let l = Layout::from_parts([2, 3], vec![Placement::Shard(0), Placement::Shard(0)]).unwrap();
    let boxes: Vec<_> = (0..6).map(|r| l.local_box(&[10], r)[0].clone()).collect();
    assert_eq!(boxes, vec![0..2, 2..4, 4..5, 5..7, 7..9, 9..10]);
}

fn bytes_sent_by(plan: &BatchPlan) -> std::collections::BTreeMap<u32, u64> {
    let mut m = std::collections::BTreeMap::new();
    for b in plan.buckets() {
        *m.entry(b.src_rank).or_insert(0) += b.bytes;
    }
    m
}

#[test]
fn replicas_share_the_sending_load() {
    // Four replicas, one destination: each replica sends a quarter.
    let pair = PairPlan::new(
        Layout::from_parts([4], vec![Placement::Replicate]).unwrap(),
        Layout::from_parts([1], vec![Placement::Replicate]).unwrap(),
    )
    .unwrap();
    let t = BatchTensor { pair: 0, meta: TensorMeta::new("w", [64, 8], DType::F32) };
    let plan = BatchPlan::build(&[&pair], &[t], None, Scope::All).unwrap();
    let sent = bytes_sent_by(&plan);
    assert_eq!(sent.len(), 4, "every replica sends: {sent:?}");
    assert!(sent.values().all(|&b| b == 64 * 8 * 4 / 4), "{sent:?}");

    // FSDP x TP (2x4, replicated over the first dim) to 4 TP ranks: both replicas of a TP shard send.
    let pair = PairPlan::new(
        Layout::from_parts([2, 4], vec![Placement::Replicate, Placement::Shard(0)]).unwrap(),
        Layout::from_parts([4], vec![Placement::Shard(0)]).unwrap(),
    )
    .unwrap();
    let ts: Vec<BatchTensor> = (0..8)
        .map(|i| BatchTensor { pair: 0, meta: TensorMeta::new(format!("w{i}"), [1024, 16], DType::BF16) })
        .collect();
    let plan = BatchPlan::build(&[&pair], &ts, None, Scope::All).unwrap();
    let sent = bytes_sent_by(&plan);
    assert_eq!(sent.len(), 8, "{sent:?}");
    let (lo, hi) = (sent.values().min().unwrap(), sent.values().max().unwrap());
    assert_eq!(lo, hi, "replicas unevenly loaded: {sent:?}");
}

#[test]
fn partial_sources_reduce_on_the_serving_rank() {
    let pair = PairPlan::new(
        Layout::from_parts([2, 2], vec![Placement::Shard(0), Placement::Partial(ReduceOp::Sum)]).unwrap(),
        Layout::from_parts([1], vec![Placement::Replicate]).unwrap(),
    )
    .unwrap();
    assert_eq!(pair.contributors(0), vec![0, 1]);
    assert_eq!(pair.contributors(3), vec![2, 3]);
    assert_eq!(pair.serving_group(2), vec![2, 3]);
    let t = BatchTensor { pair: 0, meta: TensorMeta::new("g", [8, 4], DType::F32) };
    let plan = BatchPlan::build(&[&pair], &[t], None, Scope::All).unwrap();
    assert_eq!(plan.tensors[0].reduce, Some(ReduceOp::Sum));
    assert_eq!(bytes_sent_by(&plan).len(), 4, "both members of each partial group reduce a piece");
}

#[test]
fn strided_chunks_split_across_buckets_by_rows() {
    // Column shards: 16 rows of 4 f32 each from 2 sources into one destination row-major shard.
    let pair = PairPlan::new(
        Layout::from_parts([2], vec![Placement::Shard(1)]).unwrap(),
        Layout::from_parts([1], vec![Placement::Replicate]).unwrap(),
    )
    .unwrap();
    let t = BatchTensor { pair: 0, meta: TensorMeta::new("w", [16, 8], DType::F32) };
    let plan = BatchPlan::build(&[&pair], std::slice::from_ref(&t), None, Scope::All).unwrap();
    assert_eq!(plan.all_chunks().len(), 2, "one strided chunk per source");
    let c = plan.all_chunks()[1];
    assert_eq!((c.src_offset, c.dst_offset, c.len, c.rows, c.src_pitch, c.dst_pitch), (0, 16, 16, 16, 16, 32));
    let plan = BatchPlan::build(&[&pair], &[t], Some(40), Scope::All).unwrap();
    assert!(plan.buckets().iter().all(|b| b.bytes <= 40));
    assert_eq!(plan.buckets().len(), 16, "two 16-byte rows per 40-byte bucket");
}
