//! The last hop: connect to the app inside its pod, from the tunnel client's own address, so
//! that the app sees who really called (`IP_TRANSPARENT`). The app's replies to that foreign
//! address are steered back to the local stack by a fwmark rule the agent installs per pod.
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use meshlet_common::DELIVER_MARK;
use socket2::Socket;
use tokio::net::{TcpSocket, TcpStream};

use crate::{netns::Netns, redirect::Redirect};

/// Routing table that sends everything to the local stack, for delivery sockets' replies.
pub const DELIVER_TABLE: u32 = 15_000;
/// SYN retransmissions before a delivery gives up (`TCP_SYNCNT`). The app is in the same
/// namespace, so only a full accept queue drops our SYN; after two retries (1 s, then 2 s) the
/// connect fails with `ETIMEDOUT` about 7 s after it began. The kernel keeps this bound rather
/// than a runtime timer: a timer per delivery woke the runtime's I/O driver (an eventfd write,
/// then an extra `epoll_wait`) on every connection.
const SYN_RETRIES: libc::c_int = 2;

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

/// Tries at most this many source ports per delivery (each try that fails costs a socket and
/// a bind or a refused connect, a few microseconds, no packet).
const PORT_ATTEMPTS: usize = 32;

/// Connects to `dst` inside the pod, with `src` (the remote client's address) as source and
/// any local port but `avoid_port`.
///
/// The source port is ours to pick, at random in the pod's ephemeral range, with
/// `SO_REUSEADDR`: a delivery socket usually closes first (the remote client did), so it is the
/// delivery that leaves a TIME_WAIT in the pod, and the kernel's own pick at `bind(port 0)`
/// needs a port nobody holds, TIME_WAITs included. Some 14 000 of them (a minute of 250 new
/// connections a second from one client address) made every such bind search the range, and
/// deliveries fell to ~1 000 a second. An explicit port with `SO_REUSEADDR` binds over
/// TIME_WAITs, and `connect` takes a TIME_WAIT of the same 4-tuple over (with TCP timestamps,
/// as for `tcp_tw_reuse`); it refuses a 4-tuple in use (`EADDRNOTAVAIL`), and we try another
/// port. The port must be known before the SYN anyway: the `DELIVERIES` pass that lets our
/// SYN past inbound capture names it.
pub async fn connect_to_app(
    redirect: &Redirect,
    netns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    avoid_port: Option<u16>,
) -> Result<TcpStream, DeliverError> {
    let socket_error = |source| DeliverError::Socket {
        netns: netns.path().display().to_string(),
        source,
    };
    let ports = netns.ephemeral_ports();
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), ports.clone());
        if Some(port) == avoid_port {
            continue;
        }
        let (socket, from) = match transparent_socket(netns.tcp_socket(dst).await?, src, port, dst)
        {
            Ok(bound) => bound,
            // Held by a socket we may not share it with (an app's listener, say).
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                last_error = Some(e);
                continue;
            }
            Err(e) => return Err(socket_error(e)),
        };
        // Our own SYN to the app must not be captured as if it came from outside.
        let pass = redirect.delivery_pass(from, dst)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let connected = socket.connect(dst).await;
        drop(pass);
        match connected {
            Ok(stream) => return Ok(stream),
            // This very 4-tuple is in use (or in TIME_WAIT without timestamps): another port.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => last_error = Some(e),
            Err(source) => return Err(DeliverError::Connect { dst, source }),
        }
    }
    Err(socket_error(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "no free source port for delivery in {}-{} after {PORT_ATTEMPTS} tries (last: {})",
            ports.start(),
            ports.end(),
            last_error
                .map(|e| e.to_string())
                .unwrap_or_else(|| "none".into())
        ),
    )))
}

