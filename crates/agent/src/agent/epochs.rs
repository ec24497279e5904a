//! Epochs: control messages from the command node, resolving a batch's share of the plan into
//! executable operations (memory, TCP links, GPU), the copy thread that runs them, and what
//! happens when an epoch finishes, fails or ends everywhere.

use super::*;

/// An epoch's copies, for the copy thread.
pub(super) struct CopyJob {
    pub(super) batch: String,
    pub(super) epoch: u64,
    pub(super) plan: Arc<ExecPlan>,
    /// Keeps every mapping the plan points into alive while it runs.
    pub(super) segments: Vec<Arc<ShmSegment>>,
}

/// The copy thread: runs epochs one after another, reports each through `done` and wakes the
/// main loop through the in-process socket `wake_ep`.
pub(super) fn copier(
    ctx: zmq::Context,
    wake_ep: String,
    threads: usize,
    checksum: bool,
    jobs: std::sync::mpsc::Receiver<CopyJob>,
    done: std::sync::mpsc::Sender<CopyDone>,
) {
    let wake = match ctx.socket(zmq::PUSH).and_then(|w| w.connect(&wake_ep).map(|_| w)) {
        Ok(w) => w,
        Err(e) => return tracing::error!("copy thread: {e}"),
    };
    for job in jobs {
        let t0 = Instant::now();
        // SAFETY: the plan's local pointers are into `job.segments`, alive for the call;
        // destinations are written only while their workers wait in a receive of this epoch.
        let result = unsafe { exec::execute(&job.plan, threads, job.epoch, checksum) }.map_err(|e| e.to_string());
        drop(job.segments);
        let _ = done.send(CopyDone { batch: job.batch, epoch: job.epoch, result, seconds: t0.elapsed().as_secs_f64() });
        let _ = wake.send(&b""[..], 0);
    }
}

/// A copy thread's report.
pub(super) struct CopyDone {
    pub(super) batch: String,
    pub(super) epoch: u64,
    pub(super) result: Result<(u64, u64), String>,
    pub(super) seconds: f64,
}

impl Agent {
    pub(super) fn handle_control(&mut self, m: Message) {
        match m.body {
            Body::Announce(dir) => {
                let me = self.identify_value();
                self.joined =
                    dir.nodes.get(&self.cfg.node_id).is_some_and(|v| v.pairs == me.pairs && v.batches == me.batches);
                if self.joined {
                    self.unjoined_since = Instant::now();
                }
                // A peer that re-registered a batch (e.g. restarted) has new memory: rebuild plans.
                for (id, b) in self.batches.iter_mut() {
                    let holders = |d: &AnnounceValue| -> Vec<(String, Option<BatchReg>)> {
                        d.nodes
                            .iter()
                            .map(|(n, v)| (n.clone(), v.batches.get(id).cloned()))
                            .filter(|(_, r)| r.is_some())
                            .collect()
                    };
                    if b.exec.is_some() && holders(&self.dir) != holders(&dir) {
                        b.exec = None;
                    }
                }
                self.dir = dir;
                self.check_pairs();
                self.check_batches();
            }
            Body::Ping(()) => {
                // A (new) command node asks who we are: our subscription must be confirmed again
                // by a publication of its own.
                self.subscribed = false;
                let _ = self.send_identify();
            }
            Body::Process(p) => {
                let Epoch::Root(epoch) = p.epoch else { return };
                if !self.batches.contains_key(&p.input.batch_id) {
                    return;
                }
                self.epochs.insert(epoch, (p.input.batch_id.clone(), p.input.seq));
                if let Some(side) = &p.input.from {
                    // A controller's epoch: run it without the worker.
                    let b = self.batches.get_mut(&p.input.batch_id).expect("checked");
                    let mine = b.reg.pairs.first().and_then(|p| self.pairs.get(p)).map(|p| p.side.local_name.clone());
                    let dir =
                        if mine.as_deref() == Some(side.as_str()) { TransferType::Send } else { TransferType::Recv };
                    b.pending.push_front(PendingTransfer { seq: p.input.seq, dir, sem: None, epoch: None });
                }
                self.process(epoch, &p.input.batch_id);
            }
            Body::Deinit(()) => self.deinit(),
            Body::Init(()) => {
                if self.status == NodeStatus::Closed {
                    self.status = NodeStatus::Waiting;
                    tracing::info!(node = %self.cfg.node_id, "init: rejoining");
                }
                for b in self.batches.values_mut() {
                    b.exec = None;
                }
                let _ = self.send_identify();
            }
            Body::EpochEnded(Epoch::Root(epoch)) => self.epoch_ended(epoch),
            Body::Error(e) => self.remote_error(e),
            _ => {}
        }
    }

