//! Layouts: a device mesh plus one placement per mesh dimension, and the DTensor sharding rule that
//! maps a global shape to each rank's local box.

use crate::{PlanError, Result};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Upper bound on ranks per side; keeps rank ids in `u32` and guards against absurd meshes.
pub const MAX_RANKS: u32 = 1 << 20;

/// Which side of a pair a layout or rank belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The sending side (e.g. the trainer).
    Src,
    /// The receiving side (e.g. the inference job).
    Dst,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Src => "source",
            Side::Dst => "destination",
        })
    }
}

/// An n-dimensional grid of one side's ranks; a rank's coordinate is its row-major index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceMesh {
    shape: Vec<usize>,
}

impl DeviceMesh {
    pub fn new(shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        if shape.is_empty() {
            return Err(PlanError::EmptyMesh);
        }
        if let Some(dim) = shape.iter().position(|&s| s == 0) {
            return Err(PlanError::ZeroSizedMeshDim { dim, shape });
        }
        let size = shape.iter().map(|&s| s as u128).product::<u128>();
        if size > MAX_RANKS as u128 {
            return Err(PlanError::MeshTooLarge { shape, size, limit: MAX_RANKS });
        }
        Ok(DeviceMesh { shape })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major coordinates of `rank` (which must be `< size()`).
    pub fn coords(&self, rank: usize) -> Vec<usize> {
        let mut c = vec![0; self.shape.len()];
        let mut r = rank;
        for (i, &s) in self.shape.iter().enumerate().rev() {
            c[i] = r % s;
            r /= s;
        }
        c
    }

    /// Rank at row-major coordinates `coords`.
    pub fn rank_of(&self, coords: &[usize]) -> usize {
        coords.iter().zip(&self.shape).fold(0, |acc, (&c, &s)| acc * s + c)
    }
}

/// How partial values combine when a `Partial` source is reduced before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReduceOp {
    #[default]
    Sum,
    Avg,
    Max,
    Min,
}

impl ReduceOp {
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

/// Where one mesh dimension puts the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Tensor dimension `d` is split across this mesh dimension (torch's chunking rule).
    Shard(usize),
    /// Every rank along this mesh dimension holds the same values.
    Replicate,
    /// Every rank along this mesh dimension holds a partial value; the logical value is their
    /// reduction.
    Partial(ReduceOp),
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Shard(d) => write!(f, "S({d})"),
            Placement::Replicate => f.write_str("R"),
            Placement::Partial(op) => write!(f, "P({})", op.name()),
        }
    }
}

impl FromStr for Placement {
    type Err = PlanError;
    /// Parses `S(d)`, `Shard(d)`, `R`, `Replicate`, `P`, `Partial`, `P(op)`, `Partial(op)`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || PlanError::BadPlacement(s.to_string());
        let t = s.trim().trim_end_matches("()");
        let (head, arg) = match t.find('(') {
            Some(i) if t.ends_with(')') => (&t[..i], Some(t[i + 1..t.len() - 1].trim())),
            Some(_) => return Err(bad()),
            None => (t, None),
        };
        match (head, arg) {
            ("S" | "Shard", Some(a)) => a.parse().map(Placement::Shard).map_err(|_| bad()),
            ("R" | "Replicate", None) => Ok(Placement::Replicate),
            ("P" | "Partial", None) => Ok(Placement::Partial(ReduceOp::Sum)),
            ("P" | "Partial", Some(op)) => {
                let op = op.trim_start_matches("reduce_op=").trim_matches(['"', '\'']);
                Ok(Placement::Partial(match op {
                    "sum" => ReduceOp::Sum,
                    "avg" => ReduceOp::Avg,
                    "max" => ReduceOp::Max,
                    "min" => ReduceOp::Min,
                    _ => return Err(bad()),
                }))
            }
            _ => Err(bad()),
        }
    }
}

/// Parses a comma-separated placement list such as `"S(0),R"` or `"Shard(0), Partial(sum)"`.
pub fn parse_placements(s: &str) -> Result<Vec<Placement>> {
    // Split on commas that are not inside parentheses.
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].parse()?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() || out.is_empty() {
        out.push(s[start..].parse()?);
    }
    Ok(out)
}

/// Parses a mesh shape such as `"2x4"`, `"2,4"` or `"8"`.
pub fn parse_mesh_shape(s: &str) -> Result<DeviceMesh> {
    let dims: std::result::Result<Vec<usize>, _> =
        s.split(['x', ',', '×']).filter(|p| !p.trim().is_empty()).map(|p| p.trim().parse()).collect();
    DeviceMesh::new(dims.map_err(|_| PlanError::EmptyMesh)?)
}

/// A validated device mesh with one placement per mesh dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    mesh: DeviceMesh,
    placements: Vec<Placement>,
}

impl Layout {
    pub fn new(mesh: DeviceMesh, placements: Vec<Placement>) -> Result<Self> {
        if placements.len() != mesh.ndim() {
            return Err(PlanError::PlacementCount { mesh_dims: mesh.ndim(), placements: placements.len() });
        }
        let mut op: Option<ReduceOp> = None;
        for p in &placements {
            if let Placement::Partial(o) = p {
                match op {
                    Some(first) if first != *o => {
                        return Err(PlanError::MixedReduceOps { first: first.name(), second: o.name() })
                    }
                    _ => op = Some(*o),
                }
            }
        }
        Ok(Layout { mesh, placements })
    }

    /// Convenience: a layout from a mesh shape and placements.
    pub fn from_parts(shape: impl Into<Vec<usize>>, placements: Vec<Placement>) -> Result<Self> {
        Layout::new(DeviceMesh::new(shape)?, placements)
    }

