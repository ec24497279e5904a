//! CUDA device memory (cargo feature `cuda`): the driver (`libcuda.so`) is loaded at run time, so
//! a build with the feature runs on machines without CUDA and says so when asked for a GPU.
//!
//! What this module owns:
//! - the worker side of the handoff: [`share`] describes a device pointer as what an agent can
//!   open — the legacy IPC handle of its `cuMemAlloc` allocation, or, for virtual-memory
//!   allocations (`cuMemCreate`, PyTorch's expandable segments), POSIX file descriptors of the
//!   physical allocations under it, which the agent takes from the worker with `pidfd_getfd`;
//! - the agent side: [`Gpu`] opens those once per agent lifetime and caches them by allocation
//!   (a thousand tensors in a few allocations are a few opens, counted by [`Gpu::opens`]), and
//!   runs copies on several streams per device ([`crate::exec::DeviceEngine`]).
//!
//! Every driver call goes through [`check`], which turns a `CUresult` into a
//! [`TransportError::Cuda`] naming the call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;

use crate::exec::{DeviceEngine, Staging};
use crate::TransportError;

/// A driver call's result as an error naming the call.
fn check(what: &str, r: sys::CUresult) -> Result<(), TransportError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver is loaded (every caller went through `driver()`); s is an out-pointer.
    let name = if unsafe { sys::cuGetErrorString(r, &mut s) } == sys::CUresult::CUDA_SUCCESS && !s.is_null() {
        // SAFETY: the driver returns a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy().into_owned()
    } else {
        format!("{r:?}")
    };
    Err(TransportError::Cuda(format!("{what}: {name}")))
}

/// Loads and initializes the driver once per process.
fn driver() -> Result<(), TransportError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: only probes for the library; cudarc panics on a missing library otherwise.
        if !unsafe { sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda.so) on this machine".into());
        }
        // SAFETY: cuInit has no preconditions.
        check("cuInit", unsafe { sys::cuInit(0) }).map_err(|e| e.to_string())?;
        let mut n = 0;
        // SAFETY: n is an out-pointer.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) }).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the CUDA driver sees no device".into());
        }
        Ok(())
    })
    .clone()
    .map_err(TransportError::Cuda)
}

/// True when a CUDA driver and at least one device are present.
pub fn available() -> bool {
    driver().is_ok()
}

/// Makes device `ordinal`'s primary context current on this thread; returns it.
fn bind(ordinal: u32) -> Result<sys::CUcontext, TransportError> {
    driver()?;
    let mut dev = 0;
    // SAFETY: out-pointers; the driver is initialized.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal as i32) })?;
    let mut ctx = std::ptr::null_mut();
    // SAFETY: as above. The primary context is shared with every other user in the process
    // (PyTorch uses it too) and retained for the process's lifetime.
    check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
    // SAFETY: ctx was just retained.
    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
    Ok(ctx)
}

/// The device that owns address `ptr` (an error for host memory).
fn device_ordinal(ptr: u64) -> Result<u32, TransportError> {
    let mut ordinal: i32 = -1;
    // SAFETY: out-pointer sized for the attribute (an int).
    check("cuPointerGetAttribute(DEVICE_ORDINAL)", unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    })?;
    u32::try_from(ordinal).map_err(|_| TransportError::Cuda(format!("0x{ptr:x} is on no device")))
}

/// How a worker's device memory reaches an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    /// Legacy IPC: the allocation's handle, its size, and the tensor's offset in it.
    Ipc { device: u32, handle: [u8; 64], alloc_size: u64, offset: u64 },
    /// Virtual-memory allocations: exported file descriptors (in this process) with their
    /// sizes, in address order; the tensor starts `offset` bytes into the first.
    Fds { device: u32, pieces: Vec<(i32, u64)>, offset: u64 },
}

/// File descriptors exported for virtual-memory allocations, by allocation (see [`identity`]): one
/// export per allocation for the worker's lifetime, so registering many tensors does not leak
/// descriptors.
fn exported() -> &'static Mutex<HashMap<AllocId, (i32, u64)>> {
    static M: OnceLock<Mutex<HashMap<AllocId, (i32, u64)>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// An allocation's base address and the driver's unique buffer id for it.
