//! `tensorbus._native`: the Rust client exposed to Python. The Python package (`python/tensorbus`)
//! wraps it with the reference API; this module only converts arguments and errors, and releases
//! the GIL while it waits.

use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use tensorbus_host::client::{self, TensorBusClient};
use tensorbus_host::HostError;
use tensorbus_planner::{parse_placements, Placement};
use tensorbus_protocol::host::{ErrorKind, TransferType};
use tensorbus_protocol::payload::{Memory, TensorDesc, PAYLOAD_VERSION};

fn secs(t: f64) -> PyResult<Duration> {
    if !t.is_finite() || t < 0.0 {
        return Err(PyValueError::new_err(format!("timeout must be a non-negative number of seconds, got {t}")));
    }
    Ok(Duration::from_secs_f64(t))
}

/// Converts an error into the Python exception its kind calls for.
fn to_py(py: Python<'_>, e: HostError) -> PyErr {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::ValueError => PyValueError::new_err(msg),
        ErrorKind::TimeoutError => PyTimeoutError::new_err(msg),
        ErrorKind::ConnectionError => PyConnectionError::new_err(msg),
        ErrorKind::TransferError => {
            let origin = match &e {
                HostError::Remote(r) => r.origin.clone(),
                _ => String::new(),
            };
            match py.import("tensorbus.errors").and_then(|m| m.getattr("TransferError")) {
                Ok(cls) => match cls.call1((msg.clone(), origin)) {
                    Ok(inst) => PyErr::from_value(inst),
                    Err(err) => err,
                },
                Err(_) => PyRuntimeError::new_err(msg),
            }
        }
    }
}

/// A command in flight; waits release the GIL.
#[pyclass(module = "tensorbus._native")]
struct Pending {
    inner: Mutex<Option<client::Pending>>,
    name: String,
}

impl Pending {
    fn new(p: client::Pending) -> Self {
        let name = p.name().to_string();
        Pending { inner: Mutex::new(Some(p)), name }
    }
}

#[pymethods]
impl Pending {
    /// Waits for the command; `None` waits without limit. Raises the command's error, or
    /// TimeoutError.
    #[pyo3(signature = (timeout=None))]
    fn acquire(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<bool>> {
        let t = match timeout {
            Some(t) => secs(t)?,
            None => Duration::from_secs(365 * 24 * 3600),
        };
        let r = py.detach(|| self.inner.lock().unwrap().as_mut().map(|p| p.wait(t)));
        match r {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(to_py(py, e)),
            None => Err(PyValueError::new_err("the semaphore was closed")),
        }
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Releases the semaphore (the command itself is not cancelled).
    fn close(&self) {
        self.inner.lock().unwrap().take();
    }

    /// Posts the semaphore, as `posix_ipc.Semaphore.release`: the next `acquire` of another
    /// holder of the name returns at once. This handle's command result is unchanged.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        match self.inner.lock().unwrap().as_mut() {
            Some(p) => p.release().map_err(|e| to_py(py, e)),
            None => Err(PyValueError::new_err("the semaphore was closed")),
        }
    }

    /// The semaphore's current count, as `posix_ipc.Semaphore.value`.
    #[getter]
    fn value(&self) -> PyResult<i32> {
        match self.inner.lock().unwrap().as_ref() {
            Some(p) => Ok(p.value()),
            None => Err(PyValueError::new_err("the semaphore was closed")),
        }
    }

    /// Removes the semaphore's name, as `posix_ipc.Semaphore.unlink`.
    fn unlink(&self) {
        if let Some(p) = self.inner.lock().unwrap().as_mut() {
            p.unlink();
        }
    }
}

/// `(pair, dtype, shape, strides, address, nbytes, name, device, (fd, size, offset) of shared
/// memory or None)`, as `tensorbus.TensorBusClient.register_tensors` describes a tensor.
type RegisteredTensor = (String, String, Vec<u64>, Vec<u64>, u64, u64, Option<String>, String, Option<(i32, u64, u64)>);

