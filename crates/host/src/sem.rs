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

/// Unlinks tensorbus semaphores in `/dev/shm` whose creator is gone: command-queue semaphores
/// (`tensorbus-q{hash}-{agent pid}-…`) of agents that died without removing them, and workers'
/// completion semaphores (`tb-{type}-{context}-{pid}-{n}`) of workers that died. Objects of other
/// users are left alone (the kernel refuses anyway), and so is anything whose pid is alive or that
/// does not follow these names. Returns how many were removed.
pub fn remove_orphans() -> usize {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return 0 };
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().and_then(|n| n.strip_prefix("sem.")) else { continue };
        let Some(pid) = creator(name) else { continue };
        if crate::pid_alive(pid) {
            continue;
        }
        let full = format!("/{name}");
        if let Ok(c) = cname(&full) {
            // SAFETY: valid NUL-terminated name.
            if unsafe { libc::sem_unlink(c.as_ptr()) } == 0 {
                removed += 1;
            }
        }
    }
    removed
}

/// The pid in a tensorbus semaphore's name.
fn creator(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix("tensorbus-q") {
        // {hash}-{pid}-{items|free}
        let mut parts = rest.split('-');
        let (_hash, pid, kind) = (parts.next()?, parts.next()?, parts.next()?);
        return (parts.next().is_none() && (kind == "items" || kind == "free")).then(|| pid.parse().ok()).flatten();
    }
    // tb-{type}-{context}-{pid}-{n}: type and context never contain '-'.
    let parts: Vec<&str> = name.strip_prefix("tb-")?.split('-').collect();
    if parts.len() != 4 || parts[3].parse::<u64>().is_err() {
        return None;
    }
    parts[2].parse().ok()
}

impl Drop for Semaphore {
    fn drop(&mut self) {
        // SAFETY: the semaphore was opened by sem_open and is closed once.
        unsafe { libc::sem_close(self.sem) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(name: &str) -> bool {
        std::path::Path::new(&format!("/dev/shm/sem.{}", &name[1..])).exists()
    }

    #[test]
    fn orphans_of_dead_processes_go_and_the_living_keep_theirs() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let names = [
            format!("/tb-Transfer-job_a-{dead}-7"),
            format!("/tensorbus-q00000000000000aa-{dead}-items"),
            format!("/tb-Transfer-job_a-{me}-8"),
            format!("/tensorbus-q00000000000000aa-{me}-free"),
            format!("/tb-not-ours-{dead}"),
        ];
        let sems: Vec<Semaphore> = names.iter().map(|n| Semaphore::recreate(n, 0).unwrap()).collect();
        assert!(remove_orphans() >= 2);
        assert!(!exists(&names[0]) && !exists(&names[1]), "orphans removed");
        assert!(exists(&names[2]) && exists(&names[3]), "a live creator keeps its semaphores");
        assert!(exists(&names[4]), "names that are not ours are left alone");
        sems[0].post().unwrap(); // open handles still work after the unlink
        for n in &names {
            Semaphore::unlink(n);
        }
    }

    #[test]
    fn creators_are_read_only_from_our_names() {
        assert_eq!(creator("tensorbus-q0123456789abcdef-42-items"), Some(42));
        assert_eq!(creator("tensorbus-q0123456789abcdef-42-other"), None);
        assert_eq!(creator("tensorbus-q0123456789abcdef-items"), None, "old names carry no pid");
        assert_eq!(creator("tb-InitPair-p-77-0"), Some(77));
        assert_eq!(creator("tb-InitPair-p-77"), None);
        assert_eq!(creator("something-else-1-2"), None);
    }
}
