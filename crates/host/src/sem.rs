//! POSIX named semaphores (`sem_open`), private to the job's user (mode 0600).

use std::ffi::CString;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::HostError;

/// An open named semaphore. Closing happens on drop; unlinking is explicit.
pub struct Semaphore {
    sem: *mut libc::sem_t,
    name: String,
}

// SAFETY: a sem_t from sem_open may be used from any thread; the pointer is never freed before drop.
unsafe impl Send for Semaphore {}
unsafe impl Sync for Semaphore {}

fn cname(name: &str) -> Result<CString, HostError> {
    if !name.starts_with('/') || name[1..].contains('/') || name.len() > 250 {
        return Err(HostError::BadSemaphoreName(name.to_string()));
    }
    CString::new(name).map_err(|_| HostError::BadSemaphoreName(name.to_string()))
}

impl Semaphore {
    fn open_with(name: &str, flags: libc::c_int, value: u32) -> Result<Self, HostError> {
        let c = cname(name)?;
        // SAFETY: valid NUL-terminated name; mode and value are passed as the variadic args sem_open expects.
        let sem = unsafe { libc::sem_open(c.as_ptr(), flags, 0o600 as libc::c_uint, value as libc::c_uint) };
        if sem == libc::SEM_FAILED {
            return Err(HostError::Semaphore { name: name.to_string(), source: io::Error::last_os_error() });
        }
        Ok(Semaphore { sem, name: name.to_string() })
    }

    /// Creates a new semaphore; fails if one of that name exists.
    pub fn create(name: &str, value: u32) -> Result<Self, HostError> {
        Self::open_with(name, libc::O_CREAT | libc::O_EXCL, value)
    }

    /// Creates a fresh semaphore, replacing any stale one of that name.
    pub fn recreate(name: &str, value: u32) -> Result<Self, HostError> {
        Self::unlink(name);
        Self::create(name, value)
    }

    /// Opens an existing semaphore.
    pub fn open(name: &str) -> Result<Self, HostError> {
        Self::open_with(name, 0, 0)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn post(&self) -> Result<(), HostError> {
        // SAFETY: self.sem is a live semaphore.
        if unsafe { libc::sem_post(self.sem) } != 0 {
            return Err(HostError::Semaphore { name: self.name.clone(), source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Decrements without blocking; false when the value was 0.
    pub fn try_wait(&self) -> bool {
        // SAFETY: self.sem is a live semaphore.
        unsafe { libc::sem_trywait(self.sem) == 0 }
    }

    /// Waits up to `timeout` to decrement; false on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool, HostError> {
        let deadline = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + timeout;
        let ts = libc::timespec { tv_sec: deadline.as_secs() as libc::time_t, tv_nsec: deadline.subsec_nanos() as _ };
        loop {
            // SAFETY: self.sem is a live semaphore and ts a valid timespec.
            if unsafe { libc::sem_timedwait(self.sem, &ts) } == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ETIMEDOUT) => return Ok(false),
                _ => return Err(HostError::Semaphore { name: self.name.clone(), source: e }),
            }
        }
    }

    /// Current value (for diagnostics and tests).
    pub fn value(&self) -> i32 {
        let mut v = 0;
        // SAFETY: self.sem is a live semaphore.
        unsafe { libc::sem_getvalue(self.sem, &mut v) };
        v
    }

    /// Removes the name (open handles stay valid). Missing names are fine.
    pub fn unlink(name: &str) {
        if let Ok(c) = cname(name) {
            // SAFETY: valid NUL-terminated name.
            unsafe { libc::sem_unlink(c.as_ptr()) };
        }
    }
}

impl Drop for Semaphore {
    fn drop(&mut self) {
        // SAFETY: the semaphore was opened by sem_open and is closed once.
        unsafe { libc::sem_close(self.sem) };
    }
}
