//! Batch specialization: concrete tensors turn a pair plan's supplies into byte-level chunks,
//! grouped per link (pair, source rank, destination rank) into buckets of at most `bucket_size`
//! bytes. Deterministic: the buckets of a link are identical whichever rank computes them, and a
//! rank can compute only its own share ([`Scope::Rank`]) in time proportional to that share.

use crate::pair::Supply;
use crate::{DType, PairPlan, PlanError, ReduceOp, Result, Side};
use std::collections::HashMap;
use std::ops::Range;

/// Default bucket size: 32 MiB. Large enough that per-bucket overhead (a syscall, a control
/// message) is negligible next to the copy, small enough to bound staging where a copy is needed.
pub const DEFAULT_BUCKET_SIZE: u64 = 32 << 20;

/// A tensor's global description: shape, dtype and a name for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: DType,
}

impl TensorMeta {
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<u64>>, dtype: DType) -> Self {
        TensorMeta { name: name.into(), shape: shape.into(), dtype }
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Checks the other side's view of the same tensor.
    pub fn check_matches(&self, dst: &TensorMeta) -> Result<()> {
        if self.shape != dst.shape {
            return Err(PlanError::ShapeMismatch {
                tensor: self.name.clone(),
                src: self.shape.clone(),
                dst: dst.shape.clone(),
            });
        }
        if self.dtype != dst.dtype {
            return Err(PlanError::DTypeMismatch { tensor: self.name.clone(), src: self.dtype, dst: dst.dtype });
        }
        Ok(())
    }
}

/// Whether `strides` (in elements) lay `shape` out contiguously in row-major order, judged as
/// torch judges it: the strides of size-1 dimensions do not matter, and an empty tensor is
/// contiguous. Never overflows: a stride that would exceed `u64` cannot match.
pub fn is_contiguous(shape: &[u64], strides: &[u64]) -> bool {
    if shape.len() != strides.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut expected: Option<u64> = Some(1);
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n == 1 {
            continue;
        }
        if expected != Some(s) {
            return false;
        }
        expected = expected.and_then(|e| e.checked_mul(n));
    }
    true
}

/// Contiguous row-major strides, in elements.
pub fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1]);
    }
    s
}

/// One tensor of a batch: which pair it travels on and its global description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTensor {
    pub pair: usize,
    pub meta: TensorMeta,
}

/// Whose share of the batch to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every link of every rank (for tests, tools and planning reports).
    All,
    /// What one rank sends (`Side::Src`) or receives (`Side::Dst`), on every pair of the batch.
    Rank(Side, usize),
}

/// `rows` contiguous runs of `len` bytes: run `i` goes from `src_offset + i*src_pitch` in the
/// source rank's local tensor to `dst_offset + i*dst_pitch` in the destination rank's. Offsets are
/// relative to the start of each rank's (contiguous, row-major) local shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the tensor in the batch.
    pub tensor: u32,
    pub src_rank: u32,
    pub dst_rank: u32,
    pub src_offset: u64,
    pub dst_offset: u64,
    pub len: u64,
    pub rows: u64,
    pub src_pitch: u64,
    pub dst_pitch: u64,
}

impl Chunk {
    pub fn bytes(&self) -> u64 {
        self.len * self.rows
    }

    /// The contiguous runs as `(src_offset, dst_offset, len)`.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        (0..self.rows)
            .map(move |i| (self.src_offset + i * self.src_pitch, self.dst_offset + i * self.dst_pitch, self.len))
    }
}

/// The unit of transfer: chunks of one link, at most `bucket_size` bytes in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub pair: u32,
    pub src_rank: u32,
    pub dst_rank: u32,
    /// Position of this bucket among its link's buckets.
    pub seq: u32,
    pub bytes: u64,
    chunks: Range<usize>,
}

/// Per-tensor facts a transport needs next to the chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub pair: usize,
    pub meta: TensorMeta,
    /// Set when the source holds partial values that the serving rank reduces before sending.
    pub reduce: Option<ReduceOp>,
}

/// The chunks and buckets of one batch (or of one rank's share of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub bucket_size: u64,
    pub tensors: Vec<TensorInfo>,
    chunks: Vec<Chunk>,
    buckets: Vec<Bucket>,
}

