//! `meshlet-lab-probe`: the apps of the lab's pods. A TCP echo server that reports who
//! connected, and a client that sends N bytes, checks the echo by SHA-256 and reports the peer
//! it saw. Every loop is bounded in count and time.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

fn usage() -> ! {
    eprintln!(
        "usage:\n  meshlet-lab-probe serve PORT [MAX_CONNECTIONS] [TIMEOUT_SECS]\n  \
         meshlet-lab-probe send IP:PORT BYTES [SO_MARK]\n  \
         meshlet-lab-probe hold-server PORT MAX TIMEOUT_SECS\n  \
         meshlet-lab-probe hold IP:PORT COUNT SECS\n  \
         meshlet-lab-probe ping IP:PORT SECS\n  \
         meshlet-lab-probe bind PORT\n  \
         meshlet-lab-probe many IP:PORT COUNT\n  \
         meshlet-lab-probe load IP:PORT RATE SECS STREAMS"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("send") => send(&args[1..]),
        Some("hold-server") => hold_server(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("ping") => ping(&args[1..]),
        Some("bind") => bind(&args[1..]),
        Some("many") => many(&args[1..]),
        Some("load") => load(&args[1..]),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("probe: {e}");
        std::process::exit(1);
    }
}

fn serve(args: &[String]) -> std::io::Result<()> {
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let max: usize = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(1000);
    let timeout = Duration::from_secs(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(300));
    let listener = listen(port)?;
    println!("LISTENING {port}");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + timeout;
    let mut served = 0;
    let mut echoes = Vec::new();
    while served < max && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, peer)) => {
                served += 1;
                println!("ACCEPT {peer}");
                std::io::stdout().flush()?;
                echoes.push(std::thread::spawn(move || echo(stream)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
    // Finish the connections in progress (each is bounded by its read timeout).
    for echo in echoes {
        let _ = echo.join();
    }
    Ok(())
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// A non-blocking listener on PORT: IPv4 by default; `PROBE_LISTEN=::` listens on IPv6 (and
/// IPv4-mapped) as well.
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let host = std::env::var("PROBE_LISTEN").unwrap_or_else(|_| "0.0.0.0".into());
    let listener = TcpListener::bind((host.as_str(), port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn connect(to: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.connect_timeout(&to.into(), Duration::from_secs(10))?;
    Ok(socket.into())
}

/// One short connection: sends `request`, ends the sending side, checks that the echo is the
/// same bytes; returns the peer address the connection saw.
fn echo_once(to: SocketAddr, request: &[u8]) -> std::io::Result<SocketAddr> {
    let mut stream = connect(to, None)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = stream.peer_addr()?;
    stream.write_all(request)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if answer != request {
        return Err(std::io::Error::other(format!(
            "echo of {} bytes did not match",
            answer.len()
        )));
    }
    Ok(peer)
}

fn send(args: &[String]) -> std::io::Result<()> {
    let to: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let bytes: usize = args
        .get(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| usage());
    let mark: Option<u32> = args.get(2).and_then(|m| {
        m.strip_prefix("0x")
            .map(|h| u32::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| m.parse().ok())
    });
    let started = Instant::now();
    let mut stream = connect(to, mark)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    // PROBE_FILL=TEXT repeats TEXT instead of random bytes (for plaintext-capture tests).
    let payload: Vec<u8> = match std::env::var("PROBE_FILL") {
        Ok(fill) if !fill.is_empty() => fill.bytes().cycle().take(bytes).collect(),
        _ => (0..bytes).map(|_| rand::random::<u8>()).collect(),
    };
    let sent_sha = hex(&Sha256::digest(&payload));
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::with_capacity(bytes);
    stream.read_to_end(&mut received)?;
    sender
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))??;
    let recv_sha = hex(&Sha256::digest(&received));
    let ok = received.len() == bytes && recv_sha == sent_sha;
    println!(
        "{}",
        serde_json::json!({
            "peer": peer.to_string(), "local": local.to_string(), "sent": bytes,
            "received": received.len(), "sent_sha256": sent_sha, "received_sha256": recv_sha,
            "ok": ok, "millis": started.elapsed().as_millis() as u64,
        })
    );
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other("echo did not match what was sent"))
    }
}

/// Raises the open-files limit to the hard limit (holding many connections needs it).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Accepts up to MAX connections and keeps them open, idle, until TIMEOUT.
fn hold_server(args: &[String]) -> std::io::Result<()> {
    raise_nofile();
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let max: usize = args
        .get(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let timeout = Duration::from_secs(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(300));
    let listener = listen(port)?;
    println!("LISTENING {port}");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + timeout;
    let mut held = Vec::new();
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) if held.len() < max => held.push(stream),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens COUNT connections one after another, says `HELD n`, keeps them idle for SECS.
fn hold(args: &[String]) -> std::io::Result<()> {
    raise_nofile();
    let to: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let count: usize = args
        .get(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| usage());
    let secs: u64 = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(60);
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(connect(to, None)?);
    }
    println!("HELD {}", held.len());
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One connection to an echo server, a byte every 50 ms: says `CONNECTED`, then `CLOSED` as
/// soon as the connection fails or ends (or `OPEN` after SECS).
fn ping(args: &[String]) -> std::io::Result<()> {
    let to: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let secs: u64 = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(30);
    let mut stream = connect(to, None)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut byte = [0u8; 1];
    stream.write_all(b"p")?;
    stream.read_exact(&mut byte)?;
    println!("CONNECTED");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let alive = stream.write_all(b"p").is_ok() && matches!(stream.read(&mut byte), Ok(1));
        if !alive {
            println!("CLOSED");
            return Ok(());
        }
    }
    println!("OPEN");
    Ok(())
}

/// Tries to listen on PORT; says `BOUND`, or fails with the error.
fn bind(args: &[String]) -> std::io::Result<()> {
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    // With a mark (`bind PORT 0x…`): as a pod process that set SO_MARK itself would.
    // PROBE_LISTEN=:: binds IPv6 (the bind6 ratchet).
    let host: std::net::IpAddr = std::env::var("PROBE_LISTEN")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(SocketAddr::new(host, port)),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(mark) = args.get(1) {
        let mark = u32::from_str_radix(mark.trim_start_matches("0x"), 16)
            .map_err(|e| std::io::Error::other(format!("mark {mark}: {e}")))?;
        socket.set_mark(mark)?;
    }
    socket.bind(&SocketAddr::new(host, port).into())?;
    socket.listen(1)?;
    println!("BOUND {port}");
    Ok(())
}

/// COUNT connections one after another, each a 64-byte request and its echo; reports how many
/// worked, the peers the app saw (`getpeername`) and the first errors, as JSON.
fn many(args: &[String]) -> std::io::Result<()> {
    let to: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let count: usize = args
        .get(1)
        .and_then(|c| c.parse().ok())
        .filter(|c| *c <= 100_000)
        .unwrap_or_else(|| usage());
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut errors: Vec<String> = Vec::new();
    let mut peers = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let one = || -> std::io::Result<SocketAddr> {
            // PROBE_FILL=TEXT sends TEXT (for plaintext-capture tests), else 64 bytes.
            let request: Vec<u8> = match std::env::var("PROBE_FILL") {
                Ok(fill) if !fill.is_empty() => format!("{fill}-{i}").into_bytes(),
                _ => (0..64).map(|b| (b as u8) ^ (i as u8)).collect(),
            };
            echo_once(to, &request)
        };
        match one() {
            Ok(peer) => {
                ok += 1;
                *peers.entry(peer.to_string()).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({ "ok": ok, "failed": failed, "peers": peers, "errors": errors })
    );
    Ok(())
}

/// Steady load for SECS seconds: RATE new short connections a second (64 bytes echoed, on two
/// threads) and STREAMS long-lived connections that stream data the whole time, each checked
/// end to end by SHA-256 of what went and what came back. Prints one JSON report: every
/// failure counts (a refused or reset connection, a short or corrupted echo), with the times
/// of the first and last. `PROBE_FILL=TEXT` makes the short requests TEXT-n (for captures).
fn load(args: &[String]) -> std::io::Result<()> {
    let to: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let arg = |i: usize, max: u64| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .filter(|n| *n <= max)
            .unwrap_or_else(|| usage())
    };
    let (rate, secs, streams) = (arg(1, 2_000), arg(2, 3_600), arg(3, 200));
    let fill = std::env::var("PROBE_FILL").ok().filter(|f| !f.is_empty());
    let failed_at = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let note = |errors: &std::sync::Mutex<Vec<String>>, what: String| {
        let mut errors = errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 20 {
            errors.push(what);
        }
    };
    // Long-lived: a writer paces 16 KiB blocks, a reader hashes the echo.
    let long: Vec<_> = (0..streams)
        .map(|n| {
            let errors = errors.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let one = || -> std::io::Result<u64> {
                    let stream = connect(to, None)?;
                    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let mut reader = stream.try_clone()?;
                    let echo = std::thread::spawn(move || -> std::io::Result<(u64, Vec<u8>)> {
                        let mut hash = Sha256::new();
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut total = 0u64;
                        loop {
                            let got = reader.read(&mut buf)?;
                            if got == 0 {
                                return Ok((total, hash.finalize().to_vec()));
                            }
                            hash.update(&buf[..got]);
                            total += got as u64;
                        }
                    });
                    let mut writer = stream;
                    let mut hash = Sha256::new();
                    let mut sent = 0u64;
                    let mut block = vec![0u8; 16 * 1024];
                    let mut i = 0u64;
                    while Instant::now() < until {
                        for (j, b) in block.iter_mut().enumerate() {
                            *b = (n as u8) ^ (i as u8).wrapping_mul(31) ^ (j as u8);
                        }
                        writer.write_all(&block)?;
                        hash.update(&block);
                        sent += block.len() as u64;
                        i += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    writer.shutdown(Shutdown::Write)?;
                    let (received, echoed) = echo
                        .join()
                        .map_err(|_| std::io::Error::other("reader panicked"))??;
                    if received != sent || echoed != hash.finalize().to_vec() {
                        return Err(std::io::Error::other(format!(
                            "sent {sent} bytes, {received} came back, checksums differ"
                        )));
                    }
                    Ok(sent)
                };
                one().map_err(|e| {
                    let what = format!("long {n} at {:?}: {e}", started.elapsed());
                    note(&errors, what.clone());
                    what
                })
            })
        })
        .collect();
    // Short: two threads, each on its own schedule of RATE/2 a second.
    let per_thread = (rate / 2).max(1);
    let short: Vec<_> = (0..2u64)
        .map(|t| {
            let (errors, fill, failed_at) = (errors.clone(), fill.clone(), failed_at.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let interval = Duration::from_secs(1) / per_thread as u32;
                let mut i = 0u32;
                loop {
                    let due = started + interval * i + interval * t as u32 / 2;
                    if due >= until {
                        break;
                    }
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let one = || -> std::io::Result<()> {
                        let request: Vec<u8> = match &fill {
                            Some(fill) => format!("{fill}-{t}-{i}").into_bytes(),
                            None => (0..64).map(|b| (b as u8) ^ (i as u8) ^ (t as u8)).collect(),
                        };
                        echo_once(to, &request).map(|_| ())
                    };
                    match one() {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            failed_at
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(started.elapsed().as_secs_f64());
                            note(&errors, format!("short at {:?}: {e}", started.elapsed()));
                        }
                    }
                    i += 1;
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut short_ok, mut short_failed) = (0u64, 0u64);
    for t in short {
        let (ok, failed) = t.join().unwrap_or((0, 1));
        short_ok += ok;
        short_failed += failed;
    }
    let (mut long_ok, mut long_failed, mut long_bytes) = (0u64, 0u64, 0u64);
    for t in long {
        match t.join() {
            Ok(Ok(bytes)) => {
                long_ok += 1;
                long_bytes += bytes;
            }
            _ => long_failed += 1,
        }
    }
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failed_at = failed_at.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first_failure = failed_at.iter().copied().reduce(f64::min);
    let last_failure = failed_at.iter().copied().reduce(f64::max);
    println!(
        "{}",
        serde_json::json!({
            "short_ok": short_ok, "short_failed": short_failed,
            "long_ok": long_ok, "long_failed": long_failed, "long_bytes": long_bytes,
            "secs": started.elapsed().as_secs_f64(), "errors": errors,
            "first_failure_secs": first_failure, "last_failure_secs": last_failure,
        })
    );
    Ok(())
}
