//! Executing a rank's share of a batch plan: buckets of copy and reduce operations between
//! resolved memory locations, run in parallel on a few threads.
//!
//! Single copy wherever one end is mapped here: mapped→mapped is a `memcpy`, remote→mapped a
//! `process_vm_readv`, mapped→remote a `process_vm_writev`. Only remote→remote copies and
//! reductions over remote inputs stage through a buffer, of at most one bucket per thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use tensorbus_planner::{DType, ReduceOp};

use crate::{cma, reduce, TransportError};

/// Where bytes live, as seen from the copying process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Mapped into this process (shared memory).
    Local(*mut u8),
    /// In another process, reached with cross-memory attach.
    Remote { pid: u32, addr: u64 },
    /// GPU memory imported into this process (a unified device address), moved by the plan's
    /// [`DeviceEngine`].
    Device(u64),
}

/// Copies that involve GPU memory (the `cuda` feature provides one: [`crate::cuda::Gpu`]).
pub trait DeviceEngine: Send + Sync {
    /// Queues a copy between two unified addresses (device or host) on one of its streams.
    fn copy_async(&self, dst: u64, src: u64, len: u64) -> Result<(), TransportError>;
    /// Copies at once (staging between host buffers and device memory).
    fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), TransportError>;
    /// Waits for every queued copy.
    fn sync(&self) -> Result<(), TransportError>;
    /// A page-locked host buffer of at least `len` bytes to stage device bytes through (for
    /// TCP); hand it back with [`DeviceEngine::give_staging`]. Pooled: at most one per thread
    /// staging at once, each at most a bucket.
    fn take_staging(&self, len: usize) -> Result<Staging, TransportError>;
    fn give_staging(&self, buf: Staging);
}

/// A host buffer from [`DeviceEngine::take_staging`].
#[derive(Debug)]
pub struct Staging {
    pub ptr: *mut u8,
    pub cap: usize,
}

// SAFETY: the buffer is owned by whoever holds the Staging.
unsafe impl Send for Staging {}

// SAFETY: Loc is an address; the protocol guarantees exclusive access while a transfer runs.
unsafe impl Send for Loc {}
unsafe impl Sync for Loc {}

/// A registered tensor as the copier sees it: where its bytes start and how many there are.
/// Every operation's location comes from [`Region::at`], so no run of a plan reaches past the
/// tensor it names, whatever the plan or the peers said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub loc: Loc,
    pub nbytes: u64,
}

impl Region {
    /// The location of the `len` bytes at `offset`, if they lie inside the region.
    pub fn at(self, offset: u64, len: u64) -> Result<Loc, TransportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.nbytes => Ok(self.loc.offset(offset)),
            _ => Err(TransportError::OutOfBounds { offset, len, nbytes: self.nbytes }),
        }
    }
}

impl Loc {
    /// The location `by` bytes further on. Only for offsets already checked against the
    /// region's size ([`Region::at`] checks them).
    pub fn offset(self, by: u64) -> Loc {
        match self {
            // SAFETY: callers offset within a registered, bounds-checked region.
            Loc::Local(p) => Loc::Local(unsafe { p.add(by as usize) }),
            Loc::Remote { pid, addr } => Loc::Remote { pid, addr: addr + by },
            Loc::Device(p) => Loc::Device(p + by),
        }
    }
}

/// One operation of a bucket.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Copy {
        src: Loc,
        dst: Loc,
        len: u64,
    },
    Reduce {
        srcs: Box<[Loc]>,
        dst: Loc,
        len: u64,
        dtype: DType,
        op: ReduceOp,
    },
    /// `len` bytes from `src` to `offset` of destination tensor `key`, over TCP link `link`.
    Send {
        link: usize,
        key: std::sync::Arc<str>,
        offset: u64,
        src: Loc,
        len: u64,
    },
    /// The reduction of `srcs` (staged here, at most one bucket), sent like [`Op::Send`].
    ReduceSend {
        link: usize,
        key: std::sync::Arc<str>,
        offset: u64,
        srcs: Box<[Loc]>,
        len: u64,
        dtype: DType,
        op: ReduceOp,
    },
}

