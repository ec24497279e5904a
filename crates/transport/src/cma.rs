//! Cross-memory attach: reading and writing another process's memory with one copy.

use std::io;

use crate::TransportError;

fn check(what: &str, pid: u32, addr: u64, len: usize, n: isize) -> Result<(), TransportError> {
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EFAULT) => TransportError::NoSuchMemory(format!(
                "{what}: pid {pid} has no mapping for [{addr:#x}, {:#x})",
                addr + len as u64
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
