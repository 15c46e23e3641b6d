//! The CNI socket's wire: a `SOCK_SEQPACKET` unix socket on which `meshlet-cni` sends one
//! [`CniRequest`] (with the pod's network namespace as an `SCM_RIGHTS` descriptor on ADD)
//! and the agent answers one [`CniReply`]. One message is one packet, so there is no framing
//! to get wrong; a packet larger than [`MAX_MESSAGE`] is refused, not cut.
//!
//! The handover socket between two agents of one node (`HandoverMessage`, with listening
//! sockets as descriptors) uses the same wire.
use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::v1::{CniReply, CniRequest};

/// The largest message either side sends or takes.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Most descriptors one message may carry (a CNI request carries at most one; a handover
/// message a pod's namespace and its listeners).
pub const MAX_FDS: usize = 16;

/// Sysctls of a pod's network namespace that delivery needs: (path, value, required).
///
/// - `tcp_fwmark_accept`: accepted sockets carry the mark of the SYN, so that an app's replies
///   to a delivered connection (from the client's own address) route back to the agent.
/// - `fwmark_reflect`: replies the kernel makes without a socket (a RST for a closed port, an
///   ICMP error) take the mark of the packet they answer, so that a delivery to a closed port
///   is refused at once instead of timing out (IPv6 only when the pod has IPv6).
///
/// meshlet-cni sets them at ADD, as root on the host: the agent's container sees `/proc/sys`
/// read-only, as every unprivileged container does. The agent checks them and sets them
/// itself only where it can (the node API's AddPod outside a container).
pub const POD_SYSCTLS: &[(&str, &str, bool)] = &[
    ("/proc/sys/net/ipv4/tcp_fwmark_accept", "1", true),
    ("/proc/sys/net/ipv4/fwmark_reflect", "1", true),
    ("/proc/sys/net/ipv6/fwmark_reflect", "1", false),
];

/// Makes [`POD_SYSCTLS`] hold in the calling thread's network namespace: each is read, and
/// written only when it differs. A required one that is wrong and cannot be written is an
/// error naming it.
pub fn ensure_pod_sysctls() -> io::Result<()> {
    for (path, value, required) in POD_SYSCTLS {
        let current = std::fs::read_to_string(path);
        if current.as_deref().ok().map(str::trim) == Some(*value) {
            continue;
        }
        if let Err(e) = std::fs::write(path, value) {
            if *required {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{path} is not {value} and cannot be set ({e}); meshlet-cni sets it at ADD"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Bounds every blocking send and receive on `socket` by `timeout` (zero: no bound).
pub fn set_timeouts(socket: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs().try_into().unwrap_or(i64::MAX),
        timeout.subsec_micros().into(),
    );
    socket::setsockopt(&socket, socket::sockopt::SendTimeout, &tv)?;
    socket::setsockopt(&socket, socket::sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

/// Sends `message`, with `fds` attached (at most [`MAX_FDS`]).
pub fn send(
    socket: BorrowedFd<'_>,
    message: &impl prost::Message,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let bytes = message.encode_to_vec();
    if bytes.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes is over {MAX_MESSAGE}", bytes.len()),
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one message, over {MAX_FDS}", fds.len()),
        ));
    }
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    socket::sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and the descriptors that came with it (owned: dropped, they close).
/// A would-block socket gives `ErrorKind::WouldBlock`; a closed one `UnexpectedEof`.
pub fn recv<M: prost::Message + Default>(socket: BorrowedFd<'_>) -> io::Result<(M, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let (bytes, flags) = (msg.bytes, msg.flags);
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for this
                // message; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || bytes > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message over {MAX_MESSAGE} bytes or {MAX_FDS} descriptors"),
        ));
    }
    if bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let message = M::decode(&buf[..bytes]).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a valid message: {e}"),
        )
    })?;
    Ok((message, fds))
}

/// The plugin's side: connects to the agent's CNI socket, sends `request` (with `netns`
/// attached) and waits at most `timeout` in all for the reply.
pub fn call(
    path: &Path,
    request: &CniRequest,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> io::Result<CniReply> {
    use std::os::fd::AsFd;
    let socket = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    set_timeouts(socket.as_fd(), timeout)?;
    socket::connect(socket.as_raw_fd(), &UnixAddr::new(path)?)?;
    send(socket.as_fd(), request, netns.as_slice())?;
    let (reply, _fds) = recv::<CniReply>(socket.as_fd())?;
    Ok(reply)
}