type AllocId = (u64, u64);

/// An allocation's identity: its base address and the driver's process-wide unique buffer id.
/// The address alone is not enough — allocators free and map new memory at the same addresses
/// (PyTorch's expandable segments do so all the time) — and a stale handle would send bytes to
/// memory the tensor no longer lives in. `None` where the driver has no id: then nothing is cached.
fn identity(base: u64) -> Option<AllocId> {
    let mut id: u64 = 0;
    // SAFETY: out-pointer sized for the attribute (an unsigned long long).
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut id as *mut u64).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_BUFFER_ID,
            base,
        )
    };
    (r == sys::CUresult::CUDA_SUCCESS && id != 0).then_some((base, id))
}

/// Worker side: describes `len` bytes of device memory at `ptr` for an agent.
pub fn share(ptr: u64, len: u64) -> Result<Shared, TransportError> {
    driver()?;
    let device = device_ordinal(ptr).map_err(|e| TransportError::Cuda(format!("{e} (is 0x{ptr:x} device memory?)")))?;
    bind(device)?;
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: out-pointers.
    check("cuMemGetAddressRange", unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) })?;
    // One handle per allocation, so that every tensor in it names the allocation with the same
    // bytes (agents open each handle once; a second open of one allocation would fail).
    static HANDLES: OnceLock<Mutex<HashMap<AllocId, [u8; 64]>>> = OnceLock::new();
    let handles = HANDLES.get_or_init(Default::default);
    let id = identity(base);
    if let Some(handle) = id.and_then(|id| handles.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied()) {
        return Ok(Shared::Ipc { device, handle, alloc_size: size as u64, offset: ptr - base });
    }
    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
    // SAFETY: out-pointer; base is an allocation's start.
    let r = unsafe { sys::cuIpcGetMemHandle(&mut h, base) };
    if r == sys::CUresult::CUDA_SUCCESS {
        let handle: [u8; 64] = h.reserved.map(|c| c as u8);
        if let Some(id) = id {
            handles.lock().unwrap_or_else(|p| p.into_inner()).insert(id, handle);
        }
        return Ok(Shared::Ipc { device, handle, alloc_size: size as u64, offset: ptr - base });
    }
    // Not a cuMemAlloc allocation: walk the physical allocations under [ptr, ptr + len).
    let mut pieces = Vec::new();
    let mut at = ptr;
    let mut offset = 0;
    let end = ptr + len.max(1);
    while at < end {
        let (mut b, mut s) = (0u64, 0usize);
        // SAFETY: out-pointers.
        check("cuMemGetAddressRange", unsafe { sys::cuMemGetAddressRange_v2(&mut b, &mut s, at) })?;
        if pieces.is_empty() {
            offset = at - b;
        }
        let key = identity(b);
        let mut cache = exported().lock().unwrap_or_else(|p| p.into_inner());
        let piece = match key.and_then(|k| cache.get(&k)) {
            Some(p) => *p,
            None => {
                let mut handle: sys::CUmemGenericAllocationHandle = 0;
                // SAFETY: out-pointer; `at` is mapped device memory.
                check("cuMemRetainAllocationHandle", unsafe {
                    sys::cuMemRetainAllocationHandle(&mut handle, at as *mut std::ffi::c_void)
                })?;
                let mut fd: i32 = -1;
                // SAFETY: out-pointer of the size POSIX_FILE_DESCRIPTOR export writes (an int).
                let r = unsafe {
                    sys::cuMemExportToShareableHandle(
                        (&mut fd as *mut i32).cast(),
                        handle,
                        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                        0,
                    )
                };
                // SAFETY: the retained handle is released whatever the export did.
                unsafe { sys::cuMemRelease(handle) };
                check("cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR)", r).map_err(|e| {
                    TransportError::Cuda(format!(
                        "{e}: this allocation can be shared neither by IPC handle nor by file descriptor \
                         (allocate it with cudaMalloc, or cuMemCreate with POSIX_FILE_DESCRIPTOR handles)"
                    ))
                })?;
                if let Some(k) = key {
                    cache.insert(k, (fd, s as u64));
                }
                (fd, s as u64)
            }
        };
        pieces.push(piece);
        at = b + s as u64;
    }
    Ok(Shared::Fds { device, pieces, offset })
}

