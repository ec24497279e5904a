//! Every way a layout or plan request can be wrong gets its own typed error and a clear message.

use tensorbus_planner::*;

#[test]
fn bad_meshes() {
    assert_eq!(DeviceMesh::new(vec![]), Err(PlanError::EmptyMesh));
    let e = DeviceMesh::new(vec![2, 0]).unwrap_err();
    assert_eq!(e, PlanError::ZeroSizedMeshDim { dim: 1, shape: vec![2, 0] });
    assert!(e.to_string().contains("dimension 1 has size 0"), "{e}");
    assert!(matches!(DeviceMesh::new(vec![1 << 20, 2]), Err(PlanError::MeshTooLarge { .. })));
}

#[test]
fn bad_placements() {
    let e = Layout::from_parts([2, 2], vec![Placement::Shard(0)]).unwrap_err();
    assert_eq!(e, PlanError::PlacementCount { mesh_dims: 2, placements: 1 });
    let e = Layout::from_parts([2, 2], vec![Placement::Partial(ReduceOp::Sum), Placement::Partial(ReduceOp::Max)]);
    assert!(matches!(e, Err(PlanError::MixedReduceOps { .. })));
    let l = Layout::from_parts([2], vec![Placement::Shard(2)]).unwrap();
    let e = l.check_ndim(2).unwrap_err();
    assert_eq!(e, PlanError::ShardDimOutOfRange { mesh_dim: 0, shard_dim: 2, ndim: 2 });
    assert!(e.to_string().contains("Shard(2) but the tensor has only 2 dimensions"), "{e}");
    for bad in ["S", "S(x)", "Q", "P(prod)", "S(1"] {
        assert!(matches!(bad.parse::<Placement>(), Err(PlanError::BadPlacement(_))), "{bad}");
    }
    assert_eq!(
        parse_placements("S(0), R,P(max)").unwrap(),
        vec![Placement::Shard(0), Placement::Replicate, Placement::Partial(ReduceOp::Max)]
    );
    assert_eq!(parse_placements("Shard(1)").unwrap(), vec![Placement::Shard(1)]);
    assert_eq!(parse_mesh_shape("2x4").unwrap().shape(), &[2, 4]);
    assert!(parse_mesh_shape("2x0").is_err());
}

#[test]
fn partial_on_destination_is_refused() {
    let src = Layout::from_parts([2], vec![Placement::Shard(0)]).unwrap();
    let dst = Layout::from_parts([2, 2], vec![Placement::Replicate, Placement::Partial(ReduceOp::Sum)]).unwrap();
    let e = PairPlan::new(src, dst).unwrap_err();
    assert_eq!(e, PlanError::PartialOnDestination { mesh_dim: 1 });
    assert!(e.to_string().contains("receiving side"));
}

#[test]
fn world_size_and_rank_checks() {
    let l = Layout::from_parts([2, 4], vec![Placement::Shard(0), Placement::Shard(1)]).unwrap();
    let e = l.check_world_size(Side::Src, 4).unwrap_err();
    assert!(e.to_string().contains("source world size is 4 but its mesh [2, 4] has 8 ranks"), "{e}");
    let pair = PairPlan::new(l, Layout::from_parts([4], vec![Placement::Shard(0)]).unwrap()).unwrap();
    let t = BatchTensor { pair: 0, meta: TensorMeta::new("w", [8, 8], DType::F32) };
    let e = BatchPlan::build(&[&pair], std::slice::from_ref(&t), None, Scope::Rank(Side::Dst, 4)).unwrap_err();
    assert_eq!(e, PlanError::RankOutOfRange { side: Side::Dst, rank: 4, world_size: 4 });
    let e = BatchPlan::build(&[&pair], std::slice::from_ref(&t), Some(0), Scope::All).unwrap_err();
    assert_eq!(e, PlanError::ZeroBucketSize);
    let bad = BatchTensor { pair: 1, ..t.clone() };
    assert_eq!(BatchPlan::build(&[&pair], &[bad], None, Scope::All), Err(PlanError::UnknownPair { pair: 1, pairs: 1 }));
    let vec1 = BatchTensor { pair: 0, meta: TensorMeta::new("b", [8], DType::F32) };
    assert!(matches!(BatchPlan::build(&[&pair], &[vec1], None, Scope::All), Err(PlanError::ShardDimOutOfRange { .. })));
}

#[test]
fn sides_must_agree_on_shape_and_dtype() {
    let a = TensorMeta::new("w", [8, 8], DType::F32);
    assert!(a.check_matches(&a.clone()).is_ok());
    let e = a.check_matches(&TensorMeta::new("w", [8, 4], DType::F32)).unwrap_err();
    assert!(matches!(e, PlanError::ShapeMismatch { .. }));
    assert!(e.to_string().contains("source [8, 8], destination [8, 4]"), "{e}");
    let e = a.check_matches(&TensorMeta::new("w", [8, 8], DType::BF16)).unwrap_err();
    assert!(e.to_string().contains("source float32, destination bfloat16"), "{e}");
}

#[test]
fn dtypes_parse_and_size() {
    for d in DType::ALL {
        assert_eq!(d.name().parse::<DType>().unwrap(), d);
        assert_eq!(format!("torch.{}", d.name()).parse::<DType>().unwrap(), d);
    }
    assert_eq!("bf16".parse::<DType>().unwrap().size(), 2);
    assert_eq!("complex128".parse::<DType>().unwrap().size(), 16);
    assert_eq!("float8_e5m2".parse::<DType>().unwrap().size(), 1);
    assert!(matches!("float7".parse::<DType>(), Err(PlanError::UnknownDType(_))));
}
