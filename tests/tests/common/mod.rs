//! Helpers shared by the lab test files: bringing a lab up, the probe app as server and client.
#![allow(dead_code)]
use std::{
    io::{BufRead, BufReader},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use meshlet_lab::{Lab, LabOptions, PodSpec};

pub fn bin_dir() -> PathBuf {
    std::env::var_os("MESHLET_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug")))
}

pub const PROBE: &str = env!("CARGO_BIN_EXE_meshlet-lab-probe");
pub const AGENT_MARK: &str = "0x6d6c0001";

pub fn up(pods: &[PodSpec]) -> Lab {
    Lab::up(pods, &LabOptions::new(bin_dir())).expect("lab up")
}

/// A lab whose pods have an IPv6 address beside their IPv4 one.
pub fn up_dual_stack(pods: &[PodSpec]) -> Lab {
    let mut options = LabOptions::new(bin_dir());
    options.dual_stack = true;
    Lab::up(pods, &options).expect("dual-stack lab up")
}

/// Runs `probe many TO COUNT` in `pod`: COUNT request/echo connections one after another.
pub fn many(lab: &Lab, pod: &str, to: &str, count: usize, fill: Option<&str>) -> serde_json::Value {
    let mut cmd = lab.command_in(pod, PROBE).expect("command");
    cmd.args(["many", to, &count.to_string()]);
    if let Some(fill) = fill {
        cmd.env("PROBE_FILL", fill);
    }
    let out = cmd.output().expect("probe many");
    assert!(
        out.status.success(),
        "probe many: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("probe many report")
}

/// An echo server in a pod; `finish` returns the peers it accepted.
pub struct Server {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Server {
    pub fn start(lab: &Lab, pod: &str, port: u16) -> Self {
        Self::start_with(lab, pod, port, 100, 120)
    }

    /// A server for at most `max` connections and `secs` seconds.
    pub fn start_with(lab: &Lab, pod: &str, port: u16, max: usize, secs: u64) -> Self {
        Self::start_on(lab, pod, "0.0.0.0", port, max, secs)
    }

    /// A server listening on `host` (`::` for both families).
    pub fn start_on(lab: &Lab, pod: &str, host: &str, port: u16, max: usize, secs: u64) -> Self {
        let mut child = lab
            .command_in(pod, PROBE)
            .expect("command")
            .env("PROBE_LISTEN", host)
            .args([
                "serve",
                &port.to_string(),
                &max.to_string(),
                &secs.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server listening");
        assert!(first.starts_with("LISTENING"), "{first}");
        Self { child, lines: rx }
    }

    pub fn accepted(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the probe client in `pod`; returns (success, JSON report or stderr).
pub fn send(
    lab: &Lab,
    pod: &str,
    to: &str,
    bytes: usize,
    mark: Option<&str>,
    fill: Option<&str>,
) -> (bool, serde_json::Value, String) {
    let mut cmd = lab.command_in(pod, PROBE).expect("command");
    cmd.args(["send", to, &bytes.to_string()]);
    if let Some(mark) = mark {
        cmd.arg(mark);
    }
    if let Some(fill) = fill {
        cmd.env("PROBE_FILL", fill);
    }
    let out = cmd.output().expect("probe send");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the registry with `extra` (mesh, modes, policies) beside the lab's workloads and
/// waits until every agent has taken `version` (or NACKed it, when `expect_nack`).
pub fn write_policy(lab: &Lab, extra: serde_json::Value, version: u64, expect_nack: bool) {
    let mut registry = lab.topology.workloads_json();
    if let (Some(map), Some(extra)) = (registry.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    lab.write_workloads(&registry).expect("write registry");
    wait_version(lab, version, expect_nack);
}

/// Waits until every agent applied (or refused) `version`.
pub fn wait_version(lab: &Lab, version: u64, expect_nack: bool) {
    let (needle, tag) = if expect_nack {
        (
            "refused control-plane update (NACK)".to_string(),
            format!("version={version}"),
        )
    } else {
        (
            format!("applied control-plane update version={version} "),
            String::new(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in &lab.topology.nodes {
        loop {
            let log = lab.agent_log(&node.name);
            if log
                .lines()
                .any(|l| l.contains(&needle) && l.split_whitespace().any(|w| w.contains(&tag)))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged {needle:?}:\n{}",
                node.name,
                meshlet_lab::lab::log_tail(&node.agent_log, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs the `meshlet` CLI in `node`'s netns (where its agent's admin API is).
pub fn meshlet_cli(lab: &Lab, node: &str, args: &[&str]) -> (bool, String, String) {
    let bin = bin_dir().join("meshlet");
    let out = lab
        .command_in(node, bin.to_str().expect("utf-8 path"))
        .expect("command")
        .args(args)
        .output()
        .expect("meshlet cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET from a node's admin API (inside the node's netns): (status code, body).
pub fn admin_get(lab: &Lab, node: &str, port: u16, path: &str) -> (u16, String) {
    let netns = lab.topology.node(node).expect("node").netns.clone();
    let path = path.to_string();
    meshlet_lab::netns::run_in(&netns, move || {
        Ok(meshlet_lab::net::http_get(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            &path,
        )?)
    })
    .expect("admin GET")
}

/// The value of the sample `name{labels…}` whose labels include all of `with`.
pub fn sample(metrics: &str, name: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// A long-lived probe connection (`probe ping`): says CONNECTED, then CLOSED when the
/// connection dies, or OPEN when it outlived its time.
pub struct Ping {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Ping {
    pub fn start(lab: &Lab, pod: &str, to: &str, secs: u64) -> Self {
        let mut child = lab
            .command_in(pod, PROBE)
            .expect("command")
            .args(["ping", to, &secs.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("ping");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines: rx }
    }

    /// The next line within `wait`.
    pub fn next(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it answers `Some`, for at most `wait`.
pub fn eventually<T>(wait: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node agent's metrics text.
pub fn metrics(lab: &Lab, node: &str) -> String {
    let (status, body) = admin_get(lab, node, 15000, "/metrics");
    assert_eq!(status, 200, "metrics of {node}");
    body
}

/// Raw frames seen on one interface of a netns (AF_PACKET), until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(netns: &str, interface: &str) -> Self {
        let iface = interface.to_string();
        let fd: OwnedFd = meshlet_lab::netns::run_in(netns, move || {
            let name = std::ffi::CString::new(iface)?;
            // SAFETY: plain libc calls with valid arguments; the fd is owned right away.
            unsafe {
                let index = libc::if_nametoindex(name.as_ptr());
                anyhow::ensure!(index != 0, "no interface");
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                anyhow::ensure!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let fd = OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = proto;
                addr.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                anyhow::ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                Ok(fd)
            }
        })
        .expect("capture socket");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 70_000];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && frames.len() < 200_000
            {
                // SAFETY: reading into a buffer of the size passed.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a capture of mesh traffic must show: TLS application data records, and never the
/// app's `marker` in the clear.
pub fn assert_only_tls(frames: &[Vec<u8>], marker: &str) {
    assert!(
        !frames.iter().any(|f| contains(f, marker.as_bytes())),
        "plaintext ({marker}) on the wire"
    );
    assert!(
        frames.iter().any(|f| contains(f, &[0x17, 0x03, 0x03])),
        "no TLS application data on the wire ({} frames)",
        frames.len()
    );
}

/// A folder for the test's crafted files, removed at the end.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("meshlet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent for node `node` started in node-1's netns with its own cgroup, pins, sockets,
/// admin port and identity folder; killed and cleaned up on drop. `auth` is how it
/// authenticates (`--join-token-file F`, or `--service-account-token-file F`).
pub struct ExtraAgent {
    child: std::process::Child,
    log: PathBuf,
    cgroup: PathBuf,
}

impl ExtraAgent {
    pub fn start(
        lab: &Lab,
        scratch: &Scratch,
        node: &str,
        auth: &[std::ffi::OsString],
        admin_port: u16,
    ) -> Self {
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/unified/meshlet-lab/{node}"));
        std::fs::create_dir_all(&cgroup).expect("cgroup");
        let log = scratch.path(&format!("{node}-{admin_port}.log"));
        let identity_dir = scratch.path(&format!("{node}-{admin_port}-identity"));
        let child = lab
            .command_in("node-1", bin_dir().join("meshlet").to_str().expect("path"))
            .expect("command")
            .args(["agent", "--node", node, "--control-plane"])
            .arg(format!("unix:{}", lab.topology.controlplane_socket))
            .arg("--node-socket")
            .arg(scratch.path(&format!("{node}-{admin_port}.sock")))
            .arg("--pod-cgroup")
            .arg(&cgroup)
            .arg("--bpf-pin-dir")
            .arg(format!("/sys/fs/bpf/meshlet-lab/{node}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--control-plane-roots")
            .arg(lab.pki().roots_path())
            .arg("--node-identity-dir")
            .arg(&identity_dir)
            .args(auth)
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("extra agent");
        Self { child, log, cgroup }
    }

    /// Waits until one line of the agent's log has every one of `needles`.
    pub fn wait_for_line(&self, needles: &[&str]) {
        eventually(Duration::from_secs(15), || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            log.lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
                .then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the agent never logged a line with {needles:?}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }

    /// Waits until the agent's log has `needle`; answers the log.
    pub fn wait_for(&self, needle: &str) -> String {
        eventually(Duration::from_secs(15), || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            log.contains(needle).then_some(log)
        })
        .unwrap_or_else(|| {
            panic!(
                "the agent never logged {needle:?}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }
}

impl Drop for ExtraAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}