/// One device's context and streams in an agent.
struct Device {
    ctx: sys::CUcontext,
    streams: Vec<sys::CUstream>,
}

/// What an agent imported: IPC handles opened, virtual-memory pieces mapped.
enum Import {
    Ipc { ptr: u64 },
    Vmm { ptr: u64, size: u64, handles: Vec<sys::CUmemGenericAllocationHandle> },
}

/// An agent's GPUs: contexts, streams and the cache of imported allocations.
pub struct Gpu {
    devices: Mutex<HashMap<u32, Device>>,
    streams_per_device: usize,
    /// Imports by key (IPC handle bytes, or pid + descriptors), opened once.
    imports: Mutex<HashMap<Vec<u8>, Import>>,
    opens: AtomicU64,
    next_stream: AtomicUsize,
    /// Idle page-locked staging buffers (TCP path).
    staging: Mutex<Vec<Staging>>,
}

// SAFETY: CUDA contexts and streams may be used from any thread once made current there; the
// maps are behind mutexes.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Loads the driver; fails with a clear error where there is none.
    pub fn new(streams_per_device: usize) -> Result<Self, TransportError> {
        driver()?;
        Ok(Gpu {
            devices: Mutex::default(),
            streams_per_device: streams_per_device.max(1),
            imports: Mutex::default(),
            opens: AtomicU64::new(0),
            next_stream: AtomicUsize::new(0),
            staging: Mutex::default(),
        })
    }

    /// Handles and descriptors opened so far (cache misses).
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    fn with_device<T>(&self, ordinal: u32, f: impl FnOnce(&Device) -> T) -> Result<T, TransportError> {
        let mut devs = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = devs.get(&ordinal) {
            // SAFETY: a retained primary context.
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(d.ctx) })?;
            return Ok(f(d));
        }
        let ctx = bind(ordinal)?;
        let mut streams = Vec::with_capacity(self.streams_per_device);
        for _ in 0..self.streams_per_device {
            let mut s = std::ptr::null_mut();
            // SAFETY: out-pointer; the context is current. Non-blocking: no implicit
            // synchronization with PyTorch's legacy default stream in this process.
            check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, 1) })?;
            streams.push(s);
        }
        let d = devs.entry(ordinal).or_insert(Device { ctx, streams });
        Ok(f(d))
    }

    /// Agent side: the device address of a tensor shared with legacy IPC.
    pub fn open_ipc(
        &self,
        device: u32,
        handle: &[u8],
        offset: u64,
        len: u64,
        alloc_size: u64,
    ) -> Result<u64, TransportError> {
        if handle.len() != 64 {
            return Err(TransportError::Cuda(format!("a CUDA IPC handle has 64 bytes, not {}", handle.len())));
        }
        if offset + len > alloc_size {
            return Err(TransportError::Cuda(format!(
                "bytes [{offset}, {}) lie outside the shared allocation of {alloc_size} bytes",
                offset + len
            )));
        }
        self.with_device(device, |_| ())?;
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Import::Ipc { ptr }) = imports.get(handle) {
            return Ok(ptr + offset);
        }
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        for (d, s) in h.reserved.iter_mut().zip(handle) {
            *d = *s as std::ffi::c_char;
        }
        let mut ptr = 0u64;
        // SAFETY: out-pointer; the device's context is current.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(&mut ptr, h, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32)
        })?;
        self.opens.fetch_add(1, Ordering::Relaxed);
        imports.insert(handle.to_vec(), Import::Ipc { ptr });
        Ok(ptr + offset)
    }

    /// Agent side: maps the virtual-memory pieces of worker `pid` back to back and returns the
    /// tensor's device address. Needs ptrace rights over the worker (`setup_ptrace`).
    pub fn open_fds(
        &self,
        device: u32,
        pid: u32,
        pieces: &[(i32, u64)],
        offset: u64,
        len: u64,
    ) -> Result<u64, TransportError> {
        let total: u64 = pieces.iter().map(|p| p.1).sum();
        if pieces.is_empty() || offset + len > total {
            return Err(TransportError::Cuda(format!(
                "bytes [{offset}, {}) lie outside the {} shared pieces ({total} bytes)",
                offset + len,
                pieces.len()
            )));
        }
        self.with_device(device, |_| ())?;
        let mut key = format!("fd:{pid}").into_bytes();
        for (fd, size) in pieces {
            key.extend_from_slice(format!(":{fd}/{size}").as_bytes());
        }
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Import::Vmm { ptr, .. }) = imports.get(&key) {
            return Ok(ptr + offset);
        }
        let mut ptr = 0u64;
        // SAFETY: out-pointer; the context is current.
        check("cuMemAddressReserve", unsafe { sys::cuMemAddressReserve(&mut ptr, total as usize, 0, 0, 0) })?;
        let mut handles = Vec::with_capacity(pieces.len());
        let mapped = (|| {
            let mut at = ptr;
            for (fd, size) in pieces {
                use std::os::fd::AsRawFd;
                let local = crate::cma::take_fd(pid, *fd)
                    .map_err(|e| TransportError::Cuda(format!("{e} (did the worker call setup_ptrace()?)")))?;
                let mut h: sys::CUmemGenericAllocationHandle = 0;
                // SAFETY: the descriptor is passed by value as the OS handle, per the driver API.
                let r = unsafe {
                    sys::cuMemImportFromShareableHandle(
                        &mut h,
                        local.as_raw_fd() as isize as *mut std::ffi::c_void,
                        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    )
                };
                // Our duplicate closes here; the driver holds its own reference once imported.
                drop(local);
                check("cuMemImportFromShareableHandle", r)?;
                handles.push(h);
                // SAFETY: [at, at + size) lies in our reservation.
                check("cuMemMap", unsafe { sys::cuMemMap(at, *size as usize, 0, h, 0) })?;
                at += size;
            }
            let access = sys::CUmemAccessDesc {
                location: sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: device as i32,
                },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            // SAFETY: the whole range is mapped.
            check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(ptr, total as usize, &access, 1) })
        })();
        if let Err(e) = mapped {
            release_vmm(ptr, total, &handles);
            return Err(e);
        }
        self.opens.fetch_add(pieces.len() as u64, Ordering::Relaxed);
        imports.insert(key, Import::Vmm { ptr, size: total, handles });
        Ok(ptr + offset)
    }

    /// The next stream of `device`, round robin.
    fn stream(&self, device: u32) -> Result<sys::CUstream, TransportError> {
        let i = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.with_device(device, |d| d.streams[i % d.streams.len()])
    }

    /// The device an address belongs to (host memory: none).
    fn device_of(ptr: u64) -> Option<u32> {
        device_ordinal(ptr).ok()
    }
}