#[pyclass(module = "tensorbus._native")]
struct Client {
    inner: TensorBusClient,
}

fn transfer_type(s: &str) -> PyResult<TransferType> {
    match s {
        "send" => Ok(TransferType::Send),
        "recv" => Ok(TransferType::Recv),
        _ => Err(PyValueError::new_err(format!("transfer_type must be \"send\" or \"recv\", got {s:?}"))),
    }
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (agent_rank, command_queue_path=None, state_path=None, connection_timeout=30.0))]
    fn new(
        py: Python<'_>,
        agent_rank: usize,
        command_queue_path: Option<String>,
        state_path: Option<String>,
        connection_timeout: f64,
    ) -> PyResult<Self> {
        let t = secs(connection_timeout)?;
        let q = command_queue_path.map(std::path::PathBuf::from);
        let s = state_path.map(std::path::PathBuf::from);
        py.detach(|| TensorBusClient::new(agent_rank, q.as_deref(), s.as_deref(), t))
            .map(|inner| Client { inner })
            .map_err(|e| to_py(py, e))
    }

    fn agent_pid(&self, py: Python<'_>) -> PyResult<u32> {
        self.inner.agent_pid().map_err(|e| to_py(py, e))
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (pair_name, local_name, remote_name, expected_world_size, mesh_shape, mesh_rank, placements, blocking, timeout))]
    fn init_pair(
        &self,
        py: Python<'_>,
        pair_name: &str,
        local_name: &str,
        remote_name: &str,
        expected_world_size: usize,
        mesh_shape: Option<Vec<usize>>,
        mesh_rank: Option<usize>,
        placements: Option<Vec<String>>,
        blocking: bool,
        timeout: f64,
    ) -> PyResult<Pending> {
        let t = secs(timeout)?;
        let mesh = match (mesh_shape, mesh_rank) {
            (Some(s), Some(r)) => Some((s, r)),
            (None, None) => None,
            _ => return Err(PyValueError::new_err("mesh_shape and mesh_rank go together")),
        };
        let pl: Option<Vec<Placement>> = match placements {
            Some(p) => Some(parse_placements(&p.join(",")).map_err(|e| PyValueError::new_err(e.to_string()))?),
            None => None,
        };
        py.detach(|| {
            self.inner.init_pair(
                pair_name,
                local_name,
                remote_name,
                expected_world_size,
                mesh,
                pl.as_deref(),
                blocking,
                t,
            )
        })
        .map(Pending::new)
        .map_err(|e| to_py(py, e))
    }

    /// `tensors`: `(pair_name, dtype, shape, strides_in_elements, address, nbytes, name, device)`
    /// of local shards in this process's memory; `device` is `cpu`, or `cuda[:N]` for GPU memory
    /// (shared with the agent by CUDA IPC handle or, for virtual-memory allocations, by fd).
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (batch_id, tensors, bucket_size, timeout))]
    fn register_tensors(
        &self,
        py: Python<'_>,
        batch_id: &str,
        tensors: Vec<RegisteredTensor>,
        bucket_size: Option<u64>,
        timeout: f64,
    ) -> PyResult<()> {
        let t = secs(timeout)?;
        let pid = std::process::id();
        let descs: Vec<(TensorDesc, String)> = tensors
            .into_iter()
            .map(|(pair, dtype, shape, strides, addr, nbytes, name, device, fd)| {
                let (memory, device) = if device.starts_with("cuda") {
                    client::cuda_memory(addr, nbytes).map_err(|e| PyValueError::new_err(e.to_string()))?
                } else if let Some((fd, size, offset)) = fd {
                    (Memory::Fd { pid, fd, size, offset }, "cpu".into())
                } else {
                    (Memory::Cma { pid, addr }, "cpu".into())
                };
                Ok((
                    TensorDesc {
                        version: PAYLOAD_VERSION,
                        name,
                        dtype,
                        shape,
                        strides,
                        device,
                        memory,
                        nbytes,
                        pid: Some(pid),
                        session: None,
                    },
                    pair,
                ))
            })
            .collect::<PyResult<_>>()?;
        let refs: Vec<(TensorDesc, &str)> = descs.iter().map(|(d, p)| (d.clone(), p.as_str())).collect();
        py.detach(|| self.inner.register_tensors(batch_id, &refs, bucket_size, t)).map(|_| ()).map_err(|e| to_py(py, e))
    }

    fn transfer(
        &self,
        py: Python<'_>,
        batch_id: &str,
        transfer_type_: &str,
        blocking: bool,
        timeout: f64,
    ) -> PyResult<Pending> {
        let (tt, t) = (transfer_type(transfer_type_)?, secs(timeout)?);
        py.detach(|| self.inner.transfer(batch_id, tt, blocking, t)).map(Pending::new).map_err(|e| to_py(py, e))
    }

    fn query_transfer_signal(&self, py: Python<'_>, batch_id: &str, timeout: f64) -> PyResult<bool> {
        let t = secs(timeout)?;
        py.detach(|| self.inner.query_transfer_signal(batch_id, t)).map_err(|e| to_py(py, e))
    }

    fn wait_epoch(&self, py: Python<'_>, batch_id: &str, n: u64, timeout: f64) -> PyResult<()> {
        let t = secs(timeout)?;
        py.detach(|| self.inner.wait_epoch(batch_id, n, t)).map_err(|e| to_py(py, e))
    }

    fn cleanup_batch(&self, py: Python<'_>, batch_id: &str, timeout: f64) -> PyResult<()> {
        let t = secs(timeout)?;
        py.detach(|| self.inner.cleanup_batch(batch_id, t)).map_err(|e| to_py(py, e))
    }
}