impl BatchPlan {
    /// Specializes `pairs` for `tensors`, computing only what `scope` asks for.
    pub fn build(pairs: &[&PairPlan], tensors: &[BatchTensor], bucket_size: Option<u64>, scope: Scope) -> Result<Self> {
        let bucket_size = bucket_size.unwrap_or(DEFAULT_BUCKET_SIZE);
        if bucket_size == 0 {
            return Err(PlanError::ZeroBucketSize);
        }
        // Buckets never split an element (a reducer combines whole elements).
        if let Some(t) = tensors.iter().find(|t| (t.meta.dtype.size() as u64) > bucket_size) {
            return Err(PlanError::BucketTooSmall { bucket_size, tensor: t.meta.name.clone(), dtype: t.meta.dtype });
        }
        let mut infos = Vec::with_capacity(tensors.len());
        for t in tensors {
            let pair = *pairs.get(t.pair).ok_or(PlanError::UnknownPair { pair: t.pair, pairs: pairs.len() })?;
            pair.check_ndim(t.meta.shape.len())?;
            let bytes = t.meta.shape.iter().fold(t.meta.dtype.size() as u128, |a, &n| a.saturating_mul(n as u128));
            if bytes > (1u128 << 62) {
                return Err(PlanError::TensorTooLarge { tensor: t.meta.name.clone(), bytes });
            }
            if let Scope::Rank(side, rank) = scope {
                pair.check_rank(side, rank)?;
            }
            infos.push(TensorInfo { pair: t.pair, meta: t.meta.clone(), reduce: pair.src().partial_op() });
        }

        // Gather every chunk per link (pair, src, dst), in tensor order, which makes buckets
        // identical on both sides. Tensors of one pair with the same shape and element size get
        // the same chunks (up to the load-sharing rotation), so those are computed once.
        let mut links: HashMap<(u32, u32, u32), Vec<Chunk>> = HashMap::new();
        let mut memo: HashMap<(usize, &[u64], usize, usize), Vec<Chunk>> = HashMap::new();
        let mut supplies = Vec::new();
        for (ti, t) in tensors.iter().enumerate() {
            let pair = pairs[t.pair];
            let key = (t.pair, t.meta.shape.as_slice(), t.meta.dtype.size(), ti % pair.serving_group_len());
            let chunks = memo.entry(key).or_insert_with(|| {
                supplies.clear();
                match scope {
                    Scope::All => {
                        for d in 0..pair.dst().world_size() {
                            pair.supplies_to(&t.meta.shape, ti, d, &mut supplies);
                        }
                    }
                    Scope::Rank(Side::Dst, d) => pair.supplies_to(&t.meta.shape, ti, d, &mut supplies),
                    Scope::Rank(Side::Src, s) => pair.supplies_from(&t.meta.shape, ti, s, &mut supplies),
                }
                let mut out = Vec::new();
                for s in &supplies {
                    emit_chunks(pair, &t.meta, 0, s, |c| out.push(c));
                }
                out
            });
            // One map lookup per run of chunks on the same link.
            for run in chunks.chunk_by(|a, b| (a.src_rank, a.dst_rank) == (b.src_rank, b.dst_rank)) {
                let v = links.entry((t.pair as u32, run[0].src_rank, run[0].dst_rank)).or_default();
                v.extend(run.iter().map(|c| Chunk { tensor: ti as u32, ..*c }));
            }
        }
        let mut keys: Vec<_> = links.keys().copied().collect();
        keys.sort_unstable();

        let total: usize = links.values().map(Vec::len).sum();
        let mut plan =
            BatchPlan { bucket_size, tensors: infos, chunks: Vec::with_capacity(total), buckets: Vec::new() };
        for key in keys {
            let link = links.remove(&key).expect("key from the map");
            plan.bucketize(key, link.into_iter());
        }
        Ok(plan)
    }

