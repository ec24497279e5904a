//! The TCP data plane's receiving end: destination tensors published to peers on other hosts,
//! the listener that authenticates their connections and reads frames straight into those
//! tensors, and the main loop's bookkeeping of bytes received per epoch.

use super::*;

/// A destination tensor that peers on other hosts write into.
pub(super) struct Target {
    pub(super) loc: Loc,
    pub(super) nbytes: u64,
    /// Moves received bytes into device memory (a `Loc::Device` target).
    pub(super) dev: Option<Arc<dyn tensorbus_transport::exec::DeviceEngine>>,
    /// Keeps the mapping alive while the target is published.
    pub(super) _segment: Option<Arc<ShmSegment>>,
}

// SAFETY: a Target's Loc points into the segment it keeps alive (or names another process).
unsafe impl Send for Target {}

unsafe impl Sync for Target {}

/// What a data connection reports to the main loop.
pub(super) enum DataEvent {
    Received { epoch: u64, bytes: u64 },
    Failed { key: String, epoch: u64, message: String },
}

/// Accepts data connections from agents on other hosts; each must prove the job secret first.
pub(super) fn serve_data(
    listener: std::net::TcpListener,
    key: Secret,
    targets: Arc<std::sync::RwLock<HashMap<String, Target>>>,
    events: std::sync::mpsc::Sender<DataEvent>,
    ctx: zmq::Context,
    wake_ep: String,
    node: String,
) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let (key, targets, events, ctx, wake_ep, node) =
            (key.clone(), targets.clone(), events.clone(), ctx.clone(), wake_ep.clone(), node.clone());
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            if let Err(e) = tcp::handshake(&mut s, &key, true) {
                return tracing::warn!(node = %node, peer = %peer, "data connection refused: {e}");
            }
            let _ = s.set_read_timeout(None);
            let _ = s.set_nodelay(true);
            let Ok(wake) = ctx.socket(zmq::PUSH).and_then(|w| w.connect(&wake_ep).map(|_| w)) else { return };
            let mut buf = Vec::new();
            loop {
                let f = match tcp::read_header(&mut s) {
                    Ok(Some(f)) => f,
                    Ok(None) => return,
                    Err(e) => return tracing::warn!(node = %node, peer = %peer, "data connection closed: {e}"),
                };
                let ev = match receive(&mut s, &f, &targets, &mut buf) {
                    Ok(()) => DataEvent::Received { epoch: f.epoch, bytes: f.len },
                    Err(message) => {
                        tracing::warn!(node = %node, peer = %peer, "{message}");
                        let _ = events.send(DataEvent::Failed { key: f.key, epoch: f.epoch, message });
                        let _ = wake.send(&b""[..], 0);
                        return;
                    }
                };
                let _ = events.send(ev);
                let _ = wake.send(&b""[..], 0);
            }
        });
    }
}

/// Reads one frame's payload straight into the registered destination it names.
pub(super) fn receive(
    s: &mut std::net::TcpStream,
    f: &tcp::Frame,
    targets: &std::sync::RwLock<HashMap<String, Target>>,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    use std::io::Read;
    let targets = targets.read().unwrap();
    let t =
        targets.get(&f.key).ok_or_else(|| format!("data for an unregistered tensor {:?}", f.key.replace('\0', "/")))?;
    let at = Region { loc: t.loc, nbytes: t.nbytes }
        .at(f.offset, f.len)
        .map_err(|e| format!("data for tensor {:?}: {e}", f.key.replace('\0', "/")))?;
    let n = f.len as usize;
    match at {
        // SAFETY: bounds checked above; the destination worker waits in a receive.
        Loc::Local(p) => s.read_exact(unsafe { std::slice::from_raw_parts_mut(p, n) }).map_err(|e| e.to_string()),
        Loc::Remote { pid, addr } => {
            buf.resize(n, 0);
            s.read_exact(buf).map_err(|e| e.to_string())?;
            // SAFETY: buf holds n bytes.
            unsafe { cma::write(pid, addr, buf.as_ptr(), n) }.map_err(|e| e.to_string())
        }
        Loc::Device(p) => {
            // Staged through one pinned buffer (at most a bucket: one frame), then copied up.
            let dev = t.dev.as_ref().ok_or("a device target without a device engine")?;
            let st = dev.take_staging(n).map_err(|e| e.to_string())?;
            // SAFETY: the staging buffer holds at least n bytes and is ours until given back.
            let r = s
                .read_exact(unsafe { std::slice::from_raw_parts_mut(st.ptr, n) })
                .map_err(|e| e.to_string())
                .and_then(|_| dev.copy(p, st.ptr as u64, n as u64).map_err(|e| e.to_string()));
            dev.give_staging(st);
            r
        }
    }
}

