//! `tensorbus status`: the job at a glance, asked of the command node.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tensorbus_protocol::control::{AnnounceValue, Body, Message};

use crate::job::Target;

/// Asks the command node at `inbox` for its directory, recent epochs and errors. When it does not
/// answer, the error says why if the handshake told (a wrong or missing secret), else that
/// nothing answered at that address.
pub fn query(inbox: &str, secret: Option<&[u8]>, timeout: Duration) -> Result<AnnounceValue, String> {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::DEALER).map_err(|e| e.to_string())?;
    let id = format!("observer:{}", std::process::id());
    s.set_identity(id.as_bytes()).map_err(|e| e.to_string())?;
    tensorbus_command::secure::client(&s, secret).map_err(|e| e.to_string())?;
    s.set_linger(0).map_err(|e| e.to_string())?;
    let watch = tensorbus_command::secure::HandshakeWatch::start(&ctx, &s).map_err(|e| e.to_string())?;
    s.connect(inbox).map_err(|e| format!("{inbox}: {e}"))?;
    s.send(Message::new(&id, Body::Ping(())).to_json().as_bytes(), 0).map_err(|e| e.to_string())?;
    let mut items = [s.as_poll_item(zmq::POLLIN)];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Wake up now and then to see whether the handshake already failed.
        let slice = left.min(Duration::from_millis(100));
        if zmq::poll(&mut items, slice.as_millis() as i64).map_err(|e| e.to_string())? == 0 {
            if let Some(why) = watch.explain(inbox, secret.is_some()) {
                return Err(why);
            }
            if left.is_zero() {
                return Err(format!("no command node answered at {inbox} within {:.1} s", timeout.as_secs_f64()));
            }
            continue;
        }
        let frames = s.recv_multipart(0).map_err(|e| e.to_string())?;
        if let Ok(Message { body: Body::Announce(d), .. }) = Message::from_json(frames.last().map_or(&[][..], |f| f)) {
            return Ok(d);
        }
    }
}

/// `tensorbus status`: once, or (`watch`) refreshed every `interval` until Ctrl-C.
pub fn run(target: &Target, json: bool, watch: bool, interval: Duration) -> Result<(), String> {
    if !watch {
        return show(target, json);
    }
    let stop = crate::stop_flag();
    let tty = std::io::stdout().is_terminal();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if tty {
            print!("\x1b[2J\x1b[H"); // clear the screen, cursor home
        }
        println!("tensorbus status — {} (every {:.1} s, Ctrl-C to stop)\n", target.inbox, interval.as_secs_f64());
        if let Err(e) = show(target, json) {
            println!("{e}");
        }
        let _ = std::io::stdout().flush();
        let until = Instant::now() + interval;
        while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn show(target: &Target, json: bool) -> Result<(), String> {
    let d = query(&target.inbox, target.secret.as_deref(), Duration::from_secs(3))
        .map_err(|e| format!("{e} (address from {})", target.source))?;
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
