//! Network namespaces: a pod's namespace is held open by fd for as long as the pod lives, and a
//! dedicated thread that stays inside it creates every socket the agent needs there.
//!
//! Sockets belong to the namespace they were created in, whatever thread uses them later; so
//! only socket creation (and netlink/sysctl set-up) has to happen inside. Keeping one thread
//! per pod parked in the namespace makes that a channel send instead of a thread spawn and two
//! `setns` calls per connection.
use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::mpsc,
};

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

/// An open network namespace and the thread that lives in it.
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    file: File,
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
                let entered = nix::sched::setns(&worker_file, CloneFlags::CLONE_NEWNET);
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
            Ok(Ok(())) => Ok(Self {
                path: path.to_path_buf(),
                jobs,
                file,
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
