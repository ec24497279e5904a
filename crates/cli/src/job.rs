//! The job file: what `tensorbus up --dir DIR` tells the tools and workers of its host, so that
//! `status`, `ctl` and workers find the job without copying endpoints or the secret by hand.
//! `DIR/tensorbus-job.json`, mode 0600 in a directory `up` creates private (0700).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE: &str = "tensorbus-job.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFile {
    pub version: u32,
    /// The command node's inbox and outbox.
    pub inbox: String,
    pub outbox: String,
    /// The job secret (`TENSORBUS_SECRET`), when the job has one.
    pub secret: Option<String>,
    pub agents: usize,
    /// Where the agents' files are (`agent_rank{N}_command.lmdb`, `..._state.lmdb`).
    pub dir: PathBuf,
    /// The `tensorbus up` process.
    pub pid: u32,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Creates `dir` (and its parents) if missing; a directory created here is private to the user.
pub fn ensure_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating the job directory {}: {e}", dir.display()))
}

/// Writes the job file (0600), replacing an older one atomically.
pub fn write(j: &JobFile) -> Result<PathBuf, String> {
    let dest = path(&j.dir);
    let tmp = j.dir.join(format!(".{FILE}.{}", std::process::id()));
    let err = |e: std::io::Error| format!("writing the job file {}: {e}", dest.display());
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(err)?;
    f.write_all(serde_json::to_string_pretty(j).expect("encodes").as_bytes()).map_err(err)?;
    std::fs::rename(&tmp, &dest).map_err(err)?;
    Ok(dest)
}

/// The job file in `dir`: `Ok(None)` when there is none.
pub fn read(dir: &Path) -> Result<Option<JobFile>, String> {
    let p = path(dir);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            serde_json::from_str(&s).map(Some).map_err(|e| format!("the job file {} is not valid: {e}", p.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading the job file {}: {e}", p.display())),
    }
}

/// How a tool reaches the job's command node.
#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// The command node's inbox (default: from the job file, else tcp://127.0.0.1:5555).
    #[arg(long, env = "TENSORBUS_COMMAND_INBOX")]
    pub command_inbox: Option<String>,
    /// The job's directory on this host, where `tensorbus up --dir DIR` wrote its job file
    /// (endpoints and secret).
    #[arg(long, env = "TENSORBUS_JOB", default_value = "/tmp")]
    pub job: PathBuf,
}

/// Where a tool connects, and with which secret.
#[derive(Debug, Clone)]
pub struct Target {
    pub inbox: String,
    pub secret: Option<Vec<u8>>,
    /// Where the answer came from, for messages.
    pub source: String,
}

impl JobArgs {
    pub fn resolve(&self) -> Result<Target, String> {
        let env_secret = tensorbus_command::secure::secret_from_env();
        if let Some(inbox) = &self.command_inbox {
            return Ok(Target { inbox: inbox.clone(), secret: env_secret, source: "--command-inbox".into() });
        }
        if !self.job.is_dir() {
            return Err(format!("the job directory {} does not exist", self.job.display()));
        }
        match read(&self.job)? {
            Some(j) => Ok(Target {
                inbox: j.inbox,
                secret: env_secret.or(j.secret.map(String::into_bytes)),
                source: path(&self.job).display().to_string(),
            }),
            None => Ok(Target {
                inbox: "tcp://127.0.0.1:5555".into(),
                secret: env_secret,
                source: format!("the default (no job file {})", path(&self.job).display()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_job_file_is_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("tb-job-test-{}", std::process::id())).join("a/b");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap());
        ensure_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(read(&dir).unwrap(), None);
        let j = JobFile {
            version: 1,
            inbox: "tcp://127.0.0.1:7000".into(),
            outbox: "tcp://127.0.0.1:7001".into(),
            secret: Some("abc".into()),
            agents: 2,
            dir: dir.clone(),
            pid: 42,
        };
        let p = write(&j).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&dir).unwrap(), Some(j));
        let t = JobArgs { command_inbox: None, job: dir.clone() }.resolve().unwrap();
        assert_eq!(t.inbox, "tcp://127.0.0.1:7000");
        let e = JobArgs { command_inbox: None, job: dir.join("nope") }.resolve().unwrap_err();
        assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
        std::fs::write(path(&dir), "{").unwrap();
        assert!(read(&dir).unwrap_err().contains("not valid"));
        let _ = std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap());
    }
}
