//! Payload encodings carried inside host commands (version 1, msgpack): the mesh (shape and this
//! worker's rank in it), the placements, and tensor descriptors.

use serde::{Deserialize, Serialize};
use tensorbus_planner::{parse_placements, DType, DeviceMesh, Layout, Placement};

use crate::ProtocolError;

pub const PAYLOAD_VERSION: u32 = 1;

fn check_version(what: &str, v: u32) -> Result<(), ProtocolError> {
    if v != PAYLOAD_VERSION {
        return Err(ProtocolError::BadPayload(format!(
            "{what} payload version {v}; this agent speaks {PAYLOAD_VERSION}"
        )));
    }
    Ok(())
}

/// `mesh_shape_payload`: the mesh shape and the worker's row-major rank in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPayload {
    pub version: u32,
    pub shape: Vec<usize>,
    pub rank: usize,
}

impl MeshPayload {
    pub fn new(shape: Vec<usize>, rank: usize) -> Self {
        MeshPayload { version: PAYLOAD_VERSION, shape, rank }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("encodes")
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let p: Self = rmp_serde::from_slice(b).map_err(|e| ProtocolError::BadPayload(format!("mesh payload: {e}")))?;
        check_version("mesh", p.version)?;
        Ok(p)
    }
}

/// `placements_payload`: one placement string per mesh dim (`S(d)`, `R`, `P(op)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementsPayload {
    pub version: u32,
    pub placements: Vec<String>,
}

impl PlacementsPayload {
    pub fn new(placements: &[Placement]) -> Self {
        PlacementsPayload { version: PAYLOAD_VERSION, placements: placements.iter().map(|p| p.to_string()).collect() }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("encodes")
    }

    pub fn decode(b: &[u8]) -> Result<Vec<Placement>, ProtocolError> {
        let p: Self =
            rmp_serde::from_slice(b).map_err(|e| ProtocolError::BadPayload(format!("placements payload: {e}")))?;
        check_version("placements", p.version)?;
        parse_placements(&p.placements.join(",")).map_err(ProtocolError::Plan)
    }
}

/// A layout and this rank's place in it, as exchanged between agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSide {
    pub local_name: String,
    pub remote_name: String,
    pub world_size: usize,
    pub rank: usize,
    pub mesh: Vec<usize>,
    pub placements: Vec<String>,
}

impl PairSide {
    pub fn layout(&self) -> Result<Layout, ProtocolError> {
        let mesh = DeviceMesh::new(self.mesh.clone()).map_err(ProtocolError::Plan)?;
        let pl = parse_placements(&self.placements.join(",")).map_err(ProtocolError::Plan)?;
        Layout::new(mesh, pl).map_err(ProtocolError::Plan)
    }
}

/// Where a tensor's bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Memory {
    /// A POSIX shared-memory object (`shm_open` name) at `offset`.
    Shm { name: String, offset: u64 },
    /// The worker's own address space: read or written with cross-memory attach.
    Cma { pid: u32, addr: u64 },
    /// Shared memory the worker holds open as descriptor `fd` (e.g. a torch storage after
    /// `share_memory_()`): agents take it with `pidfd_getfd` from process `pid`, map its `size`
    /// bytes and copy once, memory to memory. The tensor starts `offset` bytes in.
    Fd { pid: u32, fd: i32, size: u64, offset: u64 },
    /// CUDA memory from `cuMemAlloc` (PyTorch's default allocator): the 64-byte legacy IPC handle
    /// of the allocation (`cuIpcGetMemHandle` of its base), `alloc_size` bytes long, the tensor
    /// `offset` bytes into it. Agents open each handle once and keep it open.
    CudaIpc {
        device: u32,
        #[serde(with = "serde_bytes")]
        handle: Vec<u8>,
        alloc_size: u64,
        offset: u64,
    },
    /// CUDA memory from the virtual-memory API (`cuMemCreate`: PyTorch's expandable segments):
    /// the physical allocations under the tensor, in address order, each exported as a POSIX file
    /// descriptor (`fd` in process `pid`, which the agent takes with `pidfd_getfd`) of `size`
    /// bytes; mapped back to back, the tensor starts `offset` bytes into the first.
    CudaFd { device: u32, pid: u32, pieces: Vec<CudaPiece>, offset: u64 },
}

