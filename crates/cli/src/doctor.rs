//! `tensorbus doctor`: can this machine run tensorbus, and which data paths work here? Each check
//! does the real thing between two processes the way an agent and a worker do — shared memory,
//! semaphores, cross-memory attach and `pidfd_getfd` from a process that is not the owner's
//! parent (what `setup_ptrace` allows), CUDA IPC handles and virtual-memory file descriptors
//! opened in another process — and says what to change when one fails.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    /// `ok`, `fail` or `skip`.
    pub status: &'static str,
    pub detail: String,
}

fn check(name: &'static str, r: Result<String, String>) -> Check {
    match r {
        Ok(detail) => Check { name, status: "ok", detail },
        Err(detail) if detail.starts_with("skip: ") => Check { name, status: "skip", detail: detail[6..].into() },
        Err(detail) => Check { name, status: "fail", detail },
    }
}

/// A byte pattern both processes can compute.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Runs `tensorbus doctor-child ARGS` once this process has let it in (`setup_ptrace`), and
/// returns its `ok` line.
fn child(args: &[String]) -> Result<String, String> {
    let mut c = crate::self_command()?
        .arg("doctor-child")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting a child process: {e}"))?;
    tensorbus_host::bootstrap::setup_ptrace(c.id()).map_err(|e| e.to_string())?;
    let _ = c.stdin.take().expect("piped").write_all(b"go\n");
    let mut line = String::new();
    let _ = BufReader::new(c.stdout.take().expect("piped")).read_line(&mut line);
    let _ = c.wait();
    match line.trim().split_once(' ') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        Some(("error", rest)) => Err(rest.to_string()),
        _ => Err(format!("the child process said {line:?}")),
    }
}

fn shm() -> Result<String, String> {
    let name = format!("/tb-doctor-{}", std::process::id());
    let seg = tensorbus_transport::shm::ShmSegment::recreate(&name, 1 << 20).map_err(|e| e.to_string())?;
    // SAFETY: our own fresh segment.
    unsafe { seg.as_mut_slice() }.copy_from_slice(&pattern(1 << 20));
    let other = tensorbus_transport::shm::ShmSegment::open(&name).map_err(|e| e.to_string());
    tensorbus_transport::shm::ShmSegment::unlink(&name);
    // SAFETY: nobody else writes the segment.
    let same = unsafe { other?.as_slice() } == pattern(1 << 20).as_slice();
    if same {
        Ok("a 1 MiB segment in /dev/shm, mapped twice".into())
    } else {
        Err("a second mapping of a shared-memory segment saw other bytes".into())
    }
}

