//! `tensorbus status`: the job at a glance, asked of the command node.

use std::time::Duration;

use tensorbus_protocol::control::{AnnounceValue, Body, Message};

/// Asks the command node at `inbox` for its directory, recent epochs and errors.
pub fn query(inbox: &str, timeout: Duration) -> Result<AnnounceValue, String> {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::DEALER).map_err(|e| e.to_string())?;
    let id = format!("observer:{}", std::process::id());
    s.set_identity(id.as_bytes()).map_err(|e| e.to_string())?;
    tensorbus_command::secure::client(&s, tensorbus_command::secure::secret_from_env().as_deref())
        .map_err(|e| e.to_string())?;
    s.set_linger(0).map_err(|e| e.to_string())?;
    s.connect(inbox).map_err(|e| format!("{inbox}: {e}"))?;
    s.send(Message::new(&id, Body::Ping(())).to_json().as_bytes(), 0).map_err(|e| e.to_string())?;
    let mut items = [s.as_poll_item(zmq::POLLIN)];
    loop {
        if zmq::poll(&mut items, timeout.as_millis() as i64).map_err(|e| e.to_string())? == 0 {
            return Err(format!("no command node answered at {inbox} within {:.1} s", timeout.as_secs_f64()));
        }
        let frames = s.recv_multipart(0).map_err(|e| e.to_string())?;
        if let Ok(Message { body: Body::Announce(d), .. }) = Message::from_json(frames.last().map_or(&[][..], |f| f)) {
            return Ok(d);
        }
    }
}

pub fn run(inbox: &str, json: bool) -> Result<(), String> {
    let d = query(inbox, Duration::from_secs(3))?;
    if json {
        println!("{}", serde_json::to_string(&d).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("command node {} — {} agents", d.inbox, d.nodes.len());
    println!("| node | status | host | pid | pairs | batches |\n|---|---|---|---:|---|---|");
    for (id, n) in &d.nodes {
        let pairs: Vec<String> =
            n.pairs.iter().map(|(p, s)| format!("{p} ({} {}/{})", s.local_name, s.rank, s.world_size)).collect();
        let batches: Vec<String> =
            n.batches.iter().map(|(b, r)| format!("{b} ({} tensors)", r.tensors.len())).collect();
        println!("| {id} | {:?} | {} | {} | {} | {} |", n.status, n.host, n.pid, pairs.join(", "), batches.join(", "));
    }
    if !d.epochs_ended.is_empty() {
        println!("\nrecent epochs:");
        for e in d.epochs_ended.iter().rev().take(10) {
            println!("  epoch {} batch {} (#{}) on {} nodes, {} bytes", e.epoch, e.batch_id, e.seq, e.nodes, e.bytes);
        }
    }
    if !d.errors.is_empty() {
        println!("\nerrors:");
        for e in d.errors.iter().rev().take(10) {
            println!(
                "  {} {}: {}",
                e.err_type,
                e.batch_id.as_deref().unwrap_or("-"),
                e.err_args.first().and_then(|a| a.as_str()).unwrap_or("")
            );
        }
    }
    Ok(())
}
