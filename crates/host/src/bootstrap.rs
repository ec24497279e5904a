//! Bootstrap: which agent a worker talks to, and where its files are.

use std::path::PathBuf;

use crate::HostError;

/// The directory of this host's job: `TENSORBUS_JOB` (where `tensorbus up --dir DIR` writes its
/// files and job file), else `/tmp`.
pub fn job_dir() -> PathBuf {
    match std::env::var_os("TENSORBUS_JOB") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/tmp"),
    }
}

/// Default command queue path of agent `rank`: `{job_dir}/agent_rank{rank}_command.lmdb`.
pub fn default_command_queue_path(rank: usize) -> PathBuf {
    job_dir().join(format!("agent_rank{rank}_command.lmdb"))
}

/// Default state store path of agent `rank`: `{job_dir}/agent_rank{rank}_state.lmdb`.
pub fn default_state_path(rank: usize) -> PathBuf {
    job_dir().join(format!("agent_rank{rank}_state.lmdb"))
}

/// How a worker found its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapInfo {
    pub agent_rank: usize,
    /// `RANK` when set, else the agent rank.
    pub global_rank: usize,
    /// `AGENT_RANK_OFFSET` when the rank was computed from it (method `"offset"`), else `None`.
    pub rank_offset: Option<usize>,
    /// `TENSORBUS_DEVICE` when set; else the Python layer picks `cuda:{LOCAL_RANK}` where CUDA
    /// is available, and `cpu` otherwise.
    pub device: Option<String>,
    pub command_queue_path: PathBuf,
    pub state_path: PathBuf,
    /// As the reference names it: `"direct"` (from `AGENT_RANK`) or `"offset"` (`LOCAL_RANK +
    /// AGENT_RANK_OFFSET`).
    pub method: String,
}

/// Resolves the agent from an environment: `AGENT_RANK`, else `LOCAL_RANK + AGENT_RANK_OFFSET`.
/// Paths come from `naming(rank)` when given, else `TENSORBUS_COMMAND_QUEUE_PATH` /
/// `TENSORBUS_STATE_PATH`, else the defaults.
pub fn resolve(
    env: impl Fn(&str) -> Option<String>,
    naming: Option<&dyn Fn(usize) -> (PathBuf, PathBuf)>,
) -> Result<BootstrapInfo, HostError> {
    let num = |k: &str| -> Result<Option<usize>, HostError> {
        match env(k) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| HostError::Bootstrap(format!("{k}={v:?} is not a non-negative integer"))),
        }
    };
    let offset = num("AGENT_RANK_OFFSET")?;
    let (agent_rank, method, rank_offset) = match (num("AGENT_RANK")?, num("LOCAL_RANK")?) {
        (Some(r), _) => (r, "direct", None),
        (None, Some(l)) => {
            let o = offset.unwrap_or(0);
            let r = l
                .checked_add(o)
                .ok_or_else(|| HostError::Bootstrap(format!("LOCAL_RANK {l} + AGENT_RANK_OFFSET {o} is not a rank")))?;
            (r, "offset", Some(o))
        }
        (None, None) => {
            return Err(HostError::Bootstrap(
                "set AGENT_RANK, or LOCAL_RANK (plus AGENT_RANK_OFFSET), to say which agent to use".into(),
            ))
        }
    };
    let (command_queue_path, state_path) = match naming {
        Some(f) => f(agent_rank),
        None => (
            env("TENSORBUS_COMMAND_QUEUE_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| default_command_queue_path(agent_rank)),
            env("TENSORBUS_STATE_PATH").map(PathBuf::from).unwrap_or_else(|| default_state_path(agent_rank)),
        ),
    };
    Ok(BootstrapInfo {
        agent_rank,
        global_rank: num("RANK")?.unwrap_or(agent_rank),
        rank_offset,
        device: env("TENSORBUS_DEVICE"),
        command_queue_path,
        state_path,
        method: method.into(),
    })
}

/// Lets process `agent_pid` (and only it) read and write this process's memory with cross-memory
/// attach under Yama's ptrace scope 1. A kernel without Yama (EINVAL) is not an error.
pub fn setup_ptrace(agent_pid: u32) -> Result<(), HostError> {
    // SAFETY: prctl with PR_SET_PTRACER takes a pid argument and has no memory effects.
    let rc = unsafe { libc::prctl(libc::PR_SET_PTRACER, agent_pid as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(HostError::Bootstrap(format!("prctl(PR_SET_PTRACER, {agent_pid}): {e}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn agent_rank_wins_over_local_rank() {
        let i = resolve(env(&[("AGENT_RANK", "3"), ("LOCAL_RANK", "1"), ("RANK", "9")]), None).unwrap();
        assert_eq!((i.agent_rank, i.global_rank, i.method.as_str(), i.rank_offset), (3, 9, "direct", None));
        assert_eq!(i.command_queue_path, PathBuf::from("/tmp/agent_rank3_command.lmdb"));
        assert_eq!(i.state_path, PathBuf::from("/tmp/agent_rank3_state.lmdb"));
    }

    #[test]
    fn local_rank_plus_offset() {
        let i = resolve(env(&[("LOCAL_RANK", "1"), ("AGENT_RANK_OFFSET", "4")]), None).unwrap();
        assert_eq!((i.agent_rank, i.rank_offset, i.global_rank, i.method.as_str()), (5, Some(4), 5, "offset"));
        let naming = |r: usize| (PathBuf::from(format!("/x/q{r}")), PathBuf::from(format!("/x/s{r}")));
        let i = resolve(env(&[("LOCAL_RANK", "2")]), Some(&naming)).unwrap();
        assert_eq!(i.command_queue_path, PathBuf::from("/x/q2"));
    }

    #[test]
    fn missing_or_bad_rank_is_a_clear_error() {
        let e = resolve(env(&[]), None).unwrap_err();
        assert!(e.to_string().contains("AGENT_RANK"), "{e}");
        let e = resolve(env(&[("AGENT_RANK", "-1")]), None).unwrap_err();
        assert!(e.to_string().contains("AGENT_RANK=\"-1\""), "{e}");
    }

    #[test]
    fn setup_ptrace_accepts_own_parent() {
        setup_ptrace(std::os::unix::process::parent_id()).unwrap();
    }
}