fn release_vmm(ptr: u64, size: u64, handles: &[sys::CUmemGenericAllocationHandle]) {
    // SAFETY: unmapping our own reservation (a no-op where nothing is mapped) and releasing our
    // imported handles; errors leave nothing to do.
    unsafe {
        sys::cuMemUnmap(ptr, size as usize);
        for h in handles {
            sys::cuMemRelease(*h);
        }
        sys::cuMemAddressFree(ptr, size as usize);
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        for b in self.staging.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            // SAFETY: allocated by cuMemHostAlloc in take_staging, idle.
            unsafe { sys::cuMemFreeHost(b.ptr.cast()) };
        }
        for (_, imp) in self.imports.get_mut().unwrap_or_else(|p| p.into_inner()).drain() {
            match imp {
                // SAFETY: opened by us, no copy in flight (copies are synchronized per epoch).
                Import::Ipc { ptr } => unsafe {
                    sys::cuIpcCloseMemHandle(ptr);
                },
                Import::Vmm { ptr, size, handles } => release_vmm(ptr, size, &handles),
            }
        }
        for (_, d) in self.devices.get_mut().unwrap_or_else(|p| p.into_inner()).drain() {
            for s in d.streams {
                // SAFETY: our streams, idle.
                unsafe { sys::cuStreamDestroy_v2(s) };
            }
        }
    }
}

