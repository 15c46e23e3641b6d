//! Handing this node over to a successor agent — a rolling upgrade, or a second agent started
//! by hand — without refusing a new connection or resetting an established one.
//!
//! Listening sockets belong to the kernel, not to a process: the predecessor passes every one
//! it has (each pod's outbound, tunnel and plaintext listeners; the node API, CNI, admin and
//! metrics sockets) with `SCM_RIGHTS`, so a SYN that arrives at any moment waits in a queue
//! that one of the two agents accepts from. Both SO_REUSEPORT (a second socket per port) and a
//! close-and-rebind would drop the connections queued on the socket that closes. The pinned
//! maps stay where they are; the successor's programs share them and know the predecessor's
//! cgroup, so that the predecessor's delivery and tunnel sockets are not redirected while it
//! drains. The wire is `HandoverMessage` in `meshlet.proto`:
//!
//! 1. The successor connects to `handover.sock` (root only, both ways). The predecessor
//!    pauses enrollment (the CNI plugin retries; removals are kept for the successor) and
//!    sends hello, one message per pod, the host sockets, end. It keeps serving.
//! 2. The successor follows the control plane and fetches the pods' certificates; only once
//!    it could serve every pod does it attach its programs and take the pods on the handed
//!    sockets; it starts accepting and sends taken. Had it failed before, it would exit
//!    having changed nothing in the kernel.
//! 3. The predecessor stops accepting everywhere, answers released (with the pods removed
//!    meanwhile), sends GOAWAY on its tunnel connections and drains its connections
//!    (`--drain-timeout`); then it exits, and the successor forgets its cgroup.
//!
//! Any failure before taken leaves the predecessor serving as before.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use meshlet_proto::{
    cni_socket::{self, MAX_FDS},
    v1::{
        handover_message::Kind, HandoverEnd, HandoverHello, HandoverHost, HandoverMessage,
        HandoverPause, HandoverPaused, HandoverPod, HandoverReleased, HandoverTaken, ListenerKind,
    },
};
use nix::sys::socket::{self, SockFlag};
use tokio::io::unix::AsyncFd;

use crate::pods::{HandedPod, PodRegistry};

/// The wire's version.
pub const VERSION: u32 = 1;
/// How long either side waits for the other's next message, but for taken.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the predecessor waits for its successor to be ready (control plane, certificates)
/// before it resumes on its own; enrollment of new pods is paused meanwhile.
const TAKEN_TIMEOUT: Duration = Duration::from_secs(120);
/// Pods one handover may carry.
const MAX_PODS: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("handover: {0}")]
    Io(#[from] io::Error),
    #[error("handover: the other agent sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: String },
    #[error("handover: {0}")]
    Invalid(String),
}

impl From<nix::Error> for HandoverError {
    fn from(e: nix::Error) -> Self {
        Self::Io(e.into())
    }
}

fn send(socket: BorrowedFd<'_>, kind: Kind, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    cni_socket::send(socket, &HandoverMessage { kind: Some(kind) }, fds)
}

fn recv(socket: BorrowedFd<'_>) -> Result<(Kind, Vec<OwnedFd>), HandoverError> {
    let (message, fds) = cni_socket::recv::<HandoverMessage>(socket)?;
    let kind = message
        .kind
        .ok_or_else(|| HandoverError::Invalid("a message without a kind".into()))?;
    Ok((kind, fds))
}

fn name(kind: &Kind) -> String {
    match kind {
        Kind::Hello(_) => "hello",
        Kind::Pod(_) => "pod",
        Kind::Host(_) => "host",
        Kind::End(_) => "end",
        Kind::Taken(_) => "taken",
        Kind::Released(_) => "released",
        Kind::Pause(_) => "pause",
        Kind::Paused(_) => "paused",
    }
    .into()
}

/// Only root may be on the other end.
fn check_peer(socket: BorrowedFd<'_>) -> Result<(), HandoverError> {
    crate::local_caller::require_root(&socket)
        .map_err(|e| HandoverError::Invalid(format!("the other end: {e}")))
}