/// A rank's executable share of a batch: buckets of operations.
#[derive(Debug, Default)]
pub struct ExecPlan {
    pub buckets: Vec<Vec<Op>>,
    /// Upper bound of a bucket's bytes (and of each thread's staging buffer).
    pub bucket_size: u64,
    /// Authenticated TCP streams to agents on other hosts (several per peer).
    pub links: Vec<std::sync::Mutex<std::net::TcpStream>>,
    /// Moves the plan's [`Loc::Device`] bytes (required when it has any).
    pub device: Option<std::sync::Arc<dyn DeviceEngine>>,
}

impl std::fmt::Debug for dyn DeviceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceEngine")
    }
}

/// What every operation of one execution shares.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    piece: usize,
    links: &'a [std::sync::Mutex<std::net::TcpStream>],
    epoch: u64,
    dev: Option<&'a dyn DeviceEngine>,
}

fn engine(dev: Option<&dyn DeviceEngine>) -> Result<&dyn DeviceEngine, TransportError> {
    dev.ok_or_else(|| TransportError::Cuda("GPU memory in a plan without a device engine".into()))
}

impl ExecPlan {
    pub fn bytes(&self) -> u64 {
        self.buckets
            .iter()
            .flatten()
            .map(|op| match op {
                Op::Copy { len, .. } | Op::Reduce { len, .. } | Op::Send { len, .. } | Op::ReduceSend { len, .. } => {
                    *len
                }
            })
            .sum()
    }
}

/// Reads `len` bytes at `loc` into `dst`.
///
/// # Safety
/// `dst` valid for `len` writes; a Local `loc` valid for `len` reads.
unsafe fn read_into(dev: Option<&dyn DeviceEngine>, loc: Loc, dst: *mut u8, len: usize) -> Result<(), TransportError> {
    match loc {
        Loc::Device(p) => engine(dev)?.copy(dst as u64, p, len as u64),
        Loc::Local(p) => {
            std::ptr::copy_nonoverlapping(p, dst, len);
            Ok(())
        }
        Loc::Remote { pid, addr } => cma::read(pid, addr, dst, len),
    }
}

/// Writes `len` bytes from `src` to `loc`.
///
/// # Safety
/// `src` valid for `len` reads; a Local `loc` valid for `len` writes.
unsafe fn write_from(
    dev: Option<&dyn DeviceEngine>,
    loc: Loc,
    src: *const u8,
    len: usize,
) -> Result<(), TransportError> {
    match loc {
        Loc::Device(p) => engine(dev)?.copy(p, src as u64, len as u64),
        Loc::Local(p) => {
            std::ptr::copy_nonoverlapping(src, p, len);
            Ok(())
        }
        Loc::Remote { pid, addr } => cma::write(pid, addr, src, len),
    }
}

struct Scratch {
    bufs: Vec<Vec<u8>>,
}

impl Scratch {
    fn get(&mut self, i: usize, len: usize) -> *mut u8 {
        while self.bufs.len() <= i {
            self.bufs.push(Vec::new());
        }
        let b = &mut self.bufs[i];
        if b.len() < len {
            b.resize(len, 0);
        }
        b.as_mut_ptr()
    }
}

/// Reduces `srcs` (each `len` bytes) into a staging buffer and returns it.
///
/// # Safety
/// Every Local location in `srcs` is valid for `len` bytes.
unsafe fn reduce_staged<'a>(
    dev: Option<&dyn DeviceEngine>,
    srcs: &[Loc],
    len: usize,
    dtype: DType,
    op: ReduceOp,
    scratch: &'a mut Scratch,
) -> Result<&'a [u8], TransportError> {
    let mut staged: Vec<*const u8> = Vec::with_capacity(srcs.len());
    for (i, s) in srcs.iter().enumerate() {
        match *s {
            Loc::Local(p) => staged.push(p),
            r => {
                let buf = scratch.get(1 + i, len);
                read_into(dev, r, buf, len)?;
                staged.push(buf);
            }
        }
    }
    let inputs: Vec<&[u8]> = staged.iter().map(|p| std::slice::from_raw_parts(*p, len)).collect();
    let out = scratch.get(0, len);
    reduce::reduce(dtype, op, std::slice::from_raw_parts_mut(out, len), &inputs)?;
    Ok(std::slice::from_raw_parts(out, len))
}

