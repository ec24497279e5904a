//! The pair plan: shape-independent structure of one (source layout, destination layout) link,
//! computed once per pair, and the rule that answers "which source rank supplies which region of
//! destination rank d" for a concrete global shape.
//!
//! Load sharing: all source ranks that hold the same region (they differ only along `Replicate` or
//! `Partial` mesh dimensions) form a *serving group*. Each region a destination needs is split
//! along its outermost non-trivial dimension into one piece per group member, and the pieces are
//! dealt out with a rotation that depends on the tensor and the destination rank, so replicas share
//! the sending load evenly. For a `Partial` source the serving member is the *reducer*: it combines
//! the piece from every member of its partial set (the ranks that differ from it only along
//! `Partial` dimensions) before the bytes reach the destination.

use crate::layout::{chunk_range, odometer};
use crate::{Layout, Placement, PlanError, Result, Side};
use std::ops::Range;

/// Coordinates along a tensor dimension's sharding mesh dims, and the interval they hold.
type Candidate = (Vec<usize>, Range<u64>);

/// One region one source rank supplies to one destination rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supply {
    pub src_rank: u32,
    pub dst_rank: u32,
    /// The region in global coordinates (non-empty).
    pub region: Vec<Range<u64>>,
}

/// The validated, shape-independent plan for one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairPlan {
    src: Layout,
    dst: Layout,
    /// Source mesh dims along which ranks hold the same region (Replicate and Partial).
    src_serving_dims: Vec<usize>,
    /// Source mesh dims along which ranks hold partial values of the same region.
    src_partial_dims: Vec<usize>,
    /// Destination mesh dims along which ranks need the same region.
    dst_replicate_dims: Vec<usize>,
}

fn dims_where(l: &Layout, f: impl Fn(&Placement) -> bool) -> Vec<usize> {
    (0..l.placements().len()).filter(|&i| f(&l.placements()[i])).collect()
}

/// Intersection of two boxes; `None` when empty in any dimension.
pub(crate) fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Option<Vec<Range<u64>>> {
    let mut out = Vec::with_capacity(a.len());
    for (x, y) in a.iter().zip(b) {
        let r = x.start.max(y.start)..x.end.min(y.end);
        if r.start >= r.end {
            return None;
        }
        out.push(r);
    }
    Some(out)
}

impl PairPlan {
    /// Validates both layouts for use as a pair (no `Partial` on the receiving side).
    pub fn new(src: Layout, dst: Layout) -> Result<Self> {
        if let Some(mesh_dim) = dst.placements().iter().position(|p| matches!(p, Placement::Partial(_))) {
            return Err(PlanError::PartialOnDestination { mesh_dim });
        }
        Ok(PairPlan {
            src_serving_dims: dims_where(&src, |p| !matches!(p, Placement::Shard(_))),
            src_partial_dims: dims_where(&src, |p| matches!(p, Placement::Partial(_))),
            dst_replicate_dims: dims_where(&dst, |p| matches!(p, Placement::Replicate)),
            src,
            dst,
        })
    }

    pub fn src(&self) -> &Layout {
        &self.src
    }

    pub fn dst(&self) -> &Layout {
        &self.dst
    }

    pub fn layout(&self, side: Side) -> &Layout {
        match side {
            Side::Src => &self.src,
            Side::Dst => &self.dst,
        }
    }

    /// Checks a tensor of `ndim` dimensions against both layouts.
    pub fn check_ndim(&self, ndim: usize) -> Result<()> {
        self.src.check_ndim(ndim)?;
        self.dst.check_ndim(ndim)
    }

    /// Checks that `rank` exists on `side`.
    pub fn check_rank(&self, side: Side, rank: usize) -> Result<()> {
        let world_size = self.layout(side).world_size();
        if rank >= world_size {
            return Err(PlanError::RankOutOfRange { side, rank, world_size });
        }
        Ok(())
    }

    fn varying(&self, layout: &Layout, rank: usize, dims: &[usize]) -> Vec<u32> {
        let mut coords = layout.mesh().coords(rank);
        for &d in dims {
            coords[d] = 0;
        }
        let mut out = Vec::new();
        loop {
            out.push(layout.mesh().rank_of(&coords) as u32);
            if !odometer(&mut coords, dims, layout.mesh().shape()) {
                return out;
            }
        }
    }

    /// Source ranks holding the same region as `src_rank` (itself included), in rank order.
    pub fn serving_group(&self, src_rank: usize) -> Vec<u32> {
        self.varying(&self.src, src_rank, &self.src_serving_dims)
    }

    /// Size of every serving group of this pair (the product of the source's Replicate and
    /// Partial mesh dimensions).
    pub fn serving_group_len(&self) -> usize {
        self.src_serving_dims.iter().map(|&d| self.src.mesh().shape()[d]).product()
    }

    /// Source ranks whose partial values `src_rank` reduces when it serves a region (itself
    /// included, in rank order); just `[src_rank]` when the source holds no `Partial` dimension.
    pub fn contributors(&self, src_rank: usize) -> Vec<u32> {
        self.varying(&self.src, src_rank, &self.src_partial_dims)
    }