impl DeviceEngine for Gpu {
    fn copy_async(&self, dst: u64, src: u64, len: u64) -> Result<(), TransportError> {
        // Run on the stream of the device that owns the destination (or else the source).
        let dev = Gpu::device_of(dst).or_else(|| Gpu::device_of(src)).unwrap_or(0);
        let s = self.stream(dev)?;
        // SAFETY: both ranges were bounds-checked at registration; unified addressing lets the
        // driver pick the direction.
        check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(dst, src, len as usize, s) })
    }

    fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), TransportError> {
        let dev = Gpu::device_of(dst).or_else(|| Gpu::device_of(src)).unwrap_or(0);
        self.with_device(dev, |_| ())?;
        // SAFETY: as for copy_async; cuMemcpy is synchronous.
        check("cuMemcpy", unsafe { sys::cuMemcpy(dst, src, len as usize) })
    }

    fn take_staging(&self, len: usize) -> Result<Staging, TransportError> {
        let mut pool = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|b| b.cap >= len) {
            return Ok(pool.swap_remove(i));
        }
        // Too small ones are replaced, so the pool stays at most one buffer per thread.
        for b in pool.drain(..) {
            // SAFETY: idle buffers of ours.
            unsafe { sys::cuMemFreeHost(b.ptr.cast()) };
        }
        drop(pool);
        let dev = self.devices.lock().unwrap_or_else(|p| p.into_inner()).keys().next().copied().unwrap_or(0);
        self.with_device(dev, |_| ())?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: out-pointer; portable so any device's context can use it.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut p, len.max(1), 1) })?;
        Ok(Staging { ptr: p.cast(), cap: len.max(1) })
    }

    fn give_staging(&self, buf: Staging) {
        self.staging.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }

    fn sync(&self) -> Result<(), TransportError> {
        let devs = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for d in devs.values() {
            // SAFETY: a retained context and its streams.
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(d.ctx) })?;
            for s in &d.streams {
                // SAFETY: as above.
                check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(*s) })?;
            }
        }
        Ok(())
    }
}

/// Device memory a worker allocates itself (the demo and the GPU tests; PyTorch workers bring
/// their own): one `cuMemAlloc` allocation, or virtual-memory pieces mapped back to back the way
/// PyTorch's expandable segments are.
pub struct DeviceBuffer {
    ptr: u64,
    len: u64,
    device: u32,
    /// Virtual-memory allocations: the reserved size and the physical pieces.
    vmm: Option<(u64, Vec<sys::CUmemGenericAllocationHandle>)>,
}

impl DeviceBuffer {
    /// `len` bytes on `device`; `piece`: build it from virtual-memory pieces of about that size
    /// (exportable as file descriptors) instead of one `cuMemAlloc`.
    pub fn alloc(device: u32, len: u64, piece: Option<u64>) -> Result<Self, TransportError> {
        bind(device)?;
        let len = len.max(1);
        let Some(piece) = piece else {
            let mut ptr = 0u64;
            // SAFETY: out-pointer; the device's context is current.
            check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) })?;
            return Ok(DeviceBuffer { ptr, len, device, vmm: None });
        };
        // SAFETY: an all-zero CUmemAllocationProp is a valid starting value (plain C struct).
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop.location =
            sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device as i32 };
        let mut gran = 0usize;
        // SAFETY: out-pointer and a valid prop.
        check("cuMemGetAllocationGranularity", unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        })?;
        let gran = gran.max(1) as u64;
        let piece = piece.div_ceil(gran).max(1) * gran;
        let total = len.div_ceil(piece) * piece;
        let mut ptr = 0u64;
        // SAFETY: out-pointer.
        check("cuMemAddressReserve", unsafe { sys::cuMemAddressReserve(&mut ptr, total as usize, 0, 0, 0) })?;
        let mut handles = Vec::new();
        let made = (|| {
            let mut at = ptr;
            while at < ptr + total {
                let mut h: sys::CUmemGenericAllocationHandle = 0;
                // SAFETY: out-pointer and a valid prop.
                check("cuMemCreate", unsafe { sys::cuMemCreate(&mut h, piece as usize, &prop, 0) })?;
                handles.push(h);
                // SAFETY: [at, at + piece) lies in the reservation.
                check("cuMemMap", unsafe { sys::cuMemMap(at, piece as usize, 0, h, 0) })?;
                at += piece;
            }
            let access = sys::CUmemAccessDesc {
                location: prop.location,
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            // SAFETY: the whole range is mapped.
            check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(ptr, total as usize, &access, 1) })
        })();
        if let Err(e) = made {
            release_vmm(ptr, total, &handles);
            return Err(e);
        }
        Ok(DeviceBuffer { ptr, len, device, vmm: Some((total, handles)) })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range(&self, offset: u64, n: usize) -> Result<(), TransportError> {
        if offset + n as u64 > self.len {
            return Err(TransportError::Cuda(format!("bytes [{offset}, +{n}) outside a buffer of {}", self.len)));
        }
        bind(self.device).map(|_| ())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        self.range(offset, data.len())?;
        // SAFETY: range checked; synchronous copy from a live host slice.
        check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(self.ptr + offset, data.as_ptr().cast(), data.len()) })
    }

    /// Copies bytes at `offset` into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TransportError> {
        self.range(offset, out.len())?;
        // SAFETY: range checked; synchronous copy into a live host slice.
        check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr + offset, out.len()) })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = bind(self.device);
        match self.vmm.take() {
            Some((total, handles)) => release_vmm(self.ptr, total, &handles),
            // SAFETY: our allocation.
            None => unsafe {
                sys::cuMemFree_v2(self.ptr);
            },
        }
    }
}