/// # Safety
/// Every Local location of `op` is valid for its length.
unsafe fn run_op(op: &Op, scratch: &mut Scratch, cx: Ctx<'_>) -> Result<(), TransportError> {
    let Ctx { piece, links, epoch, dev } = cx;
    match op {
        Op::ReduceSend { link, key, offset, srcs, len, dtype, op } => {
            use std::io::Write;
            let buf = reduce_staged(dev, srcs, *len as usize, *dtype, *op, scratch)?;
            let mut s = links[*link].lock().unwrap();
            s.write_all(&crate::tcp::frame_header(epoch, key, *offset, *len))
                .and_then(|_| s.write_all(buf))
                .map_err(|e| TransportError::Io { what: format!("sending {len} reduced bytes of {key:?}"), source: e })
        }
        Op::Send { link, key, offset, src: Loc::Device(p), len } => {
            // Device bytes go through one pinned staging buffer (at most a bucket).
            use std::io::Write;
            let dev = engine(dev)?;
            let n = *len as usize;
            let buf = dev.take_staging(n)?;
            let sent = dev.copy(buf.ptr as u64, *p, *len).and_then(|_| {
                let mut s = links[*link].lock().unwrap();
                s.write_all(&crate::tcp::frame_header(epoch, key, *offset, *len))
                    // SAFETY: the staging buffer holds at least n bytes, just written.
                    .and_then(|_| s.write_all(std::slice::from_raw_parts(buf.ptr, n)))
                    .map_err(|e| TransportError::Io { what: format!("sending {len} bytes of {key:?}"), source: e })
            });
            dev.give_staging(buf);
            sent
        }
        Op::Send { link, key, offset, src, len } => {
            use std::io::Write;
            let len_us = *len as usize;
            let data: &[u8] = match *src {
                // Straight from the mapped worker memory into the socket.
                Loc::Local(p) => std::slice::from_raw_parts(p, len_us),
                r => {
                    // At most one bucket staged (device memory: copied down first).
                    let buf = scratch.get(0, len_us);
                    read_into(dev, r, buf, len_us)?;
                    std::slice::from_raw_parts(buf, len_us)
                }
            };
            let mut s = links[*link].lock().unwrap();
            s.write_all(&crate::tcp::frame_header(epoch, key, *offset, *len))
                .and_then(|_| s.write_all(data))
                .map_err(|e| TransportError::Io { what: format!("sending {len} bytes of {key:?}"), source: e })
        }
        Op::Copy { src, dst, len } => match (*src, *dst) {
            // Device to device, or between device and mapped host memory: queued on a stream.
            (Loc::Device(s), Loc::Device(d)) => engine(dev)?.copy_async(d, s, *len),
            (Loc::Device(s), Loc::Local(d)) => engine(dev)?.copy_async(d as u64, s, *len),
            (Loc::Local(s), Loc::Device(d)) => engine(dev)?.copy_async(d, s as u64, *len),
            (Loc::Local(s), d) => write_from(dev, d, s, *len as usize),
            (s, Loc::Local(d)) => read_into(dev, s, d, *len as usize),
            (s, d) => {
                // Remote to remote: stage through one buffer.
                let mut done = 0u64;
                while done < *len {
                    let n = (*len - done).min(piece as u64) as usize;
                    let buf = scratch.get(0, n);
                    read_into(dev, s.offset(done), buf, n)?;
                    write_from(dev, d.offset(done), buf, n)?;
                    done += n as u64;
                }
                Ok(())
            }
        },
        Op::Reduce { srcs, dst, len, dtype, op } => {
            let es = dtype.size();
            let step = (piece / es).max(1) * es;
            let mut done = 0u64;
            while done < *len {
                let n = (*len - done).min(step as u64) as usize;
                let mut inputs: Vec<&[u8]> = Vec::with_capacity(srcs.len());
                let mut staged: Vec<*mut u8> = Vec::with_capacity(srcs.len());
                for (i, s) in srcs.iter().enumerate() {
                    match s.offset(done) {
                        Loc::Local(p) => staged.push(p),
                        r => {
                            let buf = scratch.get(1 + i, n);
                            read_into(dev, r, buf, n)?;
                            staged.push(buf);
                        }
                    }
                }
                for p in &staged {
                    inputs.push(std::slice::from_raw_parts(*p, n));
                }
                match dst.offset(done) {
                    Loc::Local(p) => reduce::reduce(*dtype, *op, std::slice::from_raw_parts_mut(p, n), &inputs)?,
                    r => {
                        let buf = scratch.get(0, n);
                        reduce::reduce(*dtype, *op, std::slice::from_raw_parts_mut(buf, n), &inputs)?;
                        write_from(dev, r, buf, n)?;
                    }
                }
                done += n as u64;
            }
            Ok(())
        }
    }
}

