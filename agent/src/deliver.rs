//! The last hop: connect to the app inside its pod, from the tunnel client's own address, so
//! that the app sees who really called (`IP_TRANSPARENT`). The app's replies to that foreign
//! address are steered back to the local stack by a fwmark rule the agent installs per pod.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use meshlet_common::DELIVER_MARK;
use socket2::Socket;
use tokio::net::{TcpSocket, TcpStream};

use crate::{netns::Netns, redirect::Redirect};

/// Routing table that sends everything to the local stack, for delivery sockets' replies.
pub const DELIVER_TABLE: u32 = 15_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot create the delivery socket in {netns}: {source}")]
    Socket { netns: String, source: io::Error },
    #[error("the app at {dst} refused or did not answer: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("cannot let the delivery past inbound capture: {0}")]
    Pass(#[from] crate::redirect::RedirectError),
    #[error("cannot set up delivery routing in {netns}: {reason}")]
    Routing { netns: String, reason: String },
}

/// Connects to `dst` inside the pod, with `src` (the remote client's address) as source and
/// any local port but `avoid_port`.
pub async fn connect_to_app(
    redirect: &Redirect,
    netns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    avoid_port: Option<u16>,
) -> Result<TcpStream, DeliverError> {
    let name = netns.path().display().to_string();
    let socket_error = |source| DeliverError::Socket {
        netns: name.clone(),
        source,
    };
    // The kernel picks the port at bind(); on the rare pick of the avoided one, again.
    let mut socket = None;
    for _ in 0..8 {
        let candidate =
            transparent_socket(netns.tcp_socket(dst).await?, src, dst).map_err(socket_error)?;
        let port = candidate
            .local_addr()
            .map_err(socket_error)?
            .as_socket()
            .map(|a| a.port());
        if avoid_port.is_none() || port != avoid_port {
            socket = Some(candidate);
            break;
        }
    }
    let socket = socket.ok_or_else(|| {
        socket_error(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free source port for delivery",
        ))
    })?;
    let from = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| DeliverError::Socket {
            netns: netns.path().display().to_string(),
            source: io::Error::other("the delivery socket has no local address"),
        })?;
    // Our own SYN to the app must not be captured as if it came from outside.
    let pass = redirect.delivery_pass(from, dst)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await;
    drop(pass);
    match connected {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(DeliverError::Connect { dst, source }),
        Err(_) => Err(DeliverError::Connect {
            dst,
            source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        }),
    }
}

/// Makes a fresh socket of the pod's namespace a delivery socket: marked, transparent, bound
/// to the remote client's address.
fn transparent_socket(
    socket: io::Result<Socket>,
    src: IpAddr,
    dst: SocketAddr,
) -> io::Result<Socket> {
    let socket = socket?;
    socket.set_mark(DELIVER_MARK)?;
    match dst {
        SocketAddr::V4(_) => socket.set_ip_transparent(true)?,
        SocketAddr::V6(_) => set_ipv6_transparent(&socket)?,
    }
    let src = match (src, dst) {
        // A v4 client reaching a v6-addressed app (or the reverse) keeps the app's family.
        (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (IpAddr::V6(v6), SocketAddr::V4(_)) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        (src, _) => src,
    };
    socket.bind(&SocketAddr::new(src, 0).into())?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn set_ipv6_transparent(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: valid fd and an int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// In the pod: accepted sockets take the SYN's mark (`tcp_fwmark_accept`), and packets with
/// `DELIVER_MARK` look up a table whose only route is "everything is local". So the app's
/// replies to a delivery socket's foreign source address come back to the agent instead of
/// leaving by eth0. All through netlink and the pod's own sysctl.
pub async fn setup_routing(netns: &Netns) -> Result<(), DeliverError> {
    use futures::TryStreamExt;
    use netlink_packet_route::route::{RouteScope, RouteType};
    use rtnetlink::RouteMessageBuilder;

    let name = netns.path().display().to_string();
    let routing = |reason: String| DeliverError::Routing {
        netns: name.clone(),
        reason,
    };
    let runtime = tokio::runtime::Handle::current();
    let (connection, handle) = netns
        .run(move || -> io::Result<_> {
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
            // The netlink socket must be made in the pod's netns; it needs the runtime's reactor.
            let _guard = runtime.enter();
            let (connection, handle, _) = rtnetlink::new_connection()?;
            Ok((connection, handle))
        })
        .await?
        .map_err(|e| routing(format!("netlink/sysctl: {e}")))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let lo = handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| routing(format!("finding lo: {e}")))?
            .ok_or_else(|| routing("no lo interface".into()))?
            .header
            .index;
        let rule = handle
            .rule()
            .add()
            .v4()
            .fw_mark(DELIVER_MARK)
            .table_id(DELIVER_TABLE)
            .priority(100)
            .action(netlink_packet_route::rule::RuleAction::ToTable)
            .execute()
            .await;
        ignore_exists(rule).map_err(|e| routing(format!("fwmark rule: {e}")))?;
        let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(std::net::Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(DELIVER_TABLE)
            .output_interface(lo)
            .build();
        ignore_exists(handle.route().add(route).execute().await)
            .map_err(|e| routing(format!("local route: {e}")))?;
        // IPv6 alike, when the pod has IPv6 at all.
        let rule6 = handle
            .rule()
            .add()
            .v6()
            .fw_mark(DELIVER_MARK)
            .table_id(DELIVER_TABLE)
            .priority(100)
            .action(netlink_packet_route::rule::RuleAction::ToTable)
            .execute()
            .await;
        let route6 = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(std::net::Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(DELIVER_TABLE)
            .output_interface(lo)
            .build();
        let route6 = handle.route().add(route6).execute().await;
        if let Err(e) = ignore_exists(rule6).and(ignore_exists(route6)) {
            tracing::debug!(netns = %name, "no IPv6 delivery routing: {e}");
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

fn ignore_exists(result: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}
