//! `tensorbus worker` (hidden): a worker process for the demo and the tests. It connects to its
//! agent, pairs, allocates its local shards in shared memory, fills (source) or checks
//! (destination) them, transfers the batch `repeat` times, and reports JSON lines on stdout.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tensorbus_host::client::TensorBusClient;
use tensorbus_planner::{parse_placements, DType, Layout, Placement};
use tensorbus_protocol::host::TransferType;
use tensorbus_protocol::payload::{Memory, TensorDesc, PAYLOAD_VERSION};
use tensorbus_transport::shm::ShmSegment;

use crate::pattern;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairSpec {
    pub name: String,
    pub src_mesh: Vec<usize>,
    pub src_placements: String,
    pub dst_mesh: Vec<usize>,
    pub dst_placements: String,
}

impl PairSpec {
    pub fn layouts(&self) -> Result<(Layout, Layout), String> {
        let l = |m: &Vec<usize>, p: &str| {
            Layout::from_parts(m.clone(), parse_placements(p).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
        };
        Ok((l(&self.src_mesh, &self.src_placements)?, l(&self.dst_mesh, &self.dst_placements)?))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpec {
    pub pair: usize,
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub agent_rank: usize,
    pub command_queue: PathBuf,
    pub state: PathBuf,
    /// `"src"` or `"dst"`.
    pub side: String,
    pub rank: usize,
    pub pairs: Vec<PairSpec>,
    pub tensors: Vec<TensorSpec>,
    pub batch_id: String,
    pub bucket_size: Option<u64>,
    pub repeat: usize,
    pub timeout_s: f64,
    /// Fill and verify with the test pattern (else only touch the memory).
    #[serde(default = "yes")]
    pub check: bool,
    /// Where the shards live: `cpu` (shared memory), `cuda` (one `cuMemAlloc` allocation, shared
    /// by IPC handle) or `cuda-vmm` (virtual-memory pieces, shared by file descriptor).
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

/// The worker's shards: a shared-memory segment, or GPU memory with a host copy to fill and
/// check it through.
enum Shards {
    Shm(ShmSegment),
    #[cfg(feature = "cuda")]
    Gpu(tensorbus_transport::cuda::DeviceBuffer, Vec<u8>),
}

impl Shards {
    fn new(device: &str, name: &str, total: u64) -> Result<Self, String> {
        match device {
            "cpu" => ShmSegment::recreate(name, total.max(1) as usize).map(Shards::Shm).map_err(|e| e.to_string()),
            #[cfg(feature = "cuda")]
            "cuda" | "cuda-vmm" => {
                // Pieces of 2 MiB: a tensor can span several, as in PyTorch's expandable segments.
                let piece = (device == "cuda-vmm").then_some(2 << 20);
                let d = tensorbus_transport::cuda::DeviceBuffer::alloc(0, total, piece).map_err(|e| e.to_string())?;
                Ok(Shards::Gpu(d, vec![0u8; total as usize]))
            }
            #[cfg(not(feature = "cuda"))]
            "cuda" | "cuda-vmm" => Err("this build has no GPU support (the `cuda` feature)".into()),
            other => Err(format!("unknown device {other:?} (cpu, cuda, cuda-vmm)")),
        }
    }

    /// The host bytes to fill or check.
    ///
    /// # Safety
    /// No transfer may run meanwhile.
    unsafe fn bytes(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: upheld by the caller.
            Shards::Shm(seg) => unsafe { seg.as_mut_slice() },
            #[cfg(feature = "cuda")]
            Shards::Gpu(_, host) => host,
        }
    }

    /// Host bytes to the device (after filling).
    fn upload(&mut self) -> Result<(), String> {
        match self {
            Shards::Shm(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Shards::Gpu(d, host) => d.write(0, host).map_err(|e| e.to_string()),
        }
    }

    /// Device bytes to the host (before checking).
    fn download(&mut self) -> Result<(), String> {
        match self {
            Shards::Shm(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Shards::Gpu(d, host) => d.read(0, host).map_err(|e| e.to_string()),
        }
    }

    /// How an agent reaches `nbytes` at `offset`, and the descriptor's device string.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn memory(&self, name: &str, offset: u64, nbytes: u64) -> Result<(Memory, String), String> {
        match self {
            Shards::Shm(_) => Ok((Memory::Shm { name: name.to_string(), offset }, "cpu".into())),
            #[cfg(feature = "cuda")]
            Shards::Gpu(d, _) => {
                tensorbus_host::client::cuda_memory(d.ptr() + offset, nbytes).map_err(|e| e.to_string())
            }
        }
    }
}

fn yes() -> bool {
    true
}

/// What a worker reports, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub phase: String,
    #[serde(default)]
    pub rank: usize,
    #[serde(default)]
    pub side: String,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub seconds: Vec<f64>,
    #[serde(default)]
    pub verified: Option<bool>,
    #[serde(default)]
    pub mismatches: u64,
    #[serde(default)]
    pub message: String,
}

fn say(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(r).expect("encodes"));
    let _ = out.flush();
}

pub fn run(spec_json: &str) -> Result<(), String> {
    let spec: WorkerSpec = serde_json::from_str(spec_json).map_err(|e| format!("bad worker spec: {e}"))?;
    let base = Report {
        phase: String::new(),
        rank: spec.rank,
        side: spec.side.clone(),
        bytes: 0,
        seconds: vec![],
        verified: None,
        mismatches: 0,
        message: String::new(),
    };
    match work(&spec, &base) {
        Ok(()) => Ok(()),
        Err(e) => {
            say(&Report { phase: "error".into(), message: e.clone(), ..base });
            Err(e)
        }
    }
}

fn work(spec: &WorkerSpec, base: &Report) -> Result<(), String> {
    let timeout = Duration::from_secs_f64(spec.timeout_s);
    let is_src = spec.side == "src";
    let (local_name, remote_name) = if is_src { ("source", "destination") } else { ("destination", "source") };
    let client = TensorBusClient::new(spec.agent_rank, Some(&spec.command_queue), Some(&spec.state), timeout)
        .map_err(|e| e.to_string())?;
    let mut layouts = Vec::new();
    for p in &spec.pairs {
        let (src, dst) = p.layouts()?;
        let mine = if is_src { &src } else { &dst };
        let placements: Vec<Placement> = mine.placements().to_vec();
        client
            .init_pair(
                &p.name,
                local_name,
                remote_name,
                mine.world_size(),
                Some((mine.mesh().shape().to_vec(), spec.rank)),
                Some(&placements),
                true,
                timeout,
            )
            .map_err(|e| e.to_string())?;
        layouts.push((src, dst));
    }
    say(&Report { phase: "paired".into(), ..base.clone() });

    // One shared-memory segment holds every local shard, 64-byte aligned.
    let mut offsets = Vec::new();
    let mut total = 0u64;
    let mut locals = Vec::new();
    for t in &spec.tensors {
        let (src, dst) = &layouts[t.pair];
        let layout = if is_src { src } else { dst };
        let dtype: DType = t.dtype.parse().map_err(|e: tensorbus_planner::PlanError| e.to_string())?;
        let local = layout.local_shape(&t.shape, spec.rank);
        let nbytes = local.iter().product::<u64>() * dtype.size() as u64;
        offsets.push(total);
        total += nbytes.div_ceil(64) * 64;
        locals.push((local, nbytes, dtype));
    }
    let seg_name = format!("/tb-{}-{}-{}", std::process::id(), spec.side, spec.rank);
    let mut shards = Shards::new(&spec.device, &seg_name, total)?;
    // The agents map the segment by name; the name is removed when this worker exits.
    struct Unlink(String);
    impl Drop for Unlink {
        fn drop(&mut self) {
            ShmSegment::unlink(&self.0);
        }
    }
    let _unlink = Unlink(seg_name.clone());
    {
        // SAFETY: the shards are ours and no transfer runs yet.
        let all = unsafe { shards.bytes() };
        if !spec.check {
            // Touch every page so that transfers are not timed with page faults.
            all.fill(1);
        } else if is_src {
            for (i, t) in spec.tensors.iter().enumerate() {
                let (_, nbytes, dtype) = &locals[i];
                let buf = &mut all[offsets[i] as usize..(offsets[i] + nbytes) as usize];
                pattern::fill(&layouts[t.pair].0, &t.shape, *dtype, i as u64, spec.rank, buf);
            }
        }
    }
    shards.upload()?;
    let mut descs: Vec<(TensorDesc, &str)> = Vec::with_capacity(spec.tensors.len());
    for (i, t) in spec.tensors.iter().enumerate() {
        let (local, nbytes, dtype) = &locals[i];
        let (memory, device) = shards.memory(&seg_name, offsets[i], *nbytes)?;
        descs.push((
            TensorDesc {
                version: PAYLOAD_VERSION,
                name: Some(t.name.clone()),
                dtype: dtype.name().into(),
                shape: local.clone(),
                strides: tensorbus_planner::contiguous_strides(local),
                device,
                memory,
                nbytes: *nbytes,
                pid: None,
                session: None,
            },
            spec.pairs[t.pair].name.as_str(),
        ));
    }
    let batch =
        client.register_tensors(&spec.batch_id, &descs, spec.bucket_size, timeout).map_err(|e| e.to_string())?;
    let bytes: u64 = locals.iter().map(|l| l.1).sum();
    say(&Report { phase: "registered".into(), bytes, ..base.clone() });

    let dir = if is_src { TransferType::Send } else { TransferType::Recv };
    let mut seconds = Vec::new();
    for i in 0..spec.repeat {
        let t0 = Instant::now();
        let mut p = batch.transfer(dir, false, timeout).map_err(|e| e.to_string())?;
        p.wait(timeout).map_err(|e| e.to_string())?;
        seconds.push(t0.elapsed().as_secs_f64());
        say(&Report { phase: "transfer".into(), bytes, seconds: vec![seconds[i]], ..base.clone() });
    }
    if is_src && !batch.query_transfer_signal(timeout).map_err(|e| e.to_string())? {
        return Err("transfer signal not set after the last transfer".into());
    }
    let (mut verified, mut mismatches) = (None, 0);
    if !is_src && spec.check {
        shards.download()?;
        // SAFETY: the transfer is over; nobody writes the shards now.
        let all = unsafe { shards.bytes() };
        for (i, t) in spec.tensors.iter().enumerate() {
            let (_, nbytes, dtype) = &locals[i];
            let buf = &all[offsets[i] as usize..(offsets[i] + nbytes) as usize];
            let (src, dst) = &layouts[t.pair];
            mismatches += pattern::mismatches(src, dst, &t.shape, *dtype, i as u64, spec.rank, buf);
        }
        verified = Some(mismatches == 0);
    }
    batch.close(timeout).map_err(|e| e.to_string())?;
    say(&Report { phase: "done".into(), bytes, seconds, verified, mismatches, ..base.clone() });
    Ok(())
}
