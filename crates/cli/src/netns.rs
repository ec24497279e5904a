//! Simulated hosts for benchmarks: two network namespaces joined by a veth pair (needs root and
//! iproute2). Removed on drop.

use std::process::Command;

pub struct Netns {
    pub ns: [String; 2],
    pub addr: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running `ip` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns, String> {
        let n = std::process::id() % 250;
        let (a, b) = (format!("tb{n}{tag}a"), format!("tb{n}{tag}b"));
        let subnet = format!("10.78.{n}");
        let net = Netns { ns: [a.clone(), b.clone()], addr: [format!("{subnet}.1"), format!("{subnet}.2")] };
        for ns in &net.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns])?;
        }
        let (va, vb) = (format!("{a}v"), format!("{b}v"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (ns, dev, host) in [(&a, &va, 1), (&b, &vb, 2)] {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{subnet}.{host}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// `program` run inside host `host`'s namespace.
    /// `argv` (a program and its first words) run inside host `host`'s namespace.
    pub fn command(&self, host: usize, argv: &[std::ffi::OsString]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[host]]).args(argv);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// `tensorbus bench tcp-sink`: accepts `streams` connections, reads `bytes` in total, then acks
/// each stream with one byte. Prints its address first.
pub fn tcp_sink(listen: &str, streams: usize, bytes: u64, whole: bool) -> Result<(), String> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(listen).map_err(|e| e.to_string())?;
    println!("listening {}", l.local_addr().map_err(|e| e.to_string())?);
    let per = bytes / streams as u64;
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
            Ok(std::thread::spawn(move || {
                // `whole`: every byte lands at its own place in memory, as a transfer's do;
                // otherwise one cache-hot 1 MiB buffer is reused (the network's own rate).
                let mut buf = touched(if whole { per as usize } else { 1 << 20 });
                let mut left = per;
                while left > 0 {
                    let at = if whole { (per - left) as usize } else { 0 };
                    let n = s.read(&mut buf[at..at + (left.min(1 << 20)) as usize]).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    left -= n as u64;
                }
                let _ = s.write_all(b"k");
            }))
        })
        .collect::<Result<_, String>>()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// A buffer whose pages are all mapped already.
fn touched(len: usize) -> Vec<u8> {
    vec![7u8; len]
}

/// `tensorbus bench tcp-source`: sends `bytes` over `streams` connections to `to`, waits for the
/// acks, prints the seconds taken.
pub fn tcp_source(to: &str, streams: usize, bytes: u64, whole: bool) -> Result<(), String> {
    use std::io::{Read, Write};
    let per = bytes / streams as u64;
    let conns: Vec<std::net::TcpStream> =
        (0..streams).map(|_| std::net::TcpStream::connect(to).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let bufs: Vec<Vec<u8>> = (0..streams).map(|_| touched(if whole { per as usize } else { 1 << 20 })).collect();
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .zip(bufs)
        .map(|(mut s, data)| {
            std::thread::spawn(move || {
                let mut left = per;
                while left > 0 {
                    let at = if whole { (per - left) as usize } else { 0 };
                    let n = left.min(1 << 20) as usize;
                    if s.write_all(&data[at..at + n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let mut ack = [0u8; 1];
                let _ = s.read_exact(&mut ack);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    println!("{}", t0.elapsed().as_secs_f64());
    Ok(())
}