/// A 64-bit digest of the bytes `op` delivered (read from whichever end is mapped here, else
/// through cross-memory attach). Digests of all ops add up (wrapping) to an order-independent
/// checksum of an epoch.
///
/// # Safety
/// As for [`run_op`].
unsafe fn digest(op: &Op, scratch: &mut Scratch, dev: Option<&dyn DeviceEngine>) -> Result<u64, TransportError> {
    if let Some(d) = dev {
        // Copies to device memory are queued: let them land before reading.
        d.sync()?;
    }
    let (loc, len) = match op {
        Op::Copy { src, dst, len } => (if matches!(dst, Loc::Local(_)) { *dst } else { *src }, *len),
        Op::Reduce { dst, len, .. } => (*dst, *len),
        Op::Send { src, len, .. } => (*src, *len),
        Op::ReduceSend { srcs, len, dtype, op, .. } => {
            let h = blake3::hash(reduce_staged(dev, srcs, *len as usize, *dtype, *op, scratch)?);
            return Ok(u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")));
        }
    };
    let n = len as usize;
    let bytes = match loc {
        Loc::Local(p) => std::slice::from_raw_parts(p, n),
        r => {
            let buf = scratch.get(0, n);
            read_into(dev, r, buf, n)?;
            std::slice::from_raw_parts(buf, n)
        }
    };
    let h = blake3::hash(bytes);
    Ok(u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")))
}

/// Runs every bucket on up to `threads` threads; returns the bytes written and, when `checksum`
/// is set, a checksum of them (0 otherwise). Stops at the first error and returns it.
///
/// # Safety
/// Every Local location of the plan must be mapped and valid for its length for the whole call,
/// and no other party may write the destinations meanwhile.
pub unsafe fn execute(
    plan: &ExecPlan,
    threads: usize,
    epoch: u64,
    checksum: bool,
) -> Result<(u64, u64), TransportError> {
    let piece = plan.bucket_size.clamp(1, 64 << 20) as usize;
    let threads = threads.clamp(1, plan.buckets.len().max(1));
    let cx = Ctx { piece, links: &plan.links, epoch, dev: plan.device.as_deref() };
    // SAFETY: upheld by our caller.
    let result = unsafe { run_buckets(plan, threads, cx, checksum) };
    // Queued device copies must land before the epoch counts as done, error or not.
    let synced = match cx.dev {
        Some(d) => d.sync(),
        None => Ok(()),
    };
    let (bytes, sum) = result?;
    synced?;
    Ok((bytes, sum))
}

/// # Safety
/// As for [`execute`].
unsafe fn run_buckets(
    plan: &ExecPlan,
    threads: usize,
    cx: Ctx<'_>,
    checksum: bool,
) -> Result<(u64, u64), TransportError> {
    let sum = std::sync::atomic::AtomicU64::new(0);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<TransportError>> = Mutex::new(None);
    if threads == 1 {
        // One bucket or one thread: no thread to start.
        let mut scratch = Scratch { bufs: Vec::new() };
        let mut total = 0u64;
        for op in plan.buckets.iter().flatten() {
            // SAFETY: upheld by the caller of execute.
            unsafe { run_op(op, &mut scratch, cx) }?;
            if checksum {
                // SAFETY: as above.
                total = total.wrapping_add(unsafe { digest(op, &mut scratch, cx.dev) }?);
            }
        }
        return Ok((plan.bytes(), total));
    }
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scratch = Scratch { bufs: Vec::new() };
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(bucket) = plan.buckets.get(i) else { return };
                    for op in bucket {
                        // SAFETY: upheld by the caller of execute.
                        let r = unsafe { run_op(op, &mut scratch, cx) }.and_then(|_| {
                            // SAFETY: as above.
                            let d = if checksum { unsafe { digest(op, &mut scratch, cx.dev) }? } else { 0 };
                            sum.fetch_add(d, Ordering::Relaxed); // wraps
                            Ok(())
                        });
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            first_err.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    match first_err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok((plan.bytes(), sum.into_inner())),
    }
}

/// memcpy bandwidth in GB/s over buffers of `bytes`, on `threads` threads (the limit transfers
/// are compared with). Small sizes are copied many times per timing so that the figure is the
/// copy's, not the clock's; the best of `reps` timings counts.
pub fn memcpy_gbps(bytes: usize, threads: usize, reps: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let inner = ((64usize << 20) / bytes.max(1)).clamp(1, 100_000);
    let per = bytes.div_ceil(threads.max(1)).max(1);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        if threads <= 1 {
            for _ in 0..inner {
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
            }
        } else {
            std::thread::scope(|s| {
                for (d, sc) in dst.chunks_mut(per).zip(src.chunks(per)) {
                    s.spawn(move || {
                        for _ in 0..inner {
                            d.copy_from_slice(sc);
                            std::hint::black_box(&d);
                        }
                    });
                }
            });
        }
        best = best.min(t0.elapsed().as_secs_f64() / inner as f64);
    }
    bytes as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_checksums_do_not_depend_on_threads() {
        let src: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let plan = |dst: &mut Vec<u8>| ExecPlan {
            buckets: (0..16)
                .map(|b| {
                    vec![Op::Copy {
                        src: Loc::Local(src.as_ptr().wrapping_add(b * 4096) as *mut u8),
                        dst: Loc::Local(dst.as_mut_ptr().wrapping_add(b * 4096)),
                        len: 4096,
                    }]
                })
                .collect(),
            bucket_size: 4096,
            links: Vec::new(),
            device: None,
        };
        let p = plan(&mut dst);
        // SAFETY: every location is inside src or dst, alive for the calls.
        let (b1, c1) = unsafe { execute(&p, 1, 0, true) }.unwrap();
        let (b4, c4) = unsafe { execute(&p, 4, 0, true) }.unwrap();
        assert_eq!((b1, b4), (65536, 65536));
        assert_eq!(dst, src);
        assert!(c1 != 0 && c1 == c4, "checksum independent of the thread count");
        assert_eq!(unsafe { execute(&p, 2, 0, false) }.unwrap().1, 0);
        let mut other = src.clone();
        other[100] ^= 1;
        let p2 = ExecPlan {
            buckets: vec![vec![Op::Copy {
                src: Loc::Local(other.as_mut_ptr()),
                dst: Loc::Local(dst.as_mut_ptr()),
                len: 65536,
            }]],
            bucket_size: 65536,
            links: Vec::new(),
            device: None,
        };
        // SAFETY: as above.
        let (_, c) = unsafe { execute(&p2, 1, 0, true) }.unwrap();
        assert_ne!(c, c1, "one flipped bit changes the checksum");
    }

    /// A device engine over host memory: "device addresses" are host addresses. It exercises the
    /// executor's routing of device locations (queued copies, staging, synchronization) where
    /// there is no GPU; the CUDA engine is tested on a GPU machine.
    #[derive(Default)]
    struct HostEngine {
        queued: std::sync::Mutex<Vec<(u64, u64, u64)>>,
        syncs: AtomicUsize,
        staging_out: AtomicUsize,
        staging_peak: AtomicUsize,
    }

    impl DeviceEngine for HostEngine {
        fn copy_async(&self, dst: u64, src: u64, len: u64) -> Result<(), TransportError> {
            self.queued.lock().unwrap().push((dst, src, len));
            Ok(())
        }
        fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), TransportError> {
            // SAFETY: test addresses are live host buffers of at least len bytes.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len as usize) };
            Ok(())
        }
        fn sync(&self) -> Result<(), TransportError> {
            for (d, s, n) in self.queued.lock().unwrap().drain(..) {
                self.copy(d, s, n)?;
            }
            self.syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn take_staging(&self, len: usize) -> Result<Staging, TransportError> {
            let out = self.staging_out.fetch_add(1, Ordering::Relaxed) + 1;
            self.staging_peak.fetch_max(out, Ordering::Relaxed);
            let b = vec![0u8; len].into_boxed_slice();
            Ok(Staging { cap: b.len(), ptr: Box::into_raw(b) as *mut u8 })
        }
        fn give_staging(&self, buf: Staging) {
            self.staging_out.fetch_sub(1, Ordering::Relaxed);
            // SAFETY: made by take_staging from a boxed slice of cap bytes.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(buf.ptr, buf.cap)) });
        }
    }

    #[test]
    fn device_locations_go_through_the_engine_and_land_before_execute_returns() {
        let src: Vec<u8> = (0..8 * 4096u32).map(|i| (i * 13 % 251) as u8).collect();
        let mut host_dst = vec![0u8; src.len()];
        let mut dev_dst = vec![0u8; src.len()];
        let dev = std::sync::Arc::new(HostEngine::default());
        let (s0, d0) = (src.as_ptr() as u64, dev_dst.as_mut_ptr() as u64);
        let d = |base: u64, at: usize| Loc::Device(base + at as u64);
        let plan = ExecPlan {
            buckets: (0..8)
                .map(|b| {
                    let at = b * 4096;
                    vec![
                        // device -> device, host -> device, device -> host
                        Op::Copy { src: d(s0, at), dst: d(d0, at), len: 2048 },
                        Op::Copy {
                            src: Loc::Local(src.as_ptr().wrapping_add(at + 2048) as *mut u8),
                            dst: d(d0, at + 2048),
                            len: 2048,
                        },
                        Op::Copy { src: d(s0, at), dst: Loc::Local(host_dst.as_mut_ptr().wrapping_add(at)), len: 4096 },
                    ]
                })
                .collect(),
            bucket_size: 4096,
            links: Vec::new(),
            device: Some(dev.clone()),
        };
        // SAFETY: every location is inside the three live buffers.
        let (bytes, sum) = unsafe { execute(&plan, 2, 0, true) }.unwrap();
        assert_eq!(bytes, 8 * 8192);
        assert_eq!(dev_dst, src, "queued device copies landed");
        assert_eq!(host_dst, src);
        assert!(dev.syncs.load(Ordering::Relaxed) >= 1);
        assert_ne!(sum, 0);
        let mut plain = plan;
        plain.device = None;
        // SAFETY: as above.
        let e = unsafe { execute(&plain, 1, 0, false) }.unwrap_err();
        assert!(e.to_string().contains("without a device engine"), "{e}");
    }

    #[test]
    fn partial_device_sources_are_reduced_through_bounded_staging() {
        let a: Vec<f32> = (0..1024).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..1024).map(|i| 2.0 * i as f32).collect();
        let mut out = vec![0f32; 1024];
        let dev = std::sync::Arc::new(HostEngine::default());
        let plan = ExecPlan {
            buckets: vec![vec![Op::Reduce {
                srcs: vec![Loc::Device(a.as_ptr() as u64), Loc::Device(b.as_ptr() as u64)].into(),
                dst: Loc::Device(out.as_mut_ptr() as u64),
                len: 4096,
                dtype: DType::F32,
                op: ReduceOp::Sum,
            }]],
            bucket_size: 1024,
            links: Vec::new(),
            device: Some(dev.clone()),
        };
        // SAFETY: the three vectors are live and 4096 bytes each.
        unsafe { execute(&plan, 1, 0, false) }.unwrap();
        assert!(out.iter().enumerate().all(|(i, v)| *v == 3.0 * i as f32));
        assert_eq!(dev.staging_peak.load(Ordering::Relaxed), 0, "reductions stage in the thread's own buffer");
    }
}