#[pyfunction]
fn generate_semaphore_name(command_type: &str, context_id: &str) -> String {
    client::generate_semaphore_name(command_type, context_id)
}

#[pyfunction]
fn setup_ptrace(agent_pid: u32) -> PyResult<()> {
    tensorbus_host::bootstrap::setup_ptrace(agent_pid).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `(agent_rank, global_rank, rank_offset, device, command_queue_path, state_path, method)` from
/// the process environment.
type BootstrapTuple = (usize, usize, Option<usize>, Option<String>, String, String, String);

#[pyfunction]
fn resolve_bootstrap() -> PyResult<BootstrapTuple> {
    let i = tensorbus_host::bootstrap::resolve(|k| std::env::var(k).ok(), None)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((
        i.agent_rank,
        i.global_rank,
        i.rank_offset,
        i.device,
        i.command_queue_path.display().to_string(),
        i.state_path.display().to_string(),
        i.method,
    ))
}

/// The pid of the live agent whose state store is at `state_path` (for `setup_ptrace()`).
#[pyfunction]
fn agent_pid_at(py: Python<'_>, state_path: &str) -> PyResult<u32> {
    tensorbus_host::client::agent_pid_at(std::path::Path::new(state_path)).map_err(|e| to_py(py, e))
}

/// Decodes host-command bytes with the agent's own decoder and encodes them again (for tests of
/// `tensorbus.commands`' byte identity).
#[pyfunction]
fn roundtrip_command(py: Python<'_>, data: &[u8]) -> PyResult<pyo3::Py<pyo3::types::PyBytes>> {
    let c = tensorbus_protocol::host::Command::decode(data).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(pyo3::types::PyBytes::new(py, &c.encode()).unbind())
}

/// Runs the `tensorbus` command-line tool on `argv` (program name first) in this process, without
/// the GIL, and returns its exit status: the wheel's `tensorbus` command.
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| tensorbus_cli::main(argv.into_iter().map(Into::into).collect()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Pending>()?;
    m.add_function(wrap_pyfunction!(generate_semaphore_name, m)?)?;
    m.add_function(wrap_pyfunction!(setup_ptrace, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_bootstrap, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add_function(wrap_pyfunction!(agent_pid_at, m)?)?;
    m.add_function(wrap_pyfunction!(roundtrip_command, m)?)?;
    Ok(())
}