    pub(super) fn process(&mut self, epoch: u64, batch: &str) {
        let Some(b) = self.batches.get_mut(batch) else { return };
        let Some(p) = b.pending.iter_mut().find(|p| p.epoch.is_none()) else { return };
        p.epoch = Some(epoch);
        let (dir, seq) = (p.dir, p.seq);
        // Every rank of both sides must still hold the batch (a peer's worker may have exited).
        match self.batch_complete(batch) {
            Ok(true) => {}
            Ok(false) => {
                self.report_error(
                    batch,
                    epoch,
                    "ConnectionError",
                    format!("batch {batch:?} lost a rank: a peer released it"),
                );
                return;
            }
            Err(m) => {
                self.report_error(batch, epoch, "ValueError", m);
                return;
            }
        }
        if dir == TransferType::Recv {
            // Same-host senders write into our worker's memory themselves; bytes from other
            // hosts arrive over TCP, and the receive is done when all of them are in.
            let expected = match self.remote_bytes(batch) {
                Ok(n) => n,
                Err(m) => return self.report_error(batch, epoch, "ValueError", m),
            };
            if expected == 0 {
                self.emit(batch, EventKind::Done, seq, Some(epoch), 0, 0.0, 0);
            } else {
                self.awaiting.insert(epoch, (batch.to_string(), seq, expected));
                self.check_received(epoch);
            }
            return;
        }
        let plan = match self.batches[batch].exec.clone() {
            Some(p) => Ok(p),
            None => self.build_exec(batch).map(Arc::new),
        };
        let plan = match plan {
            Ok(p) => p,
            Err(msg) => {
                self.report_error(batch, epoch, "ValueError", msg);
                return;
            }
        };
        let b = self.batches.get_mut(batch).expect("present");
        b.exec = Some(plan.clone());
        b.copying = true;
        self.status = NodeStatus::Running;
        let segments: Vec<Arc<ShmSegment>> = self.segments.values().cloned().collect();
        let job = CopyJob { batch: batch.to_string(), epoch, plan, segments };
        if self.copy_jobs.send(job).is_err() {
            self.report_error(batch, epoch, "TransferError", "the agent's copy thread is gone".into());
        }
    }

