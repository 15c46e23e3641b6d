//! The CNI socket: `meshlet-cni` hands each new pod's network namespace here (as a file
//! descriptor, `SCM_RIGHTS`) and waits until capture is in place before the runtime starts
//! the pod's containers. This is how a mesh pod never runs a single instruction uncaptured:
//! if the agent cannot enroll the pod, ADD fails and the runtime tries the sandbox again.
//!
//! One request per connection, root callers only, a deadline per connection and a cap on
//! connections at once. The wire is [`meshlet_proto::cni_socket`].
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use meshlet_proto::{
    cni_socket,
    v1::{cni_reply::Outcome, cni_request::Command, CniReply, CniRequest},
};
use nix::sys::socket::{self, Backlog, SockFlag, UnixAddr};
use tokio::io::unix::AsyncFd;

use crate::{pods::PodRegistry, state::Membership};

/// How long one caller may take, from accept to reply (an ADD waits for the pod's
/// listeners, routing and capture: milliseconds; the plugin gives up sooner).
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Callers served at once; more wait in the listen backlog.
const MAX_CALLERS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CniSocketError {
    #[error("cannot open the CNI socket {path}: {source}")]
    Bind { path: PathBuf, source: nix::Error },
}

/// Binds the CNI socket (0600, made under a 0177 umask) at `path`.
pub fn bind(path: &Path) -> Result<AsyncFd<OwnedFd>, CniSocketError> {
    let error = |source| CniSocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let fd = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(error)?;
    let addr = UnixAddr::new(path).map_err(error)?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = socket::bind(fd.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    bound.map_err(error)?;
    socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN)).map_err(error)?;
    register(fd).map_err(|e| error(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))
}

/// Takes the CNI socket a predecessor handed over (see `handover`) when it is the one bound
/// at `path`; `None` otherwise (the caller binds its own).
pub fn adopt(fd: OwnedFd, path: &Path) -> Option<AsyncFd<OwnedFd>> {
    let bound = socket::getsockname::<UnixAddr>(fd.as_raw_fd()).ok()?;
    if bound.path() != Some(path) {
        return None;
    }
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).ok()?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
    register(fd).ok()
}

/// Hands a socket to the runtime's reactor.
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and returns the same descriptor
    // until the AsyncFd is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Serves the CNI socket until the task is dropped.
pub async fn serve(listener: AsyncFd<OwnedFd>, pods: Arc<PodRegistry>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CALLERS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = match listener.readable().await {
            Ok(mut guard) => match guard.try_io(|l| {
                socket::accept4(
                    l.get_ref().as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(Ok(fd)) => {
                    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                }
                Ok(Err(e)) => {
                    tracing::warn!("CNI socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_would_block) => continue,
            },
            Err(e) => {
                tracing::error!("CNI socket: {e}");
                return;
            }
        };
        if !caller_is_root(&conn) {
            continue;
        }
        let pods = pods.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CALL_DEADLINE, serve_one(conn, &pods)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("CNI socket: {e}"),
                Err(_) => {
                    tracing::warn!("CNI socket: a caller took over {CALL_DEADLINE:?}; dropped")
                }
            }
        });
    }
}

/// Only root on this node may enroll or remove pods.
fn caller_is_root(conn: &OwnedFd) -> bool {
    crate::local_caller::require_root(conn)
        .inspect_err(|e| {
            tracing::warn!(target: "audit", event = "cni_caller_refused", error = %e,
                "refused a CNI-socket caller")
        })
        .is_ok()
}