    fn bucketize(&mut self, (pair, src_rank, dst_rank): (u32, u32, u32), link: impl Iterator<Item = Chunk>) {
        let bs = self.bucket_size;
        let mut seq = 0u32;
        let mut start = self.chunks.len();
        let mut fill = 0u64;
        let mut close = |plan: &mut BatchPlan, fill: &mut u64, start: &mut usize| {
            if *fill > 0 {
                plan.buckets.push(Bucket {
                    pair,
                    src_rank,
                    dst_rank,
                    seq,
                    bytes: *fill,
                    chunks: *start..plan.chunks.len(),
                });
                seq += 1;
            }
            *fill = 0;
            *start = plan.chunks.len();
        };
        for c in link {
            let mut c = c;
            if c.rows > 1 && c.len <= bs {
                // Whole rows per bucket.
                while c.rows > 0 {
                    let fit = (bs - fill) / c.len;
                    if fit == 0 {
                        close(self, &mut fill, &mut start);
                        continue;
                    }
                    let take = fit.min(c.rows);
                    self.push_chunk(Chunk { rows: take, ..c }, start);
                    fill += take * c.len;
                    c.src_offset += take * c.src_pitch;
                    c.dst_offset += take * c.dst_pitch;
                    c.rows -= take;
                    if fill == bs {
                        close(self, &mut fill, &mut start);
                    }
                }
            } else {
                // Rows one by one, each split across buckets as needed, on element boundaries.
                let es = self.tensors[c.tensor as usize].meta.dtype.size() as u64;
                for (so, doff, len) in c.runs().collect::<Vec<_>>() {
                    let mut done = 0;
                    while done < len {
                        let take = (bs - fill).min(len - done) / es * es;
                        if take == 0 {
                            close(self, &mut fill, &mut start);
                            continue;
                        }
                        let piece = Chunk {
                            src_offset: so + done,
                            dst_offset: doff + done,
                            len: take,
                            rows: 1,
                            src_pitch: 0,
                            dst_pitch: 0,
                            ..c
                        };
                        self.push_chunk(piece, start);
                        fill += take;
                        done += take;
                        if fill == bs {
                            close(self, &mut fill, &mut start);
                        }
                    }
                }
            }
        }
        close(self, &mut fill, &mut start);
    }

    /// Appends a chunk to the open bucket (which starts at `start`), coalescing it with the
    /// previous chunk when both are single runs that continue each other.
    fn push_chunk(&mut self, c: Chunk, start: usize) {
        if self.chunks.len() > start {
            let prev = self.chunks.last_mut().expect("non-empty");
            if prev.tensor == c.tensor
                && prev.rows == 1
                && c.rows == 1
                && prev.src_offset + prev.len == c.src_offset
                && prev.dst_offset + prev.len == c.dst_offset
            {
                prev.len += c.len;
                return;
            }
        }
        self.chunks.push(c);
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// The chunks of `bucket`.
    pub fn chunks(&self, bucket: &Bucket) -> &[Chunk] {
        &self.chunks[bucket.chunks.clone()]
    }

    /// Every chunk, bucket by bucket.
    pub fn all_chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Bytes written to destinations.
    pub fn total_bytes(&self) -> u64 {
        self.buckets.iter().map(|b| b.bytes).sum()
    }
}

/// Turns one supply (a box of the global tensor) into strided chunks between the two local shards.
fn emit_chunks(pair: &PairPlan, meta: &TensorMeta, tensor: u32, s: &Supply, mut push: impl FnMut(Chunk)) {
    let es = meta.dtype.size() as u64;
    let src_box = pair.src().local_box(&meta.shape, s.src_rank as usize);
    let dst_box = pair.dst().local_box(&meta.shape, s.dst_rank as usize);
    let n = meta.shape.len();
    let mk = |src_offset, dst_offset, len, rows, src_pitch, dst_pitch| Chunk {
        tensor,
        src_rank: s.src_rank,
        dst_rank: s.dst_rank,
        src_offset,
        dst_offset,
        len,
        rows,
        src_pitch,
        dst_pitch,
    };
    if n == 0 {
        push(mk(0, 0, es, 1, 0, 0));
        return;
    }
    let ext: Vec<u64> = s.region.iter().map(|r| r.end - r.start).collect();
    let src_shape: Vec<u64> = src_box.iter().map(|r| r.end - r.start).collect();
    let dst_shape: Vec<u64> = dst_box.iter().map(|r| r.end - r.start).collect();
    let ss = contiguous_strides(&src_shape);
    let ds = contiguous_strides(&dst_shape);
    // The run covers dims k.. : inner dims that both shards hold whole are folded in.
    let mut k = n - 1;
    let mut run = ext[k];
    while k > 0 && ext[k] == src_shape[k] && ext[k] == dst_shape[k] {
        k -= 1;
        run *= ext[k];
    }
    let (rows, sp, dp) = if k > 0 { (ext[k - 1], ss[k - 1] * es, ds[k - 1] * es) } else { (1, 0, 0) };
    let outer = k.saturating_sub(1);
    // Enumerate dims 0..outer; dim outer-1 fastest.
    let mut idx = vec![0u64; outer];
    loop {
        let (mut so, mut doff) = (0u64, 0u64);
        for d in 0..n {
            let g = s.region[d].start + if d < outer { idx[d] } else { 0 };
            so += (g - src_box[d].start) * ss[d];
            doff += (g - dst_box[d].start) * ds[d];
        }
        push(mk(so * es, doff * es, run * es, rows, sp, dp));
        let mut d = outer;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < ext[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}