impl Agent {
    /// Publishes this worker's tensors of `batch` as destinations for agents on other hosts.
    pub(super) fn publish_targets(&mut self, batch: &str) -> Result<(), String> {
        let reg = self.batches[batch].reg.clone();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut new = Vec::new();
        for (pair, d) in reg.pairs.iter().zip(&reg.tensors) {
            let k = index.entry(pair).or_default();
            let (loc, seg) = match &d.memory {
                Memory::CudaIpc { .. } | Memory::CudaFd { .. } => {
                    (self.gpus.locate(&d.memory, d.nbytes)?.expect("device"), None)
                }
                Memory::Shm { .. } | Memory::Fd { .. } => {
                    let (seg, offset) = map_memory(&mut self.segments, &d.memory)?.expect("mapped");
                    (super::shm_loc(&seg, offset, d.nbytes)?, Some(seg))
                }
                Memory::Cma { pid, addr } => (Loc::Remote { pid: *pid, addr: *addr }, None),
            };
            let dev = if matches!(loc, Loc::Device(_)) { self.gpus.engine() } else { None };
            new.push((format!("{batch}\0{pair}\0{k}"), Target { loc, nbytes: d.nbytes, dev, _segment: seg }));
            *k += 1;
        }
        self.targets.write().unwrap().extend(new);
        Ok(())
    }

    /// Bytes this rank receives per epoch of `batch` from senders on other hosts.
    pub(super) fn remote_bytes(&mut self, batch: &str) -> Result<u64, String> {
        if let Some(n) = self.batches[batch].remote_bytes {
            return Ok(n);
        }
        let reg = &self.batches[batch].reg;
        let mut total = 0;
        for pair in Self::batch_pairs(reg) {
            let p = &self.pairs[&pair];
            let theirs = directory::side(&self.dir, &pair, &p.side.remote_name)?;
            let mine = directory::side(&self.dir, &pair, &p.side.local_name)?;
            let src = theirs.values().next().ok_or("peer side vanished")?.2.layout().map_err(|e| e.to_string())?;
            let plan = PairPlan::new(src, p.layout.clone()).map_err(|e| format!("pair {pair}: {e}"))?;
            let metas = directory::pair_metas(&mine, &p.layout, p.side.world_size, batch, &pair)?;
            let bp = BatchPlan::build(&[&plan], &metas, reg.bucket_size, Scope::Rank(Side::Dst, p.side.rank))
                .map_err(|e| e.to_string())?;
            for b in bp.buckets() {
                if theirs.get(&(b.src_rank as usize)).is_some_and(|(_, i, _)| i.host != self.cfg.host_id) {
                    total += b.bytes;
                }
            }
        }
        self.batches.get_mut(batch).expect("present").remote_bytes = Some(total);
        Ok(total)
    }

    pub(super) fn data_event(&mut self, ev: DataEvent) {
        match ev {
            DataEvent::Received { epoch, bytes } => {
                *self.received.entry(epoch).or_default() += bytes;
                self.check_received(epoch);
            }
            DataEvent::Failed { key, epoch, message } => {
                let batch = key.split('\0').next().unwrap_or_default().to_string();
                self.report_error(&batch, epoch, "TransferError", message);
            }
        }
    }

    /// Completes a receive once every byte from other hosts has arrived.
    pub(super) fn check_received(&mut self, epoch: u64) {
        let Some((batch, seq, expected)) = self.awaiting.get(&epoch).cloned() else { return };
        let got = self.received.get(&epoch).copied().unwrap_or(0);
        if got >= expected {
            self.awaiting.remove(&epoch);
            self.received.remove(&epoch);
            self.emit(&batch, EventKind::Done, seq, Some(epoch), got, 0.0, 0);
        }
    }
}
