//! The LMDB files an agent owns: the bounded command queue (many producers, one consumer) and the
//! state store (pair and batch states, per-command results, the heartbeat).
//!
//! The files are in LMDB's released 0.9 format (`lmdb-rkv-sys` builds LMDB 0.9.24 from source;
//! `.cargo/config.toml` keeps it from linking a system liblmdb), so any stock LMDB binding —
//! py-lmdb, as the reference client uses — opens a live agent's queue and state store.

use lmdb::{Cursor, Database, DatabaseFlags, Environment, EnvironmentFlags, Transaction, WriteFlags};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::sem::Semaphore;
use crate::HostError;

const MAP_SIZE: usize = 1 << 30;

/// An open LMDB environment and its database, shared by every queue or store of one path in
/// this process (LMDB allows one open per path and process).
struct Handle {
    env: Environment,
    db: Database,
    ino: u64,
}

static OPEN: Mutex<Option<HashMap<PathBuf, Weak<Handle>>>> = Mutex::new(None);

fn open_env(path: &Path, create: bool) -> Result<Arc<Handle>, HostError> {
    if !create && !path.exists() {
        return Err(HostError::NoAgent(format!("{} does not exist (is the agent running?)", path.display())));
    }
    let ino = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0);
    let mut open = OPEN.lock().unwrap();
    let open = open.get_or_insert_with(HashMap::new);
    open.retain(|_, w| w.strong_count() > 0);
    if !create {
        if let Some(h) = open.get(path).and_then(Weak::upgrade) {
            if h.ino == ino(path) {
                return Ok(h);
            }
            return Err(HostError::NoAgent(format!(
                "{} was recreated (the agent restarted) while this process still holds a connection to the old one; close that client first",
                path.display()
            )));
        }
    }
    let lmdb = |e: lmdb::Error| HostError::Lmdb { path: path.to_path_buf(), message: e.to_string() };
    // NO_SYNC: the queue and state are for live processes; a crashed process leaves committed
    // transactions intact in the page cache, and nothing here must survive an OS crash, so an
    // fsync per command would only cost milliseconds. WRITE_MAP: commits write straight into
    // the shared mapping instead of through pwrite calls. Each path is opened once per process
    // (shared through OPEN), as LMDB requires.
    let env = Environment::new()
        .set_flags(
            EnvironmentFlags::NO_SUB_DIR
                | EnvironmentFlags::NO_SYNC
                | EnvironmentFlags::NO_META_SYNC
                | EnvironmentFlags::WRITE_MAP,
        )
        .set_map_size(MAP_SIZE)
        .set_max_dbs(1)
        .open_with_permissions(path, 0o600)
        .map_err(lmdb)?;
    let db = env.create_db(None, DatabaseFlags::empty()).map_err(lmdb)?;
    let h = Arc::new(Handle { env, db, ino: ino(path) });
    open.insert(path.to_path_buf(), Arc::downgrade(&h));
    Ok(h)
}

fn remove_env_files(path: &Path) {
    let _ = std::fs::remove_file(path);
    let mut lock = path.as_os_str().to_owned();
    lock.push("-lock");
    let _ = std::fs::remove_file(PathBuf::from(lock));
}

/// Semaphore names for a queue path and the agent that owns it: unique per path, valid as POSIX
/// names. The owner's pid lets [`crate::sem::remove_orphans`] find them once that agent is gone.
fn sem_names(path: &Path, owner: u32) -> (String, String) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (format!("/tensorbus-q{h:016x}-{owner}-items"), format!("/tensorbus-q{h:016x}-{owner}-free"))
}