/// One physical allocation of a [`Memory::CudaFd`] tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaPiece {
    pub fd: i32,
    pub size: u64,
}

impl Memory {
    /// The `kind` tag of the payload.
    pub fn kind(&self) -> &'static str {
        match self {
            Memory::Shm { .. } => "shm",
            Memory::Cma { .. } => "cma",
            Memory::Fd { .. } => "fd",
            Memory::CudaIpc { .. } => "cudaipc",
            Memory::CudaFd { .. } => "cudafd",
        }
    }

    /// The CUDA device the memory is on, if it is device memory.
    pub fn cuda_device(&self) -> Option<u32> {
        match self {
            Memory::CudaIpc { device, .. } | Memory::CudaFd { device, .. } => Some(*device),
            Memory::Shm { .. } | Memory::Cma { .. } | Memory::Fd { .. } => None,
        }
    }
}

/// `tensor_payload`: a worker's local shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    pub version: u32,
    /// A name for messages (optional in the payload; defaults to the position in the batch).
    #[serde(default)]
    pub name: Option<String>,
    /// torch dtype name.
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Strides in elements; must be contiguous row-major.
    pub strides: Vec<u64>,
    pub device: String,
    pub memory: Memory,
    pub nbytes: u64,
    /// The worker process that owns the memory: the agent watches it, and releases the batch
    /// and fails its transfers (naming the worker) when it exits.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The session token the agent issued this worker over its session socket (see
    /// docs/protocol.md, "Sessions"): proves which process registers the memory.
    #[serde(default)]
    pub session: Option<String>,
}