fn semaphores() -> Result<String, String> {
    use tensorbus_host::sem::Semaphore;
    let name = format!("/tb-doctor-{}", std::process::id());
    let s = Semaphore::recreate(&name, 0).map_err(|e| e.to_string())?;
    let o = Semaphore::open(&name).map_err(|e| e.to_string());
    Semaphore::unlink(&name);
    o?.post().map_err(|e| e.to_string())?;
    match s.wait_timeout(std::time::Duration::from_secs(1)) {
        Ok(true) => Ok("named POSIX semaphore posted and taken".into()),
        Ok(false) => Err("a posted semaphore was not seen".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn ptrace_scope() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        Ok(s) => format!("Yama ptrace_scope {}", s.trim()),
        Err(_) => "no Yama".into(),
    }
}

fn cma() -> Result<String, String> {
    let data = pattern(1 << 16);
    let r = child(&["--cma".into(), format!("{}:{}:{}", std::process::id(), data.as_ptr() as u64, data.len())]);
    std::hint::black_box(&data);
    r.map(|d| format!("{d} ({})", ptrace_scope()))
        .map_err(|e| format!("{e} ({}); agents read CPU tensors this way: see setup_ptrace", ptrace_scope()))
}

fn pidfd() -> Result<String, String> {
    let f = tempfile_with(&pattern(4096))?;
    use std::os::fd::AsRawFd;
    let r = child(&["--pidfd".into(), format!("{}:{}", std::process::id(), f.as_raw_fd())]);
    drop(f);
    r.map_err(|e| format!("{e}; agents take PyTorch expandable-segment memory this way"))
}

/// An unlinked temporary file holding `data`.
fn tempfile_with(data: &[u8]) -> Result<std::fs::File, String> {
    let path = std::env::temp_dir().join(format!("tb-doctor-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    f.write_all(data).map_err(|e| e.to_string())?;
    Ok(f)
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use tensorbus_transport::cuda::{self, DeviceBuffer, Shared};

    pub fn driver() -> Result<String, String> {
        if !cuda::available() {
            return Err("skip: no CUDA driver or device here".into());
        }
        cuda::describe_devices().map_err(|e| e.to_string())
    }

    /// Shares a fresh allocation with a child process that fills it; checks the bytes.
    fn round_trip(piece: Option<u64>) -> Result<String, String> {
        if !cuda::available() {
            return Err("skip: no CUDA device".into());
        }
        let len = 4u64 << 20;
        let buf = DeviceBuffer::alloc(0, len, piece).map_err(|e| e.to_string())?;
        let arg = match cuda::share(buf.ptr(), len).map_err(|e| e.to_string())? {
            Shared::Ipc { device, handle, alloc_size, offset } => {
                let hex: String = handle.iter().map(|b| format!("{b:02x}")).collect();
                vec!["--cuda-ipc".into(), format!("{device}:{hex}:{alloc_size}:{offset}:{len}")]
            }
            Shared::Fds { device, pieces, offset } => {
                let p: Vec<String> = pieces.iter().map(|(fd, size)| format!("{fd}/{size}")).collect();
                vec!["--cuda-fds".into(), format!("{device}:{}:{}:{offset}:{len}", std::process::id(), p.join(","))]
            }
        };
        let said = child(&arg)?;
        let mut back = vec![0u8; len as usize];
        buf.read(0, &mut back).map_err(|e| e.to_string())?;
        if back != pattern(len as usize) {
            return Err("the other process's writes did not reach the allocation".into());
        }
        Ok(said)
    }

    pub fn ipc() -> Result<String, String> {
        round_trip(None)
    }

    pub fn vmm() -> Result<String, String> {
        round_trip(Some(2 << 20))
    }

    /// The child's side: opens what the parent shared, writes the pattern.
    pub fn child_ipc(spec: &str) -> Result<String, String> {
        let f: Vec<&str> = spec.split(':').collect();
        let [device, hex, alloc, offset, len] = f[..] else { return Err(format!("bad spec {spec:?}")) };
        let n = |s: &str| s.parse::<u64>().map_err(|e| e.to_string());
        let handle: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let gpu = cuda::Gpu::new(1).map_err(|e| e.to_string())?;
        let ptr =
            gpu.open_ipc(n(device)? as u32, &handle, n(offset)?, n(len)?, n(alloc)?).map_err(|e| e.to_string())?;
        fill(&gpu, ptr, n(len)?)?;
        Ok(format!("opened by IPC handle in another process ({} open)", gpu.opens()))
    }

    pub fn child_fds(spec: &str) -> Result<String, String> {
        let f: Vec<&str> = spec.split(':').collect();
        let [device, pid, pieces, offset, len] = f[..] else { return Err(format!("bad spec {spec:?}")) };
        let n = |s: &str| s.parse::<u64>().map_err(|e| e.to_string());
        let pieces: Vec<(i32, u64)> = pieces
            .split(',')
            .map(|p| {
                let (fd, size) = p.split_once('/').ok_or("bad piece")?;
                Ok((fd.parse::<i32>().map_err(|e| e.to_string())?, n(size)?))
            })
            .collect::<Result<_, String>>()?;
        let gpu = cuda::Gpu::new(1).map_err(|e| e.to_string())?;
        let ptr =
            gpu.open_fds(n(device)? as u32, n(pid)? as u32, &pieces, n(offset)?, n(len)?).map_err(|e| e.to_string())?;
        fill(&gpu, ptr, n(len)?)?;
        Ok(format!("{} virtual-memory piece(s) taken with pidfd_getfd and mapped in another process", pieces.len()))
    }

    fn fill(gpu: &cuda::Gpu, ptr: u64, len: u64) -> Result<(), String> {
        use tensorbus_transport::exec::DeviceEngine;
        let data = pattern(len as usize);
        gpu.copy(ptr, data.as_ptr() as u64, len).map_err(|e| e.to_string())
    }
}

/// Every check, in order.
pub fn run_checks() -> Vec<Check> {
    #[allow(unused_mut)]
    let mut out = vec![
        check("shared memory", shm()),
        check("POSIX semaphores", semaphores()),
        check("cross-memory attach from another process", cma()),
        check("pidfd_getfd from another process", pidfd()),
    ];
    #[cfg(feature = "cuda")]
    {
        out.push(check("CUDA driver", gpu::driver()));
        out.push(check("CUDA IPC handle to another process", gpu::ipc()));
        out.push(check("CUDA virtual memory by fd to another process", gpu::vmm()));
    }
    #[cfg(not(feature = "cuda"))]
    out.push(Check { name: "CUDA driver", status: "skip", detail: "built without the `cuda` feature".into() });
    out
}

/// `tensorbus doctor`: prints the checks; fails when one fails.
pub fn run(json: bool) -> Result<(), String> {
    let checks = run_checks();
    if json {
        println!("{}", serde_json::to_string(&checks).expect("encodes"));
    } else {
        for c in &checks {
            println!("{:<4} {:<48} {}", c.status, c.name, c.detail);
        }
    }
    let failed: Vec<&str> = checks.iter().filter(|c| c.status == "fail").map(|c| c.name).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed: {}", failed.join(", ")))
    }
}

/// `tensorbus doctor-child` (hidden): the other process of a check. Waits for the go-ahead on
/// stdin (sent once the parent has let it in), does its part, prints `ok …` or `error …`.
pub fn child_main(cma: Option<String>, pidfd: Option<String>, cuda_ipc: Option<String>, cuda_fds: Option<String>) {
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    let r = if let Some(spec) = cma {
        child_cma(&spec)
    } else if let Some(spec) = pidfd {
        child_pidfd(&spec)
    } else if let Some(spec) = cuda_ipc {
        child_gpu(&spec, true)
    } else if let Some(spec) = cuda_fds {
        child_gpu(&spec, false)
    } else {
        Err("nothing to do".into())
    };
    match r {
        Ok(d) => println!("ok {d}"),
        Err(e) => println!("error {e}"),
    }
}

#[cfg(feature = "cuda")]
fn child_gpu(spec: &str, ipc: bool) -> Result<String, String> {
    if ipc {
        gpu::child_ipc(spec)
    } else {
        gpu::child_fds(spec)
    }
}

#[cfg(not(feature = "cuda"))]
fn child_gpu(_spec: &str, _ipc: bool) -> Result<String, String> {
    Err("built without the `cuda` feature".into())
}

fn child_cma(spec: &str) -> Result<String, String> {
    let f: Vec<u64> =
        spec.split(':').map(|s| s.parse().map_err(|_| format!("bad spec {spec:?}"))).collect::<Result<_, _>>()?;
    let [pid, addr, len] = f[..] else { return Err(format!("bad spec {spec:?}")) };
    let mut buf = vec![0u8; len as usize];
    // SAFETY: reading into our own buffer of len bytes.
    unsafe { tensorbus_transport::cma::read(pid as u32, addr, buf.as_mut_ptr(), buf.len()) }
        .map_err(|e| e.to_string())?;
    if buf == pattern(len as usize) {
        Ok(format!("read {len} bytes of another process's memory"))
    } else {
        Err("process_vm_readv returned other bytes".into())
    }
}

fn child_pidfd(spec: &str) -> Result<String, String> {
    use std::io::{Read, Seek};
    let (pid, fd) = spec.split_once(':').ok_or_else(|| format!("bad spec {spec:?}"))?;
    let (pid, fd): (u32, i32) = (pid.parse().map_err(|_| "bad pid")?, fd.parse().map_err(|_| "bad fd")?);
    // What an agent does with a worker's exported GPU memory.
    let mut f = std::fs::File::from(tensorbus_transport::cma::take_fd(pid, fd).map_err(|e| e.to_string())?);
    let mut data = Vec::new();
    f.rewind().and_then(|_| f.read_to_end(&mut data)).map_err(|e| e.to_string())?;
    if data == pattern(4096) {
        Ok("took another process's file descriptor".into())
    } else {
        Err("the descriptor taken held other bytes".into())
    }
}