    /// Resolves this rank's share of the batch (as sender) into executable operations.
    pub(super) fn build_exec(&mut self, batch: &str) -> Result<ExecPlan, String> {
        let reg = self.batches[batch].reg.clone();
        let bucket_size = reg.bucket_size.unwrap_or(tensorbus_planner::DEFAULT_BUCKET_SIZE);
        let mut out = ExecPlan { buckets: Vec::new(), bucket_size, links: Vec::new(), device: None };
        let dir = self.dir.clone();
        let segments = &mut self.segments;
        let gpus = &mut self.gpus;
        let key = self.cfg.secret.as_deref().map_or_else(Secret::none, Secret::new);
        // TCP streams per peer node on another host (opened once per plan, i.e. per batch).
        let mut streams: HashMap<String, Vec<usize>> = HashMap::new();
        let mut bucket_no = 0usize;
        for pair in Self::batch_pairs(&reg) {
            let p = &self.pairs[&pair];
            let (mine, theirs) =
                (directory::side(&dir, &pair, &p.side.local_name)?, directory::side(&dir, &pair, &p.side.remote_name)?);
            let their_layout =
                theirs.values().next().ok_or("peer side vanished")?.2.layout().map_err(|e| e.to_string())?;
            let plan = PairPlan::new(p.layout.clone(), their_layout).map_err(|e| format!("pair {pair}: {e}"))?;
            let metas = directory::pair_metas(&mine, &p.layout, p.side.world_size, batch, &pair)?;
            let bp = BatchPlan::build(&[&plan], &metas, reg.bucket_size, Scope::Rank(Side::Src, p.side.rank))
                .map_err(|e| e.to_string())?;
            let reduce_op = plan.src().partial_op();
            // Resolve every (rank, tensor) location once.
            // With its byte size: every run is checked to lie inside its tensor before it is queued.
            let mut locs: HashMap<(bool, u32, u32), Region> = HashMap::new();
            let mut resolve = |src_side: bool, rank: u32, k: u32| -> Result<Region, String> {
                if let Some(l) = locs.get(&(src_side, rank, k)) {
                    return Ok(*l);
                }
                let side = if src_side { &mine } else { &theirs };
                let (id, ident, _) = side.get(&(rank as usize)).ok_or_else(|| format!("rank {rank} vanished"))?;
                let d = directory::tensors_on(ident, batch, &pair)
                    .and_then(|ts| ts.get(k as usize).cloned().cloned())
                    .ok_or_else(|| format!("{id} no longer holds batch {batch}"))?;
                let l = match &d.memory {
                    Memory::CudaIpc { .. } | Memory::CudaFd { .. } => {
                        gpus.locate(&d.memory, d.nbytes).map_err(|e| format!("{id}: tensor {k}: {e}"))?.expect("device")
                    }
                    Memory::Shm { .. } | Memory::Fd { .. } => {
                        let (seg, offset) = map_memory(segments, &d.memory)
                            .map_err(|e| format!("{id}: tensor {k}: {e}"))?
                            .expect("mapped");
                        super::shm_loc(&seg, offset, d.nbytes).map_err(|e| format!("{id}: tensor {k}: {e}"))?
                    }
                    Memory::Cma { pid, addr } => Loc::Remote { pid: *pid, addr: *addr },
                };
                let r = Region { loc: l, nbytes: d.nbytes };
                locs.insert((src_side, rank, k), r);
                Ok(r)
            };
            let at = |what: &str, r: &Region, offset: u64, len: u64| {
                r.at(offset, len).map_err(|e| format!("batch {batch}: the plan's {what} run: {e}"))
            };
            for bucket in bp.buckets() {
                let mut ops = Vec::new();
                let (dst_id, dst_ident, _) = theirs
                    .get(&(bucket.dst_rank as usize))
                    .ok_or_else(|| format!("rank {} vanished", bucket.dst_rank))?;
                let link = if dst_ident.host != self.cfg.host_id {
                    let links = match streams.get(*dst_id) {
                        Some(l) => l.clone(),
                        None => {
                            let mut l = Vec::new();
                            for _ in 0..self.cfg.data_streams.max(1) {
                                let mut s = std::net::TcpStream::connect(&dst_ident.data_addr)
                                    .map_err(|e| format!("connecting to {dst_id} at {}: {e}", dst_ident.data_addr))?;
                                let _ = s.set_nodelay(true);
                                tcp::handshake(&mut s, &key, false).map_err(|e| format!("{dst_id}: {e}"))?;
                                out.links.push(std::sync::Mutex::new(s));
                                l.push(out.links.len() - 1);
                            }
                            streams.insert(dst_id.to_string(), l.clone());
                            l
                        }
                    };
                    bucket_no += 1;
                    Some(links[bucket_no % links.len()])
                } else {
                    None
                };
                for ch in bp.chunks(bucket) {
                    let contributors = plan.contributors(ch.src_rank as usize);
                    if let Some(link) = link {
                        let key: std::sync::Arc<str> = format!("{batch}\0{pair}\0{}", ch.tensor).into();
                        if let (Some(op), true) = (reduce_op, contributors.len() > 1) {
                            // Reduce here, from contributors on this host, then send the result.
                            let dtype = bp.tensors[ch.tensor as usize].meta.dtype;
                            if !reduce::supported(dtype) {
                                return Err(format!("Partial reduction of {dtype} is not supported"));
                            }
                            for &r in &contributors {
                                if mine.get(&(r as usize)).is_some_and(|(_, i, _)| i.host != self.cfg.host_id) {
                                    return Err(format!(
                                        "pair {pair}: Partial contributors on other hosts than their reducer are not supported yet"
                                    ));
                                }
                            }
                            let srcs: Vec<Region> =
                                contributors.iter().map(|&r| resolve(true, r, ch.tensor)).collect::<Result<_, _>>()?;
                            for (so, doff, len) in ch.runs() {
                                ops.push(Op::ReduceSend {
                                    link,
                                    key: key.clone(),
                                    offset: doff,
                                    srcs: srcs.iter().map(|s| at("source", s, so, len)).collect::<Result<_, _>>()?,
                                    len,
                                    dtype,
                                    op,
                                });
                            }
                            continue;
                        }
                        let src = resolve(true, ch.src_rank, ch.tensor)?;
                        for (so, doff, len) in ch.runs() {
                            ops.push(Op::Send {
                                link,
                                key: key.clone(),
                                offset: doff,
                                src: at("source", &src, so, len)?,
                                len,
                            });
                        }
                        continue;
                    }
                    let dst = resolve(false, ch.dst_rank, ch.tensor)?;
                    let dtype = bp.tensors[ch.tensor as usize].meta.dtype;
                    let srcs: Vec<Region> =
                        contributors.iter().map(|&r| resolve(true, r, ch.tensor)).collect::<Result<_, _>>()?;
                    for (so, doff, len) in ch.runs() {
                        let to = at("destination", &dst, doff, len)?;
                        match (reduce_op, srcs.len()) {
                            (Some(op), n) if n > 1 => {
                                if !reduce::supported(dtype) {
                                    return Err(format!("Partial reduction of {dtype} is not supported"));
                                }
                                ops.push(Op::Reduce {
                                    srcs: srcs.iter().map(|s| at("source", s, so, len)).collect::<Result<_, _>>()?,
                                    dst: to,
                                    len,
                                    dtype,
                                    op,
                                })
                            }
                            _ => ops.push(Op::Copy { src: at("source", &srcs[0], so, len)?, dst: to, len }),
                        }
                    }
                }
                out.buckets.push(ops);
            }
        }
        out.device = self.gpus.engine();
        Ok(out)
    }

