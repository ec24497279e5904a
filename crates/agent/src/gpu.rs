//! Workers' GPU memory in the agent: opened on first use (feature `cuda`), once per allocation
//! for the agent's lifetime; a build without the feature, or a machine without CUDA, refuses
//! device tensors with an error that says so.

use std::sync::Arc;

use tensorbus_protocol::payload::Memory;
use tensorbus_transport::exec::{DeviceEngine, Loc};

/// The agent's GPUs (none opened until a worker registers device memory).
pub(crate) struct Gpus {
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<tensorbus_transport::cuda::Gpu>>,
    /// Copy streams per device.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    streams: usize,
}

impl Gpus {
    pub fn new(streams: usize) -> Self {
        Gpus {
            #[cfg(feature = "cuda")]
            gpu: None,
            streams,
        }
    }

    /// The location of `nbytes` of the device memory `mem` describes; `Ok(None)` for host memory.
    pub fn locate(&mut self, mem: &Memory, nbytes: u64) -> Result<Option<Loc>, String> {
        if mem.cuda_device().is_none() {
            return Ok(None);
        }
        self.open(mem, nbytes).map(|p| Some(Loc::Device(p)))
    }

    #[cfg(feature = "cuda")]
    fn open(&mut self, mem: &Memory, nbytes: u64) -> Result<u64, String> {
        let gpu = match &self.gpu {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(
                    tensorbus_transport::cuda::Gpu::new(self.streams)
                        .map_err(|e| format!("a worker registered GPU memory, but {e}"))?,
                );
                self.gpu = Some(g.clone());
                g
            }
        };
        let before = gpu.opens();
        let r = match mem {
            Memory::CudaIpc { device, handle, alloc_size, offset } => {
                gpu.open_ipc(*device, handle, *offset, nbytes, *alloc_size)
            }
            Memory::CudaFd { device, pid, pieces, offset } => {
                let pieces: Vec<(i32, u64)> = pieces.iter().map(|p| (p.fd, p.size)).collect();
                gpu.open_fds(*device, *pid, &pieces, *offset, nbytes)
            }
            Memory::Shm { .. } | Memory::Cma { .. } | Memory::Fd { .. } => {
                unreachable!("host memory is not opened here")
            }
        };
        if gpu.opens() > before {
            tracing::info!(opens = gpu.opens(), "CUDA: opened a worker allocation ({} so far)", gpu.opens());
        }
        r.map_err(|e| e.to_string())
    }

    #[cfg(not(feature = "cuda"))]
    fn open(&mut self, _mem: &Memory, _nbytes: u64) -> Result<u64, String> {
        Err("a worker registered GPU memory, but this agent was built without the `cuda` feature".into())
    }

    /// The engine for plans with device locations (none until a device is opened).
    pub fn engine(&self) -> Option<Arc<dyn DeviceEngine>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.clone() as Arc<dyn DeviceEngine>);
        }
        None
    }
}
