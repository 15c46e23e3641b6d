//! Network namespaces: a pod's namespace is held open by fd for as long as the pod lives, and a
//! dedicated thread that stays inside it creates every socket the agent needs there.
//!
//! Sockets belong to the namespace they were created in, whatever thread uses them later; so
//! only socket creation (and netlink/sysctl set-up) has to happen inside. Keeping one thread
//! per pod parked in the namespace makes that a channel send instead of a thread spawn and two
//! `setns` calls per connection.
//!
//! A new connection should not even wait for that thread: it keeps a small stash of plain TCP
//! sockets made in advance, which any thread may take, bind and connect (options such as marks
//! and `IP_TRANSPARENT` are per socket, not per thread). The stash is topped up in the
//! background once it runs low, so only a burst larger than the stash waits for the thread.
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
};

use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use nix::sched::CloneFlags;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (does the pod's netns exist?)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace: {source}")]
    NotANetns { path: PathBuf, source: nix::Error },
    #[error("the worker thread of network namespace {0} is gone")]
    WorkerGone(PathBuf),
    #[error("cannot start a thread for network namespace {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Job = Box<dyn FnOnce() + Send>;

/// Sockets kept ready per address family.
const STASH_SIZE: usize = 32;
/// Below this many, the namespace's thread is asked to top the stash up.
const STASH_LOW: usize = 8;

/// Unbound TCP sockets made inside the namespace, per family; empty until first asked for, so
/// a pod that makes no connections holds none.
#[derive(Default)]
struct SocketStash {
    v4: Mutex<Vec<Socket>>,
    v6: Mutex<Vec<Socket>>,
    refilling: [AtomicBool; 2],
}

impl SocketStash {
    fn slot(&self, ipv6: bool) -> (&Mutex<Vec<Socket>>, &AtomicBool) {
        if ipv6 {
            (&self.v6, &self.refilling[1])
        } else {
            (&self.v4, &self.refilling[0])
        }
    }

    /// Takes a socket, and says whether the stash is now low.
    fn take(&self, ipv6: bool) -> (Option<Socket>, bool) {
        let mut sockets = self.slot(ipv6).0.lock().unwrap_or_else(|e| e.into_inner());
        let socket = sockets.pop();
        (socket, sockets.len() < STASH_LOW)
    }

    /// On the namespace's thread: fills the stash (a failure, e.g. out of descriptors, leaves
    /// it short and the next connection makes its own socket and reports the error).
    fn fill(&self, ipv6: bool) {
        let (stash, refilling) = self.slot(ipv6);
        let missing =
            STASH_SIZE.saturating_sub(stash.lock().unwrap_or_else(|e| e.into_inner()).len());
        let mut made = Vec::with_capacity(missing);
        for _ in 0..missing {
            match new_tcp_socket(ipv6) {
                Ok(socket) => made.push(socket),
                Err(_) => break,
            }
        }
        stash.lock().unwrap_or_else(|e| e.into_inner()).extend(made);
        refilling.store(false, Ordering::Release);
    }
}

fn new_tcp_socket(ipv6: bool) -> io::Result<Socket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    // Non-blocking from the start (the runtime needs it so): no fcntl pair per connection.
    Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

/// A network namespace's device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    pub fn of(fd: impl std::os::fd::AsFd) -> io::Result<Self> {
        let stat = nix::sys::stat::fstat(fd.as_fd().as_raw_fd())?;
        Ok(Self {
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }
}

/// An open network namespace and the thread that lives in it.
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    file: File,
    stash: Arc<SocketStash>,
    ephemeral_ports: std::ops::RangeInclusive<u16>,
}

/// The kernel's default `ip_local_port_range`.
const DEFAULT_EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;

/// `net.ipv4.ip_local_port_range` of the namespace the calling thread is in.
fn read_ephemeral_ports() -> std::ops::RangeInclusive<u16> {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    match (bounds.next(), bounds.next()) {
        (Some(Ok(low)), Some(Ok(high))) if 0 < low && low < high => low..=high,
        _ => DEFAULT_EPHEMERAL_PORTS,
    }
}