    pub(super) fn copy_finished(&mut self, done: CopyDone) {
        let Some(b) = self.batches.get_mut(&done.batch) else { return };
        b.copying = false;
        self.status = NodeStatus::Ready;
        let seq = b.pending.iter().find(|p| p.epoch == Some(done.epoch)).map(|p| p.seq);
        match done.result {
            Ok((bytes, checksum)) => {
                let gbps = bytes as f64 / done.seconds.max(1e-9) / 1e9;
                tracing::info!(node = %self.cfg.node_id, batch = %done.batch, epoch = done.epoch, bytes, seconds = done.seconds, gbps, checksum, "copied");
                if let Some(seq) = seq {
                    self.emit(&done.batch, EventKind::Done, seq, Some(done.epoch), bytes, done.seconds, checksum);
                }
            }
            Err(msg) => self.report_error(&done.batch, done.epoch, "TransferError", msg),
        }
    }

    pub(super) fn report_error(&mut self, batch: &str, epoch: u64, err_type: &str, msg: String) {
        tracing::error!(node = %self.cfg.node_id, batch, epoch, "{msg}");
        let v = ErrorValue {
            err_type: err_type.into(),
            err_args: vec![serde_json::Value::String(msg), serde_json::json!({"origin": self.cfg.node_id})],
            traceback: None,
            batch_id: Some(batch.to_string()),
            epoch: Some(Epoch::Root(epoch)),
        };
        let _ = self.send(Body::Error(v));
    }

    pub(super) fn epoch_ended(&mut self, epoch: u64) {
        if let Some((batch, seq)) = self.epochs.remove(&epoch) {
            if let Some(b) = self.batches.get_mut(&batch) {
                b.ended = b.ended.max(seq + 1);
                let ended = b.ended;
                let (done, keep): (Vec<_>, Vec<_>) = b.waits.drain(..).partition(|(n, _)| *n < ended);
                b.waits = keep;
                for (_, sem) in done {
                    self.complete(sem.as_deref(), CommandResult::value(true));
                }
            }
        }
        let mut hit = None;
        for (id, b) in self.batches.iter_mut() {
            if let Some(i) = b.pending.iter().position(|p| p.epoch == Some(epoch)) {
                let p = b.pending.remove(i).expect("present");
                b.signal = true;
                hit = Some((id.clone(), p));
                break;
            }
        }
        if let Some((id, p)) = hit {
            self.replies.store_signal(&id, true);
            let _ = self.state.put(&keys::epoch_ended(&id), &p.seq.to_le_bytes());
            self.complete(p.sem.as_deref(), CommandResult::ok());
        }
    }

    pub(super) fn remote_error(&mut self, e: ErrorValue) {
        let Some(batch) = e.batch_id.clone() else { return };
        self.awaiting.retain(|_, (b, _, _)| *b != batch);
        let Some(b) = self.batches.get_mut(&batch) else { return };
        let origin = e
            .err_args
            .iter()
            .find_map(|a| a.get("origin").and_then(|o| o.as_str()).map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let message = e.err_args.first().and_then(|a| a.as_str()).unwrap_or("remote failure").to_string();
        let kind = match e.err_type.as_str() {
            "ValueError" => ErrorKind::ValueError,
            "ConnectionError" => ErrorKind::ConnectionError,
            "TimeoutError" => ErrorKind::TimeoutError,
            _ => ErrorKind::TransferError,
        };
        let err =
            RemoteError { kind, message: format!("transfer of batch {batch:?} failed on {origin}: {message}"), origin };
        // Fail the transfers of the failed epoch (or all armed ones when no epoch is named).
        let failed: Vec<PendingTransfer> = match &e.epoch {
            Some(Epoch::Root(ep)) => {
                let (f, keep): (Vec<_>, Vec<_>) =
                    b.pending.drain(..).partition(|p| p.epoch == Some(*ep) || p.epoch.is_none());
                b.pending = keep.into();
                f
            }
            _ => b.pending.drain(..).collect(),
        };
        for p in failed {
            self.complete(p.sem.as_deref(), CommandResult::err(err.clone()));
        }
    }
}