impl TensorDesc {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("encodes")
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let d: Self =
            rmp_serde::from_slice(b).map_err(|e| ProtocolError::BadPayload(format!("tensor payload: {e}")))?;
        check_version("tensor", d.version)?;
        Ok(d)
    }

    pub fn dtype(&self) -> Result<DType, ProtocolError> {
        self.dtype.parse().map_err(ProtocolError::Plan)
    }

    /// Checks internal consistency with checked arithmetic only: the shape's element count and
    /// byte size fit in `u64` and equal `nbytes`, the strides are contiguous (torch's rule), and
    /// the memory's own numbers (`offset`, `addr`, piece sizes) do not wrap. Every error names the
    /// field.
    pub fn validate(&self) -> Result<DType, ProtocolError> {
        let dtype = self.dtype()?;
        let field = |field: &str, why: String| ProtocolError::BadField { field: field.into(), why };
        let numel = self
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| field("shape", format!("{:?} has more than 2^64 elements", self.shape)))?;
        let expected = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| field("shape", format!("{:?} of {dtype} is more than 2^64 bytes", self.shape)))?;
        if self.nbytes != expected {
            return Err(field(
                "nbytes",
                format!("{} does not match shape {:?} of {dtype} ({expected} bytes)", self.nbytes, self.shape),
            ));
        }
        if isize::try_from(self.nbytes).is_err() {
            return Err(field("nbytes", format!("{} is larger than an address space", self.nbytes)));
        }
        if self.strides.len() != self.shape.len() {
            return Err(field(
                "strides",
                format!("{} strides for {} dimensions", self.strides.len(), self.shape.len()),
            ));
        }
        if !tensorbus_planner::is_contiguous(&self.shape, &self.strides) {
            return Err(field(
                "strides",
                format!(
                    "tensor is not contiguous (shape {:?}, strides {:?}); register a contiguous tensor",
                    self.shape, self.strides
                ),
            ));
        }
        match &self.memory {
            Memory::Shm { offset, .. } => {
                offset
                    .checked_add(self.nbytes)
                    .ok_or_else(|| field("memory.offset", format!("{offset} + {} bytes wraps around", self.nbytes)))?;
            }
            Memory::Fd { size, offset, .. } => {
                let end = offset
                    .checked_add(self.nbytes)
                    .ok_or_else(|| field("memory.offset", format!("{offset} + {} bytes wraps around", self.nbytes)))?;
                if end > *size {
                    return Err(field(
                        "memory.offset",
                        format!("bytes [{offset}, {end}) lie outside the {size} bytes of the shared memory"),
                    ));
                }
            }
            Memory::Cma { addr, .. } => {
                addr.checked_add(self.nbytes)
                    .ok_or_else(|| field("memory.addr", format!("{addr:#x} + {} bytes wraps around", self.nbytes)))?;
            }
            Memory::CudaIpc { alloc_size, offset, .. } => {
                let end = offset
                    .checked_add(self.nbytes)
                    .ok_or_else(|| field("memory.offset", format!("{offset} + {} bytes wraps around", self.nbytes)))?;
                if end > *alloc_size {
                    return Err(field(
                        "memory.offset",
                        format!("bytes [{offset}, {end}) lie outside the allocation of {alloc_size} bytes"),
                    ));
                }
            }
            Memory::CudaFd { pieces, offset, .. } => {
                let total = pieces
                    .iter()
                    .try_fold(0u64, |n, p| n.checked_add(p.size))
                    .ok_or_else(|| field("memory.pieces", "piece sizes add up to more than 2^64".into()))?;
                let end = offset
                    .checked_add(self.nbytes)
                    .ok_or_else(|| field("memory.offset", format!("{offset} + {} bytes wraps around", self.nbytes)))?;
                if end > total {
                    return Err(field(
                        "memory.offset",
                        format!("bytes [{offset}, {end}) lie outside the {total} bytes of its pieces"),
                    ));
                }
            }
        }
        let cpu = matches!(self.memory, Memory::Shm { .. } | Memory::Cma { .. } | Memory::Fd { .. });
        if cpu != (self.device == "cpu") {
            return Err(field(
                "device",
                format!("{:?} does not fit memory of kind {}", self.device, self.memory.kind()),
            ));
        }
        Ok(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(memory: Memory) -> TensorDesc {
        TensorDesc {
            version: PAYLOAD_VERSION,
            name: Some("w".into()),
            dtype: "bfloat16".into(),
            shape: vec![4, 8],
            strides: vec![8, 1],
            device: "cuda:0".into(),
            memory,
            nbytes: 64,
            pid: Some(7),
            session: None,
        }
    }

    #[test]
    fn gpu_memory_descriptors_round_trip() {
        for m in [
            Memory::CudaIpc { device: 1, handle: (0..64).collect(), alloc_size: 2 << 20, offset: 512 },
            Memory::CudaFd {
                device: 0,
                pid: 42,
                pieces: vec![CudaPiece { fd: 9, size: 2 << 20 }, CudaPiece { fd: 10, size: 2 << 20 }],
                offset: 4096,
            },
        ] {
            let d = desc(m.clone());
            let back = TensorDesc::decode(&d.encode()).expect("decodes");
            assert_eq!(back, d);
            assert!(back.memory.cuda_device().is_some());
        }
        assert_eq!(Memory::Shm { name: "/s".into(), offset: 0 }.cuda_device(), None);
    }

    #[test]
    fn the_ipc_handle_travels_as_msgpack_bytes() {
        let d = desc(Memory::CudaIpc { device: 0, handle: vec![0xab; 64], alloc_size: 64, offset: 0 });
        let b = d.encode();
        // bin 8 with 64 bytes (not an array of 64 integers).
        assert!(b.windows(3).any(|w| w == [0xc4, 64, 0xab]), "{b:x?}");
    }
}