/// Device-to-device copy bandwidth (GB/s) over `bytes` on `device`: the limit GPU transfers are
/// compared with. Best of `reps`.
pub fn d2d_gbps(device: u32, bytes: u64, reps: usize) -> Result<f64, TransportError> {
    let a = DeviceBuffer::alloc(device, bytes, None)?;
    let b = DeviceBuffer::alloc(device, bytes, None)?;
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        // SAFETY: two live allocations of `bytes`; synchronous.
        check("cuMemcpyDtoD", unsafe { sys::cuMemcpyDtoD_v2(b.ptr, a.ptr, bytes as usize) })?;
        // SAFETY: plain synchronization of the current context.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(bytes as f64 / best / 1e9)
}

/// Pinned host ↔ device copy bandwidth (GB/s, host to device then device to host) over `bytes`.
pub fn pinned_gbps(device: u32, bytes: u64, reps: usize) -> Result<(f64, f64), TransportError> {
    let d = DeviceBuffer::alloc(device, bytes, None)?;
    let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: out-pointer; freed below.
    check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut host, bytes as usize, 0) })?;
    let (mut up, mut down) = (f64::MAX, f64::MAX);
    let r = (|| {
        for _ in 0..reps.max(1) {
            let t0 = std::time::Instant::now();
            // SAFETY: both buffers hold `bytes`.
            check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(d.ptr, host, bytes as usize) })?;
            up = up.min(t0.elapsed().as_secs_f64());
            let t0 = std::time::Instant::now();
            // SAFETY: as above.
            check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(host, d.ptr, bytes as usize) })?;
            down = down.min(t0.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    // SAFETY: allocated above.
    unsafe { sys::cuMemFreeHost(host) };
    r.map(|_| (bytes as f64 / up / 1e9, bytes as f64 / down / 1e9))
}

/// The driver's version and the devices it sees, for diagnostics.
pub fn describe_devices() -> Result<String, TransportError> {
    driver()?;
    let (mut version, mut n) = (0, 0);
    // SAFETY: out-pointers.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
    // SAFETY: out-pointer.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    let mut names = Vec::new();
    for i in 0..n {
        let mut dev = 0;
        // SAFETY: out-pointer; i < n.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, i) })?;
        let mut name = [0 as std::ffi::c_char; 128];
        // SAFETY: the buffer holds 128 bytes, as passed.
        check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 128, dev) })?;
        let mut bytes = 0usize;
        // SAFETY: out-pointer.
        check("cuDeviceTotalMem", unsafe { sys::cuDeviceTotalMem_v2(&mut bytes, dev) })?;
        // SAFETY: the driver NUL-terminates the name within the buffer.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        names.push(format!("{i}: {name} ({:.0} GiB)", bytes as f64 / (1u64 << 30) as f64));
    }
    Ok(format!("CUDA driver API {}.{}, {}", version / 1000, (version % 1000) / 10, names.join("; ")))
}