    /// Calls `f(base_coords, box)` for each distinct region of `layout` that meets `target`: one
    /// per combination of coordinates along the sharding mesh dimensions (other coordinates 0).
    /// Work is proportional to the sum of per-dimension candidates plus the output.
    fn regions_meeting(
        layout: &Layout,
        shape: &[u64],
        target: &[Range<u64>],
        mut f: impl FnMut(&[usize], &[Range<u64>]),
    ) {
        let nmesh = layout.mesh().ndim();
        // Per tensor dim: the candidate (coords along its sharding mesh dims, interval) lists.
        let mut per_dim: Vec<(Vec<usize>, Vec<Candidate>)> = Vec::with_capacity(shape.len());
        for (d, &n) in shape.iter().enumerate() {
            let dims = layout.mesh_dims_sharding(d);
            let mut cands = Vec::new();
            let mut coords = vec![0usize; nmesh];
            loop {
                let mut r = 0..n;
                for &i in &dims {
                    r = chunk_range(r, layout.mesh().shape()[i] as u64, coords[i] as u64);
                }
                if r.start.max(target[d].start) < r.end.min(target[d].end) {
                    cands.push((dims.iter().map(|&i| coords[i]).collect(), r));
                }
                if !odometer(&mut coords, &dims, layout.mesh().shape()) {
                    break;
                }
            }
            if cands.is_empty() {
                return;
            }
            per_dim.push((dims, cands));
        }
        // Cartesian product over tensor dims.
        let mut idx = vec![0usize; shape.len()];
        let mut coords = vec![0usize; nmesh];
        let mut bx: Vec<Range<u64>> = Vec::with_capacity(shape.len());
        loop {
            bx.clear();
            for (d, (dims, cands)) in per_dim.iter().enumerate() {
                let (c, r) = &cands[idx[d]];
                for (k, &i) in dims.iter().enumerate() {
                    coords[i] = c[k];
                }
                bx.push(r.clone());
            }
            f(&coords, &bx);
            // Advance the product index, last dim fastest.
            let mut d = shape.len();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < per_dim[d].1.len() {
                    break;
                }
                idx[d] = 0;
            }
        }
    }

    /// Splits `region` into one piece per member of a serving group of `group_len` and calls
    /// `f(member_index, piece)` for each non-empty piece, in piece order.
    fn deal(region: &[Range<u64>], group_len: usize, rot: usize, mut f: impl FnMut(usize, Vec<Range<u64>>)) {
        if group_len == 1 || region.is_empty() {
            f(0, region.to_vec());
            return;
        }
        let axis = region.iter().position(|r| r.end - r.start > 1).unwrap_or(0);
        for j in 0..group_len {
            let piece = chunk_range(region[axis].clone(), group_len as u64, j as u64);
            if piece.start < piece.end {
                let mut p = region.to_vec();
                p[axis] = piece;
                f((j + rot) % group_len, p);
            }
        }
    }

    /// Everything destination rank `dst_rank` receives of a tensor of `shape` (the `tensor`-th of
    /// its batch, which seeds the load-sharing rotation), in a deterministic order.
    pub fn supplies_to(&self, shape: &[u64], tensor: usize, dst_rank: usize, out: &mut Vec<Supply>) {
        let dst_box = self.dst.local_box(shape, dst_rank);
        if dst_box.iter().any(|r| r.start >= r.end) {
            return;
        }
        Self::regions_meeting(&self.src, shape, &dst_box, |coords, bx| {
            let Some(inter) = intersect(bx, &dst_box) else { return };
            let base = self.src.mesh().rank_of(coords);
            let group = self.serving_group(base);
            let rot = (tensor + dst_rank) % group.len();
            Self::deal(&inter, group.len(), rot, |m, region| {
                out.push(Supply { src_rank: group[m], dst_rank: dst_rank as u32, region })
            });
        });
    }

    /// Everything source rank `src_rank` sends of a tensor of `shape`: the same supplies
    /// `supplies_to` assigns to it, grouped by destination rank in increasing order.
    pub fn supplies_from(&self, shape: &[u64], tensor: usize, src_rank: usize, out: &mut Vec<Supply>) {
        let src_box = self.src.local_box(shape, src_rank);
        if src_box.iter().any(|r| r.start >= r.end) {
            return;
        }
        let group = self.serving_group(src_rank);
        let me = group.iter().position(|&r| r as usize == src_rank).expect("rank is in its own group");
        let mut dsts = Vec::new();
        Self::regions_meeting(&self.dst, shape, &src_box, |coords, _| {
            dsts.extend(self.varying(&self.dst, self.dst.mesh().rank_of(coords), &self.dst_replicate_dims));
        });
        dsts.sort_unstable();
        for d in dsts {
            let dst_box = self.dst.local_box(shape, d as usize);
            let Some(inter) = intersect(&src_box, &dst_box) else { continue };
            let rot = (tensor + d as usize) % group.len();
            Self::deal(&inter, group.len(), rot, |m, region| {
                if m == me {
                    out.push(Supply { src_rank: src_rank as u32, dst_rank: d, region })
                }
            });
        }
    }
}
