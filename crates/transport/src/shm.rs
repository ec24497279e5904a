//! POSIX shared-memory segments: created by workers for their tensors, mapped by agents.

use std::ffi::CString;
use std::io;

use crate::TransportError;

/// A mapped shared-memory object. Unmapped on drop; the name is removed only by [`ShmSegment::unlink`].
pub struct ShmSegment {
    name: String,
    ptr: *mut u8,
    len: usize,
    /// The object's device and inode, to recognize it in another process's mappings.
    id: (u64, u64),
}

// SAFETY: the mapping is plain shared memory; concurrent access is coordinated by the protocol
// (a destination is written only while its worker waits in a receive).
unsafe impl Send for ShmSegment {}
unsafe impl Sync for ShmSegment {}

fn cname(name: &str) -> Result<CString, TransportError> {
    if !name.starts_with('/') || name[1..].contains('/') || name.len() > 250 {
        return Err(TransportError::BadName(name.to_string()));
    }
    CString::new(name).map_err(|_| TransportError::BadName(name.to_string()))
}

fn os_err(what: &str, name: &str) -> TransportError {
    TransportError::Io { what: format!("{what} {name}"), source: io::Error::last_os_error() }
}

impl ShmSegment {
    /// Creates a new zero-filled segment of `len` bytes, private to this user.
    pub fn create(name: &str, len: usize) -> Result<Self, TransportError> {
        let c = cname(name)?;
        // SAFETY: valid name; the fd is closed below after mapping.
        let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600) };
        if fd < 0 {
            return Err(os_err("shm_open(create)", name));
        }
        // SAFETY: fd is a fresh shm object.
        if unsafe { libc::ftruncate(fd, len.max(1) as libc::off_t) } != 0 {
            let e = os_err("ftruncate", name);
            // SAFETY: closing and unlinking what we just created.
            unsafe {
                libc::close(fd);
                libc::shm_unlink(c.as_ptr());
            }
            return Err(e);
        }
        Self::map(name, fd, len, 0)
    }

    /// Creates a new segment, first removing a stale one of that name (for names that embed the
    /// creator's pid: one that exists was left by a dead process that had the same pid).
    pub fn recreate(name: &str, len: usize) -> Result<Self, TransportError> {
        Self::unlink(name);
        Self::create(name, len)
    }

    /// Maps an existing segment (its whole size).
    pub fn open(name: &str) -> Result<Self, TransportError> {
        let c = cname(name)?;
        // SAFETY: valid name.
        let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_RDWR, 0) };
        if fd < 0 {
            return Err(TransportError::NoSuchMemory(format!("shared memory {name}: {}", io::Error::last_os_error())));
        }
        // SAFETY: fstat into a zeroed struct on a valid fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let e = os_err("fstat", name);
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // Populate the page tables now (at registration) rather than fault page by page during
        // the first transfer.
        Self::map(name, fd, st.st_size as usize, libc::MAP_POPULATE)
    }

    /// Maps shared memory given as a descriptor (taken from a worker with
    /// [`crate::cma::take_fd`]), its whole size; `label` names it in messages. Refuses an object
    /// smaller than `at_least` bytes.
    pub fn from_fd(label: &str, fd: std::os::fd::OwnedFd, at_least: u64) -> Result<Self, TransportError> {
        use std::os::fd::IntoRawFd;
        let fd = fd.into_raw_fd();
        // SAFETY: fstat into a zeroed struct on a valid fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let e = os_err("fstat", label);
            unsafe { libc::close(fd) };
            return Err(e);
        }
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || (st.st_size as u64) < at_least {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
            return Err(TransportError::NoSuchMemory(format!(
                "{label}: not shared memory of at least {at_least} bytes ({} bytes)",
                st.st_size
            )));
        }
        Self::map(label, fd, st.st_size as usize, libc::MAP_POPULATE)
    }

    fn map(name: &str, fd: libc::c_int, len: usize, extra: libc::c_int) -> Result<Self, TransportError> {
        // SAFETY: fstat into a zeroed struct on a valid fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let e = os_err("fstat", name);
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: mapping a valid fd of at least `len` bytes (ftruncate/fstat above).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | extra,
                fd,
                0,
            )
        };
        // SAFETY: the mapping keeps the object alive; the fd is no longer needed.
        unsafe { libc::close(fd) };
        if ptr == libc::MAP_FAILED {
            return Err(os_err("mmap", name));
        }
        Ok(ShmSegment { name: name.to_string(), ptr: ptr as *mut u8, len, id: (st.st_dev, st.st_ino) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The object's `(st_dev, st_ino)`, as [`crate::cma::holds_file`] looks for it.
    pub fn file_id(&self) -> (u64, u64) {
        self.id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The whole segment as a byte slice.
    ///
    /// # Safety
    /// No other process may write the segment while the slice is alive.
    pub unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// The whole segment as a mutable byte slice.
    ///
    /// # Safety
    /// No other process may access the segment while the slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }

    /// Removes the name; existing mappings stay valid.
    pub fn unlink(name: &str) {
        if let Ok(c) = cname(name) {
            // SAFETY: valid name.
            unsafe { libc::shm_unlink(c.as_ptr()) };
        }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len.max(1)) };
    }
}
