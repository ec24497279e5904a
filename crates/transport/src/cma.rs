//! Cross-memory attach: reading and writing another process's memory with one copy.

use std::io;

use crate::TransportError;

fn check(what: &str, pid: u32, addr: u64, len: usize, n: isize) -> Result<(), TransportError> {
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EFAULT) => TransportError::NoSuchMemory(format!(
                "{what}: pid {pid} has no mapping for [{addr:#x}, {:#x})",
                addr.saturating_add(len as u64)
            )),
            Some(libc::ESRCH) => TransportError::NoSuchMemory(format!("{what}: process {pid} is gone")),
            _ => TransportError::Io { what: format!("{what} pid {pid}"), source: e },
        });
    }
    if n as usize != len {
        return Err(TransportError::NoSuchMemory(format!(
            "{what}: pid {pid} copied {n} of {len} bytes at {addr:#x} (mapping ends early)"
        )));
    }
    Ok(())
}

/// Copies `len` bytes at `addr` in process `pid` into `dst`.
///
/// # Safety
/// `dst` must be valid for `len` writes.
pub unsafe fn read(pid: u32, addr: u64, dst: *mut u8, len: usize) -> Result<(), TransportError> {
    if len == 0 {
        return Ok(());
    }
    let local = libc::iovec { iov_base: dst as *mut libc::c_void, iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    let n = libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0);
    check("process_vm_readv", pid, addr, len, n)
}

/// Copies `len` bytes from `src` to `addr` in process `pid`.
///
/// # Safety
/// `src` must be valid for `len` reads.
pub unsafe fn write(pid: u32, addr: u64, src: *const u8, len: usize) -> Result<(), TransportError> {
    if len == 0 {
        return Ok(());
    }
    let local = libc::iovec { iov_base: src as *mut libc::c_void, iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    let n = libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0);
    check("process_vm_writev", pid, addr, len, n)
}

/// Takes descriptor `fd` of process `pid` into this process with `pidfd_getfd` (the same ptrace
/// rights as cross-memory attach: a worker grants them with `setup_ptrace`).
pub fn take_fd(pid: u32, fd: i32) -> Result<std::os::fd::OwnedFd, TransportError> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) } as i32;
    if pidfd < 0 {
        return Err(TransportError::Io { what: format!("pidfd_open({pid})"), source: io::Error::last_os_error() });
    }
    // SAFETY: as above.
    let local = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
    let err = io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(pidfd) };
    if local < 0 {
        return Err(TransportError::Io { what: format!("pidfd_getfd(process {pid}, fd {fd})"), source: err });
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(local) })
}

/// Whether process `pid` has the file `(st_dev, st_ino)` mapped or open — the kernel's word, from
/// `/proc/{pid}/maps` and `/proc/{pid}/fd`, that the process holds that shared-memory object
/// (reading them needs the same rights over `pid` as reading its memory).
pub fn holds_file(pid: u32, (dev, ino): (u64, u64)) -> Result<bool, TransportError> {
    let io = |what: String, e: io::Error| TransportError::Io { what, source: e };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| io(format!("reading the mappings of process {pid}"), e))?;
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    for line in maps.lines() {
        // address perms offset dev inode [path]
        let mut f = line.split_ascii_whitespace().skip(3);
        let (Some(d), Some(i)) = (f.next(), f.next()) else { continue };
        let Some((ma, mi)) = d.split_once(':') else { continue };
        let same_dev =
            u64::from_str_radix(ma, 16).ok() == Some(major) && u64::from_str_radix(mi, 16).ok() == Some(minor);
        if same_dev && i.parse::<u64>().ok() == Some(ino) {
            return Ok(true);
        }
    }
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(d) => d,
        Err(_) => return Ok(false),
    };
    for e in fds.flatten() {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(e.path()) {
            if m.dev() == dev && m.ino() == ino {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_holds_the_segments_it_maps_and_not_others() {
        let name = format!("/tb-holds-{}", std::process::id());
        let seg = crate::shm::ShmSegment::recreate(&name, 4096).unwrap();
        assert!(holds_file(std::process::id(), seg.file_id()).unwrap());
        // A process that never opened it (a child `sleep`) does not hold it.
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert!(!holds_file(child.id(), seg.file_id()).unwrap());
        let _ = child.kill();
        let _ = child.wait();
        crate::shm::ShmSegment::unlink(&name);
    }
}
