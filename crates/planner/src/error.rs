//! The planner's error type: every way a layout, a tensor or a plan request can be wrong.

use crate::{DType, Side};

/// Why a layout, tensor or plan request was refused. Each variant names the offending value so a
/// user can fix their input without reading planner code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("device mesh has no dimensions; a 1-rank job uses mesh shape (1,)")]
    EmptyMesh,
    #[error("device mesh dimension {dim} has size 0 (mesh shape {shape:?}); every dimension needs at least one rank")]
    ZeroSizedMeshDim { dim: usize, shape: Vec<usize> },
    #[error("device mesh {shape:?} is too large ({size} ranks, limit {limit})")]
    MeshTooLarge { shape: Vec<usize>, size: u128, limit: u32 },
    #[error("{placements} placements given for a {mesh_dims}-dimensional mesh; give exactly one per mesh dimension")]
    PlacementCount { mesh_dims: usize, placements: usize },
    #[error("mesh dimension {mesh_dim} has Shard({shard_dim}) but the tensor has only {ndim} dimensions")]
    ShardDimOutOfRange { mesh_dim: usize, shard_dim: usize, ndim: usize },
    #[error("Partial placement on the receiving side (mesh dimension {mesh_dim}): only a source may hold partial values; it reduces them before sending")]
    PartialOnDestination { mesh_dim: usize },
    #[error("Partial placements with different reduce ops ({first} and {second}) in one layout are not supported")]
    MixedReduceOps { first: &'static str, second: &'static str },
    #[error("{side} world size is {world_size} but its mesh {mesh:?} has {mesh_size} ranks")]
    WorldSizeMismatch { side: Side, world_size: usize, mesh: Vec<usize>, mesh_size: usize },
    #[error("rank {rank} is outside the {side} mesh of {world_size} ranks")]
    RankOutOfRange { side: Side, rank: usize, world_size: usize },
    #[error("tensor {tensor}: global shapes differ between the sides: source {src:?}, destination {dst:?}")]
    ShapeMismatch { tensor: String, src: Vec<u64>, dst: Vec<u64> },
    #[error("tensor {tensor}: dtypes differ between the sides: source {src}, destination {dst}")]
    DTypeMismatch { tensor: String, src: DType, dst: DType },
    #[error("tensor {tensor}: rank {rank} has local shape {got:?} but the layout gives it {expected:?} of global shape {global:?}")]
    LocalShapeMismatch { tensor: String, rank: usize, got: Vec<u64>, expected: Vec<u64>, global: Vec<u64> },
    #[error("tensor {tensor}: ranks disagree on the number of dimensions ({a} and {b})")]
    RankDimsMismatch { tensor: String, a: usize, b: usize },
    #[error("expected one local shape per rank ({expected}), got {got}")]
    LocalShapeCount { expected: usize, got: usize },
    #[error("batch refers to pair index {pair} but only {pairs} pairs were given")]
    UnknownPair { pair: usize, pairs: usize },
    #[error("bucket size must be at least 1 byte")]
    ZeroBucketSize,
    #[error("bucket size {bucket_size} is smaller than one element of tensor {tensor} ({dtype}); buckets never split an element")]
    BucketTooSmall { bucket_size: u64, tensor: String, dtype: DType },
    #[error("tensor {tensor} has {bytes} bytes, beyond what one rank can address")]
    TensorTooLarge { tensor: String, bytes: u128 },
    #[error("unknown dtype {0:?}; use a torch name such as float32, bfloat16, float8_e4m3fn, int64, bool, complex64")]
    UnknownDType(String),
    #[error("cannot parse placement {0:?}; use S(d) / Shard(d), R / Replicate, P / Partial, or P(sum|avg|max|min)")]
    BadPlacement(String),
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;