// ---------------------------------------------------------------------------------------
// The successor's side.

/// An agent that is handing this node over to this one, and what it handed.
pub struct Predecessor {
    socket: OwnedFd,
    /// Its cgroup (v2 id), for the programs.
    pub cgroup_id: u64,
    /// Its pods, with their namespaces and listening sockets.
    pub pods: Vec<HandedPod>,
    /// Its node-level listening sockets.
    pub host: Vec<(ListenerKind, OwnedFd)>,
}

impl Predecessor {
    /// Connects to the agent running on this node and receives what it hands over. `None`
    /// when no agent answers at `path` (a first start, or a restart after a crash: then the
    /// pods are adopted from the enrolled-pods file). Blocking.
    pub fn find(path: &Path, node: &str) -> Result<Option<Self>, HandoverError> {
        let socket = socket::socket(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        cni_socket::set_timeouts(socket.as_fd(), STEP_TIMEOUT)?;
        let addr = socket::UnixAddr::new(path)?;
        match socket::connect(socket.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
            Err(e) => {
                return Err(HandoverError::Socket {
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
        }
        check_peer(socket.as_fd())?;
        let (kind, _) = recv(socket.as_fd())?;
        let hello = match kind {
            Kind::Hello(hello) => hello,
            other => {
                return Err(HandoverError::Unexpected {
                    expected: "hello",
                    got: name(&other),
                })
            }
        };
        if hello.version != VERSION {
            return Err(HandoverError::Invalid(format!(
                "the running agent speaks handover version {}, this one {VERSION}; stop it first",
                hello.version
            )));
        }
        if hello.node != node {
            return Err(HandoverError::Invalid(format!(
                "the running agent serves node {:?}, this one was started for {node:?}",
                hello.node
            )));
        }
        if hello.pods > MAX_PODS {
            return Err(HandoverError::Invalid(format!(
                "{} pods is over {MAX_PODS}",
                hello.pods
            )));
        }
        let mut pods = Vec::new();
        let mut host = Vec::new();
        loop {
            let (kind, fds) = recv(socket.as_fd())?;
            match kind {
                Kind::Pod(pod) if pods.len() < hello.pods as usize => {
                    pods.push(handed_pod(pod, fds)?);
                }
                Kind::Host(message) if host.is_empty() => {
                    host = listeners(&message.listeners, fds)?;
                }
                Kind::End(_) => break,
                other => {
                    return Err(HandoverError::Unexpected {
                        expected: "pod, host or end",
                        got: name(&other),
                    })
                }
            }
        }
        Ok(Some(Self {
            socket,
            cgroup_id: hello.cgroup_id,
            pods,
            host,
        }))
    }

    /// Takes the host socket of `kind`, if the predecessor handed one.
    pub fn take_host(&mut self, kind: ListenerKind) -> Option<OwnedFd> {
        let at = self.host.iter().position(|(k, _)| *k == kind)?;
        Some(self.host.remove(at).1)
    }

    /// Asks the predecessor to stop accepting for a moment (until taken, or this agent goes):
    /// needed when this agent's programs record connections into maps of another layout,
    /// which the predecessor does not read. Blocking.
    pub fn pause(&self) -> Result<(), HandoverError> {
        send(self.socket.as_fd(), Kind::Pause(HandoverPause {}), &[])?;
        match recv(self.socket.as_fd())?.0 {
            Kind::Paused(_) => Ok(()),
            other => Err(HandoverError::Unexpected {
                expected: "paused",
                got: name(&other),
            }),
        }
    }

    /// Tells the predecessor that this agent accepts on every socket now. Returns the pods
    /// whose removal the predecessor was asked for meanwhile. Blocking.
    pub fn taken(&self) -> Result<Vec<String>, HandoverError> {
        send(self.socket.as_fd(), Kind::Taken(HandoverTaken {}), &[])?;
        match recv(self.socket.as_fd())?.0 {
            Kind::Released(released) => Ok(released.removed),
            other => Err(HandoverError::Unexpected {
                expected: "released",
                got: name(&other),
            }),
        }
    }

    /// Blocks until the predecessor has gone (it has drained and exited).
    pub fn wait_gone(self) {
        let _ = cni_socket::set_timeouts(self.socket.as_fd(), Duration::ZERO);
        let mut buf = [0u8; 64];
        loop {
            match nix::sys::socket::recv(
                self.socket.as_raw_fd(),
                &mut buf,
                socket::MsgFlags::empty(),
            ) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(nix::Error::EINTR | nix::Error::EAGAIN) => continue,
                Err(_) => return,
            }
        }
    }
}

/// One pod message: the namespace first, then the listeners in order.
fn handed_pod(pod: HandoverPod, fds: Vec<OwnedFd>) -> Result<HandedPod, HandoverError> {
    let mut fds = fds.into_iter();
    let netns = fds.next().ok_or_else(|| {
        HandoverError::Invalid(format!("pod {} came without its namespace", pod.uid))
    })?;
    let listeners = listeners(&pod.listeners, fds.collect())?
        .into_iter()
        .map(|(kind, fd)| (kind, socket2::Socket::from(fd)))
        .collect();
    Ok(HandedPod {
        uid: pod.uid,
        netns_path: PathBuf::from(pod.netns_path),
        netns: std::fs::File::from(netns),
        listeners,
    })
}

/// Pairs each descriptor with its kind; the counts must match.
fn listeners(
    kinds: &[i32],
    fds: Vec<OwnedFd>,
) -> Result<Vec<(ListenerKind, OwnedFd)>, HandoverError> {
    if kinds.len() != fds.len() {
        return Err(HandoverError::Invalid(format!(
            "{} listener kinds for {} descriptors",
            kinds.len(),
            fds.len()
        )));
    }
    kinds
        .iter()
        .zip(fds)
        .map(|(kind, fd)| {
            ListenerKind::try_from(*kind)
                .ok()
                .filter(|k| *k != ListenerKind::Unspecified)
                .map(|k| (k, fd))
                .ok_or_else(|| HandoverError::Invalid(format!("unknown listener kind {kind}")))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The predecessor's side.

/// What this agent hands over besides its pods.
pub struct Estate {
    pub node: String,
    pub cgroup_id: u64,
    /// Copies of the node-level listening sockets.
    pub host: Vec<(ListenerKind, OwnedFd)>,
}

/// Serves `handover.sock`, one successor at a time, until one has taken the node over. Then
/// the pods are released (nothing accepts on them here any more) and the connection to the
/// successor is returned: keep it open until this agent exits, which is how the successor
/// learns that it has gone. The caller starts the drain at once.
pub async fn serve(
    listener: AsyncFd<OwnedFd>,
    pods: Arc<PodRegistry>,
    estate: Estate,
    drain: crate::drain::Drain,
) -> OwnedFd {
    let estate = Arc::new(estate);
    loop {
        let conn = match accept(&listener).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("handover socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = check_peer(conn.as_fd()) {
            tracing::warn!(target: "audit", event = "handover_refused", "{e}");
            continue;
        }
        tracing::info!("a new agent asks to take the node over; pausing enrollment");
        let handed = match pods.begin_handover(STEP_TIMEOUT).await {
            Ok(handed) => handed,
            Err(e) => {
                tracing::warn!("handover not started: {e}");
                pods.abort_handover();
                continue;
            }
        };
        let offered = handed.len();
        let estate_for_offer = estate.clone();
        let registry = pods.clone();
        let offer = tokio::task::spawn_blocking(move || {
            offer(&conn, &handed, &estate_for_offer, &registry).map(|()| conn)
        })
        .await;
        let conn = match offer {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::warn!("handover failed, this agent carries on: {e}");
                pods.abort_handover();
                continue;
            }
            Err(e) => {
                tracing::error!("handover task: {e}");
                pods.abort_handover();
                continue;
            }
        };
        // Taken: the successor accepts on every socket. Stop here, tell it what it missed.
        drain.start();
        let removed = pods.release();
        tracing::info!(
            pods = offered,
            removed_meanwhile = removed.len(),
            "the node is handed over; draining"
        );
        if let Err(e) = send(
            conn.as_fd(),
            Kind::Released(HandoverReleased { removed }),
            &[],
        ) {
            tracing::warn!("cannot tell the successor which pods were removed: {e}");
        }
        return conn;
    }
}

/// Sends hello, the pods, the host sockets and end; waits for taken (pausing the pods'
/// listeners when asked). Blocking.
fn offer(
    conn: &OwnedFd,
    handed: &[HandedPod],
    estate: &Estate,
    pods: &PodRegistry,
) -> Result<(), HandoverError> {
    cni_socket::set_timeouts(conn.as_fd(), STEP_TIMEOUT)?;
    send(
        conn.as_fd(),
        Kind::Hello(HandoverHello {
            version: VERSION,
            node: estate.node.clone(),
            cgroup_id: estate.cgroup_id,
            pods: u32::try_from(handed.len()).unwrap_or(u32::MAX),
        }),
        &[],
    )?;
    for pod in handed {
        let mut fds = vec![pod.netns.as_fd()];
        fds.extend(pod.listeners.iter().map(|(_, s)| s.as_fd()));
        if fds.len() > MAX_FDS {
            return Err(HandoverError::Invalid(format!(
                "pod {} has {} sockets, over {MAX_FDS}",
                pod.uid,
                fds.len()
            )));
        }
        let message = HandoverPod {
            uid: pod.uid.clone(),
            netns_path: pod.netns_path.display().to_string(),
            listeners: pod.listeners.iter().map(|(k, _)| *k as i32).collect(),
        };
        send(conn.as_fd(), Kind::Pod(message), &fds)?;
    }
    let fds: Vec<BorrowedFd<'_>> = estate.host.iter().map(|(_, fd)| fd.as_fd()).collect();
    let message = HandoverHost {
        listeners: estate.host.iter().map(|(k, _)| *k as i32).collect(),
    };
    send(conn.as_fd(), Kind::Host(message), &fds)?;
    send(conn.as_fd(), Kind::End(HandoverEnd {}), &[])?;
    cni_socket::set_timeouts(conn.as_fd(), TAKEN_TIMEOUT)?;
    let mut paused = false;
    loop {
        match recv(conn.as_fd())?.0 {
            Kind::Taken(_) => return Ok(()),
            Kind::Pause(_) if !paused => {
                paused = true;
                pods.pause_accepting();
                tracing::info!("the new agent changes the map layout: pod listeners paused");
                cni_socket::set_timeouts(conn.as_fd(), STEP_TIMEOUT)?;
                send(conn.as_fd(), Kind::Paused(HandoverPaused {}), &[])?;
            }
            other => {
                return Err(HandoverError::Unexpected {
                    expected: "taken",
                    got: name(&other),
                })
            }
        }
    }
}

/// Accepts one connection on the handover socket (blocking mode, for the conversation).
async fn accept(listener: &AsyncFd<OwnedFd>) -> io::Result<OwnedFd> {
    loop {
        let mut guard = listener.readable().await?;
        match guard.try_io(|l| {
            socket::accept4(l.get_ref().as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                .map_err(io::Error::from)
        }) {
            Ok(Ok(fd)) => {
                // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
                return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_kinds_must_pair_up() {
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").expect("open"));
        assert!(listeners(&[ListenerKind::Admin as i32], vec![fd()]).is_ok());
        assert!(listeners(&[ListenerKind::Admin as i32], vec![]).is_err());
        assert!(listeners(&[], vec![fd()]).is_err());
        assert!(listeners(&[0], vec![fd()]).is_err());
        assert!(listeners(&[99], vec![fd()]).is_err());
        let pod = HandoverPod {
            uid: "p".into(),
            netns_path: "/x".into(),
            listeners: vec![],
        };
        assert!(handed_pod(pod, vec![]).is_err());
    }

    #[test]
    fn no_agent_listening_means_no_predecessor() {
        let path =
            std::env::temp_dir().join(format!("meshlet-handover-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        assert!(matches!(Predecessor::find(&path, "node-1"), Ok(None)));
    }
}