async fn serve_one(conn: OwnedFd, pods: &PodRegistry) -> std::io::Result<()> {
    let conn = register(conn)?;
    let (request, mut fds) = loop {
        let mut guard = conn.readable().await?;
        match guard.try_io(|c| cni_socket::recv::<CniRequest>(c.get_ref().as_fd())) {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(result) => break result?,
            Err(_would_block) => continue,
        }
    };
    let netns = if fds.len() <= 1 { fds.pop() } else { None };
    let reply = if fds.is_empty() {
        handle(&request, netns, pods).await
    } else {
        failed("a CNI request carries at most one descriptor (the pod's network namespace)")
    };
    match reply.outcome() {
        Outcome::Unspecified => {}
        Outcome::Failed => {
            tracing::warn!(pod = %request.pod_uid, container = %request.container_id,
            command = ?request.command(), "CNI request failed: {}", reply.message)
        }
        outcome => tracing::info!(pod = %request.pod_uid, container = %request.container_id,
            command = ?request.command(), ?outcome, "{}", reply.message),
    }
    loop {
        let mut guard = conn.writable().await?;
        match guard.try_io(|c| cni_socket::send(c.get_ref().as_fd(), &reply, &[])) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

fn failed(message: impl Into<String>) -> CniReply {
    CniReply {
        outcome: Outcome::Failed.into(),
        message: message.into(),
        netns_cookie: 0,
    }
}

/// What one request does.
async fn handle(request: &CniRequest, netns: Option<OwnedFd>, pods: &PodRegistry) -> CniReply {
    let uid = request.pod_uid.as_str();
    match request.command() {
        Command::Add => {
            if uid.is_empty() || request.pod_namespace.is_empty() {
                return failed("ADD needs the pod's uid and namespace (CNI_ARGS K8S_POD_UID and K8S_POD_NAMESPACE)");
            }
            let Some(netns) = netns else {
                return failed("ADD needs the pod's network namespace as a descriptor");
            };
            let membership = pods
                .agent()
                .state
                .current()
                .membership(uid, &request.pod_namespace);
            match membership {
                None => failed(
                    "the agent has no state from the control plane yet, so it cannot tell whether this pod is in the mesh; the runtime will retry (see `meshlet status` for the control plane)",
                ),
                Some(Membership::Outside(reason)) => CniReply {
                    outcome: Outcome::NotInMesh.into(),
                    message: reason,
                    netns_cookie: 0,
                },
                Some(Membership::Mesh) => {
                    match pods
                        .add_netns(uid, std::fs::File::from(netns), Path::new(&request.netns_path))
                        .await
                    {
                        Ok(cookie) => CniReply {
                            outcome: Outcome::Enrolled.into(),
                            message: format!(
                                "pod {}/{} enrolled: capture is in place",
                                request.pod_namespace, request.pod_name
                            ),
                            netns_cookie: cookie,
                        },
                        Err(e) => failed(e.to_string()),
                    }
                }
            }
        }
        Command::Del => {
            let removed = !uid.is_empty() && pods.remove(uid);
            CniReply {
                outcome: Outcome::Removed.into(),
                message: if removed {
                    format!("pod {uid} unenrolled")
                } else {
                    format!("pod {uid:?} was not enrolled")
                },
                netns_cookie: 0,
            }
        }
        Command::Check => {
            let enrolled = pods.enrolled_netns(uid);
            let same = match (&enrolled, &netns) {
                (Some(id), Some(fd)) => crate::netns::NetnsId::of(fd).is_ok_and(|n| n == *id),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if same {
                return CniReply {
                    outcome: Outcome::Enrolled.into(),
                    message: format!("pod {uid} is enrolled"),
                    netns_cookie: 0,
                };
            }
            match pods
                .agent()
                .state
                .current()
                .membership(uid, &request.pod_namespace)
            {
                Some(Membership::Outside(reason)) if enrolled.is_none() => CniReply {
                    outcome: Outcome::NotInMesh.into(),
                    message: reason,
                    netns_cookie: 0,
                },
                _ if enrolled.is_some() => failed(format!(
                    "pod {uid} is enrolled in another network namespace than the runtime's"
                )),
                _ => failed(format!(
                    "pod {uid} is in the mesh but not enrolled on this node"
                )),
            }
        }
        Command::Status => CniReply {
            outcome: Outcome::Unspecified.into(),
            message: "meshlet agent ready".into(),
            netns_cookie: 0,
        },
        Command::Unspecified => {
            failed("unknown command: this agent and meshlet-cni are of different versions")
        }
    }
}