/// The value of `key`, `None` when absent.
fn get<'t>(txn: &'t impl Transaction, db: Database, key: &[u8]) -> Result<Option<&'t [u8]>, lmdb::Error> {
    match txn.get(db, &key) {
        Ok(v) => Ok(Some(v)),
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `key`; an absent key is not an error.
fn del(txn: &mut lmdb::RwTransaction, db: Database, key: &[u8]) -> Result<(), lmdb::Error> {
    match txn.del(db, &key, None) {
        Ok(()) | Err(lmdb::Error::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

fn u64_at(db: Database, txn: &impl Transaction, key: &str) -> Result<u64, lmdb::Error> {
    Ok(get(txn, db, key.as_bytes())?.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0))
}

/// The command queue: a circular buffer of `capacity` slots in LMDB, with two counting semaphores
/// (`items` wakes the consumer, `free` bounds the producers). Each enqueue and dequeue is one LMDB
/// transaction, so a producer killed mid-enqueue leaves either a whole command or none.
pub struct CommandQueue {
    path: PathBuf,
    h: Arc<Handle>,
    items: Semaphore,
    free: Semaphore,
    capacity: u64,
}

impl CommandQueue {
    /// Creates the queue for a consumer (the agent), replacing stale files and semaphores.
    pub fn create(path: &Path, capacity: u64) -> Result<Self, HostError> {
        remove_env_files(path);
        let h = open_env(path, true)?;
        let lmdb = |e: lmdb::Error| HostError::Lmdb { path: path.to_path_buf(), message: e.to_string() };
        let mut w = h.env.begin_rw_txn().map_err(lmdb)?;
        w.put(h.db, &b"capacity", &capacity.to_le_bytes(), WriteFlags::empty()).map_err(lmdb)?;
        w.put(h.db, &b"head", &0u64.to_le_bytes(), WriteFlags::empty()).map_err(lmdb)?;
        w.put(h.db, &b"tail", &0u64.to_le_bytes(), WriteFlags::empty()).map_err(lmdb)?;
        let (items, free) = sem_names(path, std::process::id());
        // Producers find the semaphores by these keys.
        w.put(h.db, &b"sem:items", &items.as_bytes(), WriteFlags::empty()).map_err(lmdb)?;
        w.put(h.db, &b"sem:free", &free.as_bytes(), WriteFlags::empty()).map_err(lmdb)?;
        let items = Semaphore::recreate(&items, 0)?;
        let free = Semaphore::recreate(&free, capacity as u32)?;
        w.commit().map_err(lmdb)?;
        Ok(CommandQueue { path: path.to_path_buf(), h, items, free, capacity })
    }

    /// Opens an existing queue as a producer.
    pub fn open(path: &Path) -> Result<Self, HostError> {
        let h = open_env(path, false)?;
        let r =
            h.env.begin_ro_txn().map_err(|e| HostError::Lmdb { path: path.to_path_buf(), message: e.to_string() })?;
        let capacity = u64_at(h.db, &r, "capacity").unwrap_or(0);
        let name = |k: &str| -> Option<String> {
            get(&r, h.db, k.as_bytes()).ok().flatten().and_then(|v| String::from_utf8(v.to_vec()).ok())
        };
        let names = name("sem:items").zip(name("sem:free"));
        drop(r);
        let Some((items, free)) = names.filter(|_| capacity > 0) else {
            return Err(HostError::NoAgent(format!("{} is not an initialized command queue", path.display())));
        };
        let no_agent = |e| HostError::NoAgent(format!("command queue semaphores for {}: {e}", path.display()));
        let items = Semaphore::open(&items).map_err(no_agent)?;
        let free = Semaphore::open(&free).map_err(no_agent)?;
        Ok(CommandQueue { path: path.to_path_buf(), h, items, free, capacity })
    }

    fn lmdb(&self, e: lmdb::Error) -> HostError {
        HostError::Lmdb { path: self.path.clone(), message: e.to_string() }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Appends one command, waiting up to `timeout` for a free slot.
    pub fn enqueue(&self, bytes: &[u8], timeout: Duration) -> Result<(), HostError> {
        if !self.free.wait_timeout(timeout)? {
            return Err(HostError::QueueFull { capacity: self.capacity, waited: timeout });
        }
        let mut w = self.h.env.begin_rw_txn().map_err(|e| self.lmdb(e))?;
        let tail = u64_at(self.h.db, &w, "tail").map_err(|e| self.lmdb(e))?;
        let slot = format!("slot:{}", tail % self.capacity);
        w.put(self.h.db, &slot.as_bytes(), &bytes, WriteFlags::empty()).map_err(|e| self.lmdb(e))?;
        w.put(self.h.db, &b"tail", &(tail + 1).to_le_bytes(), WriteFlags::empty()).map_err(|e| self.lmdb(e))?;
        w.commit().map_err(|e| self.lmdb(e))?;
        self.items.post()
    }

    /// Takes the oldest command, waiting up to `timeout` for one. The semaphore only wakes the
    /// consumer; head and tail in LMDB are the truth, so a producer that died between its commit
    /// and its post loses nothing (its command is taken on the next wake-up).
    pub fn dequeue(&self, timeout: Duration) -> Result<Option<Vec<u8>>, HostError> {
        let woke = self.items.wait_timeout(timeout)?;
        let mut w = self.h.env.begin_rw_txn().map_err(|e| self.lmdb(e))?;
        let head = u64_at(self.h.db, &w, "head").map_err(|e| self.lmdb(e))?;
        let tail = u64_at(self.h.db, &w, "tail").map_err(|e| self.lmdb(e))?;
        if head >= tail {
            return Ok(None);
        }
        // When `woke` is false the item has no token (its producer died before posting): take it.
        let _ = woke;
        let slot = format!("slot:{}", head % self.capacity);
        let v = get(&w, self.h.db, slot.as_bytes()).map_err(|e| self.lmdb(e))?.map(|v| v.to_vec()).unwrap_or_default();
        del(&mut w, self.h.db, slot.as_bytes()).map_err(|e| self.lmdb(e))?;
        w.put(self.h.db, &b"head", &(head + 1).to_le_bytes(), WriteFlags::empty()).map_err(|e| self.lmdb(e))?;
        w.commit().map_err(|e| self.lmdb(e))?;
        self.free.post()?;
        Ok(Some(v))
    }

    /// Commands waiting.
    pub fn len(&self) -> Result<u64, HostError> {
        let r = self.h.env.begin_ro_txn().map_err(|e| self.lmdb(e))?;
        let head = u64_at(self.h.db, &r, "head").map_err(|e| self.lmdb(e))?;
        let tail = u64_at(self.h.db, &r, "tail").map_err(|e| self.lmdb(e))?;
        Ok(tail - head)
    }

    pub fn is_empty(&self) -> Result<bool, HostError> {
        Ok(self.len()? == 0)
    }

    /// Removes the queue's files and semaphores (the agent does this on orderly exit).
    pub fn remove(self) {
        Semaphore::unlink(self.items.name());
        Semaphore::unlink(self.free.name());
        let path = self.path.clone();
        drop(self);
        remove_env_files(&path);
    }
}

/// The state store: string keys to msgpack values.
pub struct StateStore {
    path: PathBuf,
    h: Arc<Handle>,
}

impl StateStore {
    /// Creates a fresh store (the agent), replacing stale files.
    pub fn create(path: &Path) -> Result<Self, HostError> {
        remove_env_files(path);
        Ok(StateStore { path: path.to_path_buf(), h: open_env(path, true)? })
    }

    /// Opens an existing store (a client).
    pub fn open(path: &Path) -> Result<Self, HostError> {
        Ok(StateStore { path: path.to_path_buf(), h: open_env(path, false)? })
    }

    fn lmdb(&self, e: lmdb::Error) -> HostError {
        HostError::Lmdb { path: self.path.clone(), message: e.to_string() }
    }

    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), HostError> {
        let mut w = self.h.env.begin_rw_txn().map_err(|e| self.lmdb(e))?;
        w.put(self.h.db, &key.as_bytes(), &value, WriteFlags::empty()).map_err(|e| self.lmdb(e))?;
        w.commit().map_err(|e| self.lmdb(e))
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        let r = self.h.env.begin_ro_txn().map_err(|e| self.lmdb(e))?;
        Ok(get(&r, self.h.db, key.as_bytes()).map_err(|e| self.lmdb(e))?.map(|v| v.to_vec()))
    }

    pub fn delete(&self, key: &str) -> Result<(), HostError> {
        let mut w = self.h.env.begin_rw_txn().map_err(|e| self.lmdb(e))?;
        del(&mut w, self.h.db, key.as_bytes()).map_err(|e| self.lmdb(e))?;
        w.commit().map_err(|e| self.lmdb(e))
    }

    /// Deletes every key starting with `prefix`.
    pub fn delete_prefix(&self, prefix: &str) -> Result<(), HostError> {
        let mut w = self.h.env.begin_rw_txn().map_err(|e| self.lmdb(e))?;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        {
            let mut c = w.open_ro_cursor(self.h.db).map_err(|e| self.lmdb(e))?;
            for kv in c.iter_from(prefix.as_bytes()) {
                let (k, _) = kv.map_err(|e| self.lmdb(e))?;
                if !k.starts_with(prefix.as_bytes()) {
                    break;
                }
                keys.push(k.to_vec());
            }
        }
        for k in keys {
            del(&mut w, self.h.db, &k).map_err(|e| self.lmdb(e))?;
        }
        w.commit().map_err(|e| self.lmdb(e))
    }

    /// Removes the store's files.
    pub fn remove(self) {
        let path = self.path.clone();
        drop(self);
        remove_env_files(&path);
    }
}