/// Makes a fresh socket of the pod's namespace a delivery socket: marked, transparent,
/// sharing ports with TIME_WAITs, bound to the remote client's address and `port`; with the
/// address it is bound to.
fn transparent_socket(
    socket: io::Result<Socket>,
    src: IpAddr,
    port: u16,
    dst: SocketAddr,
) -> io::Result<(Socket, SocketAddr)> {
    let socket = socket?;
    socket.set_mark(DELIVER_MARK)?;
    match dst {
        SocketAddr::V4(_) => socket.set_ip_transparent(true)?,
        SocketAddr::V6(_) => set_int_option(&socket, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?,
    }
    socket.set_reuse_address(true)?;
    set_int_option(&socket, libc::IPPROTO_TCP, libc::TCP_SYNCNT, SYN_RETRIES)?;
    let src = match (src, dst) {
        // A v4 client reaching a v6-addressed app (or the reverse) keeps the app's family.
        (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (IpAddr::V6(v6), SocketAddr::V4(_)) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        (src, _) => src,
    };
    let from = SocketAddr::new(src, port);
    socket.bind(&from.into())?;
    socket.set_nodelay(true)?;
    Ok((socket, from))
}

/// An int socket option that socket2 has no setter for.
fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd and an int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
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
            meshlet_proto::cni_socket::ensure_pod_sysctls()?;
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
        // The agent's listeners are on the pod's loopback, and delivery routes through it.
        // Runtimes bring `lo` up themselves, but a chain that leaves it down (ptp does) must
        // not leave the pod unreachable.
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(|e| routing(format!("bringing lo up: {e}")))?;
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

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, TcpListener},
    };

    use super::*;
    use crate::netns::{private_netns, Netns};

    /// `TCP_SYNCNT` of a socket (socket2 has no getter).
    fn syn_retries(socket: &Socket) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, and an int-sized buffer whose size we pass.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_SYNCNT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt(TCP_SYNCNT)");
        value
    }

    /// What `connect_to_app` relies on, in a namespace of the test's own: a port whose
    /// delivery is in TIME_WAIT cannot be bound without `SO_REUSEADDR`; a delivery socket
    /// binds it, reconnects the very same 4-tuple (the kernel takes a TIME_WAIT over for an
    /// explicitly bound port when timestamps are on) and reaches another destination from it.
    /// (The namespace is the test's own and goes with it.)
    #[tokio::test]
    async fn a_delivery_port_in_time_wait_is_reused() {
        let (path, _end) = private_netns();
        let netns = Netns::open(&path).expect("open the namespace");
        let outcome = netns
            .run(
                || -> io::Result<(bool, Option<io::ErrorKind>, bool, bool)> {
                    // Not 127/8: the kernel reuses loopback TIME_WAITs anyway (tcp_tw_reuse=2).
                    let (app_ip, client_ip) =
                        (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
                    for args in [
                        "link set lo up",
                        "addr add 10.1.0.1/32 dev lo",
                        "addr add 10.1.0.2/32 dev lo",
                    ] {
                        let ok = std::process::Command::new("ip")
                            .args(args.split(' '))
                            .status()?
                            .success();
                        assert!(ok, "ip {args} failed");
                    }
                    let first = TcpListener::bind((app_ip, 0))?;
                    let second = TcpListener::bind((app_ip, 0))?;
                    let (to_first, to_second) = (first.local_addr()?, second.local_addr()?);
                    let connect = |dst: SocketAddr| -> io::Result<Socket> {
                        let (socket, _) = transparent_socket(
                            Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None),
                            client_ip.into(),
                            45_000,
                            dst,
                        )?;
                        assert_eq!(
                            syn_retries(&socket),
                            SYN_RETRIES,
                            "the kernel bounds a delivery's connect"
                        );
                        socket.connect(&dst.into())?;
                        Ok(socket)
                    };
                    // A delivery that closes first, as deliveries do: it ends in TIME_WAIT.
                    let mut delivery = connect(to_first)?;
                    let (mut app, _) = first.accept()?;
                    delivery.write_all(b"bye")?;
                    delivery.shutdown(std::net::Shutdown::Write)?;
                    let mut seen = Vec::new();
                    app.read_to_end(&mut seen)?;
                    drop(app);
                    let mut rest = Vec::new();
                    delivery.read_to_end(&mut rest)?;
                    drop(delivery);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    let time_wait = std::process::Command::new("ss")
                        .args(["-Htan", "state", "time-wait", "sport", "= :45000"])
                        .output()?;
                    let in_time_wait = !time_wait.stdout.is_empty();
                    // What bind(port) meets without SO_REUSEADDR (bind(port 0) skips such ports).
                    let plain = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    let plain_bind = plain
                        .bind(&SocketAddr::new(client_ip.into(), 45_000).into())
                        .err()
                        .map(|e| e.kind());
                    // The same 4-tuple again: an explicitly bound port with timestamps on takes the
                    // TIME_WAIT over; and the port to another destination.
                    let same = connect(to_first).is_ok();
                    let other = connect(to_second).is_ok();
                    Ok((in_time_wait, plain_bind, same, other))
                },
            )
            .await
            .expect("run in the namespace")
            .expect("sockets");
        let (in_time_wait, plain_bind, same_4_tuple, other_destination) = outcome;
        assert!(in_time_wait, "the first delivery did not end in TIME_WAIT");
        assert_eq!(plain_bind, Some(io::ErrorKind::AddrInUse));
        assert!(same_4_tuple, "the TIME_WAIT 4-tuple was not taken over");
        assert!(
            other_destination,
            "the port was not reused for another destination"
        );
    }
}