    pub fn mesh(&self) -> &DeviceMesh {
        &self.mesh
    }

    pub fn placements(&self) -> &[Placement] {
        &self.placements
    }

    pub fn world_size(&self) -> usize {
        self.mesh.size()
    }

    /// The reduce op when any mesh dimension is `Partial`.
    pub fn partial_op(&self) -> Option<ReduceOp> {
        self.placements.iter().find_map(|p| match p {
            Placement::Partial(op) => Some(*op),
            _ => None,
        })
    }

    /// Checks that every `Shard(d)` fits a tensor of `ndim` dimensions.
    pub fn check_ndim(&self, ndim: usize) -> Result<()> {
        for (mesh_dim, p) in self.placements.iter().enumerate() {
            if let Placement::Shard(d) = *p {
                if d >= ndim {
                    return Err(PlanError::ShardDimOutOfRange { mesh_dim, shard_dim: d, ndim });
                }
            }
        }
        Ok(())
    }

    /// Checks that a side's declared world size matches the mesh.
    pub fn check_world_size(&self, side: Side, world_size: usize) -> Result<()> {
        if world_size != self.world_size() {
            return Err(PlanError::WorldSizeMismatch {
                side,
                world_size,
                mesh: self.mesh.shape.clone(),
                mesh_size: self.world_size(),
            });
        }
        Ok(())
    }

    /// The box of the global tensor that `rank` holds: one half-open range per tensor dimension.
    ///
    /// Torch's rule, applied mesh dimension by mesh dimension (so nested shards of one tensor
    /// dimension split the previous piece): a piece of length `L` split `n` ways gives chunks of
    /// `ceil(L/n)`; trailing ranks get less, or an empty range at the piece's end.
    pub fn local_box(&self, global_shape: &[u64], rank: usize) -> Vec<Range<u64>> {
        let coords = self.mesh.coords(rank);
        self.box_for_coords(global_shape, &coords)
    }

    pub(crate) fn box_for_coords(&self, global_shape: &[u64], coords: &[usize]) -> Vec<Range<u64>> {
        let mut bx: Vec<Range<u64>> = global_shape.iter().map(|&n| 0..n).collect();
        for (i, p) in self.placements.iter().enumerate() {
            if let Placement::Shard(d) = *p {
                bx[d] = chunk_range(bx[d].clone(), self.mesh.shape[i] as u64, coords[i] as u64);
            }
        }
        bx
    }

    /// The local shape of `rank` for `global_shape`.
    pub fn local_shape(&self, global_shape: &[u64], rank: usize) -> Vec<u64> {
        self.local_box(global_shape, rank).iter().map(|r| r.end - r.start).collect()
    }

    /// Mesh dimensions that shard tensor dimension `d`, in mesh order.
    pub(crate) fn mesh_dims_sharding(&self, d: usize) -> Vec<usize> {
        (0..self.placements.len()).filter(|&i| self.placements[i] == Placement::Shard(d)).collect()
    }

    /// Recovers the global shape from every rank's local shape (uneven shards allowed), and checks
    /// each rank's local shape against it.
    pub fn global_shape_from_locals(&self, tensor: &str, locals: &[Vec<u64>]) -> Result<Vec<u64>> {
        let world = self.world_size();
        if locals.len() != world {
            return Err(PlanError::LocalShapeCount { expected: world, got: locals.len() });
        }
        let ndim = locals[0].len();
        if let Some(l) = locals.iter().find(|l| l.len() != ndim) {
            return Err(PlanError::RankDimsMismatch { tensor: tensor.to_string(), a: ndim, b: l.len() });
        }
        self.check_ndim(ndim)?;
        let mut global = locals[0].clone();
        for (d, g) in global.iter_mut().enumerate() {
            let dims = self.mesh_dims_sharding(d);
            if dims.is_empty() {
                continue;
            }
            // Nested pieces partition the dimension: summing one rank per combination of the
            // sharding mesh coordinates (others at 0) gives the global size.
            let mut coords = vec![0usize; self.mesh.ndim()];
            let mut total = 0u64;
            loop {
                total += locals[self.mesh.rank_of(&coords)][d];
                if !odometer(&mut coords, &dims, self.mesh.shape()) {
                    break;
                }
            }
            *g = total;
        }
        for (rank, got) in locals.iter().enumerate() {
            let expected = self.local_shape(&global, rank);
            if *got != expected {
                return Err(PlanError::LocalShapeMismatch {
                    tensor: tensor.to_string(),
                    rank,
                    got: got.clone(),
                    expected,
                    global,
                });
            }
        }
        Ok(global)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape: Vec<String> = self.mesh.shape.iter().map(|s| s.to_string()).collect();
        let pl: Vec<String> = self.placements.iter().map(|p| p.to_string()).collect();
        write!(f, "mesh {} [{}]", shape.join("x"), pl.join(","))
    }
}

/// Torch's chunk rule: piece `c` of `n` of the range `r`.
pub(crate) fn chunk_range(r: Range<u64>, n: u64, c: u64) -> Range<u64> {
    let len = r.end - r.start;
    let chunk = len.div_ceil(n);
    let start = (r.start + chunk * c).min(r.end);
    let end = (start + chunk).min(r.end);
    start..end
}

/// Advances `coords` over the mesh dimensions `dims` (last fastest); false once it wrapped around.
pub(crate) fn odometer(coords: &mut [usize], dims: &[usize], shape: &[usize]) -> bool {
    for &i in dims.iter().rev() {
        coords[i] += 1;
        if coords[i] < shape[i] {
            return true;
        }
        coords[i] = 0;
    }
    false
}