impl std::os::fd::AsFd for Netns {
    /// The namespace itself, e.g. to attach a BPF program to it.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Netns {
    /// Opens the namespace at `path` and starts its worker thread.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file(file, path)
    }

    /// Takes an open namespace (e.g. a file descriptor the CNI plugin passed) and starts its
    /// worker thread; `path` is where the runtime keeps it, for logs and for finding it again
    /// after an agent restart.
    pub fn from_file(file: File, path: &Path) -> Result<Self, NetnsError> {
        let worker_file = file.try_clone().map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        let name = format!(
            "netns-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // setns() on this thread only: the rest of the agent stays where it was.
                let entered = nix::sched::setns(&worker_file, CloneFlags::CLONE_NEWNET)
                    .map(|()| read_ephemeral_ports());
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                drop(worker_file);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Spawn {
                path: path.to_path_buf(),
                source,
            })?;
        match entered_rx.recv() {
            Ok(Ok(ephemeral_ports)) => Ok(Self {
                path: path.to_path_buf(),
                jobs,
                file,
                stash: Arc::default(),
                ephemeral_ports,
            }),
            Ok(Err(source)) => Err(NetnsError::NotANetns {
                path: path.to_path_buf(),
                source,
            }),
            Err(_) => Err(NetnsError::WorkerGone(path.to_path_buf())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's identity: device and inode of its nsfs file, equal for every handle
    /// on one namespace and never shared by two live ones.
    pub fn id(&self) -> io::Result<NetnsId> {
        NetnsId::of(&self.file)
    }

    /// The namespace's ephemeral port range (`net.ipv4.ip_local_port_range`, read at open),
    /// where the agent picks source ports of its own.
    pub fn ephemeral_ports(&self) -> std::ops::RangeInclusive<u16> {
        self.ephemeral_ports.clone()
    }

    /// Runs `f` inside the namespace and returns its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))?;
        rx.await
            .map_err(|_| NetnsError::WorkerGone(self.path.clone()))
    }

    /// A new, unbound TCP socket of the namespace (non-blocking, no options set), for `addr`'s
    /// family: from the stash when it has one, else made by the namespace's thread.
    pub async fn tcp_socket(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<io::Result<Socket>, NetnsError> {
        let ipv6 = addr.is_ipv6();
        let (socket, low) = self.stash.take(ipv6);
        if low && !self.stash.slot(ipv6).1.swap(true, Ordering::AcqRel) {
            let stash = self.stash.clone();
            // Not awaited: the connection goes on with what it took (or makes its own below).
            if self.jobs.send(Box::new(move || stash.fill(ipv6))).is_err() {
                self.stash.slot(ipv6).1.store(false, Ordering::Release);
            }
        }
        match socket {
            Some(socket) => Ok(Ok(socket)),
            None => self.run(move || new_tcp_socket(ipv6)).await,
        }
    }
}

/// The kernel's cookie for the network namespace a socket lives in (`SO_NETNS_COOKIE`, 5.14);
/// the same value the BPF programs get from `bpf_get_netns_cookie`.
pub fn socket_netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A namespace of the test's own: a thread unshares into it and stays until told to end (the
/// namespace goes with the thread and the last `Netns` of it). Root only.
#[cfg(test)]
pub(crate) fn private_netns() -> (PathBuf, mpsc::Sender<()>) {
    let (path_tx, path_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let path = nix::sched::unshare(CloneFlags::CLONE_NEWNET).map(|()| {
            PathBuf::from(format!(
                "/proc/{}/task/{}/ns/net",
                std::process::id(),
                nix::unistd::gettid()
            ))
        });
        let _ = path_tx.send(path);
        let _ = end_rx.recv();
    });
    let path = path_rx
        .recv()
        .expect("the namespace thread")
        .expect("unshare(CLONE_NEWNET) (run as root)");
    (path, end_tx)
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsFd, time::Duration};

    use super::*;

    fn cookie(socket: &Socket) -> u64 {
        socket_netns_cookie(socket.as_fd()).expect("SO_NETNS_COOKIE")
    }

    #[tokio::test]
    async fn stashed_sockets_belong_to_the_namespace_and_the_stash_refills() {
        let (path, _end) = private_netns();
        // A port range of its own, which the namespace must report (not ours).
        let set_range = |range: &'static str| {
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .args([
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.ip_local_port_range={range}"),
                ])
                .status()
                .expect("nsenter")
                .success()
        };
        assert!(set_range("40000 40999"), "cannot set the port range");
        let netns = Netns::open(&path).expect("open the namespace");
        assert_eq!(netns.ephemeral_ports(), 40000..=40999);
        let inside = cookie(
            &netns
                .run(|| new_tcp_socket(false))
                .await
                .expect("run")
                .expect("socket"),
        );
        assert_ne!(inside, cookie(&new_tcp_socket(false).expect("socket")));

        let v4: std::net::SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let v6: std::net::SocketAddr = "[fd00::1]:80".parse().expect("addr");
        // More than the stash holds: the first ones are made on demand, the rest come from
        // the stash as the namespace's thread fills it; all of them from inside.
        for _ in 0..STASH_SIZE * 3 {
            let socket = netns.tcp_socket(v4).await.expect("netns").expect("socket");
            assert_eq!(cookie(&socket), inside);
            assert_eq!(socket.domain().expect("domain"), Domain::IPV4);
        }
        let socket = netns.tcp_socket(v6).await.expect("netns").expect("socket");
        assert_eq!(cookie(&socket), inside);
        assert_eq!(socket.domain().expect("domain"), Domain::IPV6);

        // Topped up in the background, and never past its size.
        let filled = |ipv6: bool| netns.stash.slot(ipv6).0.lock().expect("stash").len();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (filled(false) < STASH_LOW || filled(true) < STASH_LOW)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!((STASH_LOW..=STASH_SIZE).contains(&filled(false)));
        assert!((STASH_LOW..=STASH_SIZE).contains(&filled(true)));
    }
}
