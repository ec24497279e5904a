//! # tensorbus-planner
//!
//! The resharding planner: given how two process groups lay out the same logical tensor
//! (a [`DeviceMesh`] and one [`Placement`] per mesh dimension on each side), it computes exactly the
//! byte copies each rank must do. Pure code: no I/O, no clocks, no threads, deterministic.
//!
//! Data flows in two stages, as in Etha:
//! - [`PairPlan`] (once per pair, shape-independent): validated layouts, the serving groups of
//!   replicated / partial sources, and the rule that deals each destination region to one source.
//! - [`BatchPlan`] (once per registered batch): for concrete [`TensorMeta`]s, [`Chunk`]s (strided
//!   byte runs between two local shards) grouped per link into [`Bucket`]s of at most
//!   `bucket_size` bytes. [`Scope::Rank`] computes one rank's share only.
//!
//! Sharding follows PyTorch DTensor exactly: torch's chunk rule for uneven shards, nested shards of
//! one tensor dimension in mesh-dimension order.
//!
//! ```
//! use tensorbus_planner::*;
//! let src = Layout::from_parts([2, 4], vec![Placement::Shard(0), Placement::Shard(1)]).unwrap();
//! let dst = Layout::from_parts([4], vec![Placement::Shard(0)]).unwrap();
//! let pair = PairPlan::new(src, dst).unwrap();
//! let t = BatchTensor { pair: 0, meta: TensorMeta::new("w", [1024, 512], DType::BF16) };
//! let plan = BatchPlan::build(&[&pair], &[t], None, Scope::All).unwrap();
//! assert_eq!(plan.total_bytes(), 1024 * 512 * 2);
//! ```

mod batch;
mod dtype;
mod error;
mod layout;
mod pair;

pub use batch::{
    contiguous_strides, is_contiguous, BatchPlan, BatchTensor, Bucket, Chunk, Scope, TensorInfo, TensorMeta,
    DEFAULT_BUCKET_SIZE,
};
pub use dtype::DType;
pub use error::{PlanError, Result};
pub use layout::{parse_mesh_shape, parse_placements, DeviceMesh, Layout, Placement, ReduceOp, Side, MAX_RANKS};
pub use pair::{PairPlan, Supply};
