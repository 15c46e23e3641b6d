//! Types and constants shared by meshlet's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel programs write it into maps and the
//! agent reads it back, so both sides must agree on the layout byte for byte.
#![no_std]

/// The agent's outbound listener inside every enrolled pod's network namespace. `connect()`
/// calls from the pod are rewritten to `127.0.0.1:OUTBOUND_PORT` (or `[::1]`).
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's plaintext inbound listener in every enrolled pod's network namespace: the
/// `sk_lookup` program hands it every TCP connection that arrives from outside the pod for an
/// app port, so that the agent decides (mTLS mode, authorization) before the app sees a byte.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// The agent's own ports inside a pod: apps may not bind them and inbound capture skips them.
pub const AGENT_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, TUNNEL_PORT];
/// The agent's mTLS tunnel (HBONE) listener on the pod's own address.
pub const TUNNEL_PORT: u16 = 15008;

/// `SO_MARK` on every socket the agent opens towards the network on a pod's behalf (tunnels),
/// for the operator's own routing and filtering. The redirect does not trust it (a pod can set
/// any mark): it knows the agent by its cgroup.
pub const AGENT_MARK: u32 = 0x6d6c_0001;
/// `SO_MARK` on the agent's delivery sockets (the ones that connect to the app with the
/// client's source address). A policy-routing rule in the pod sends the app's replies to those
/// foreign addresses back to the local stack; it must not match tunnel sockets.
pub const DELIVER_MARK: u32 = 0x6d6c_0002;

/// Where an application meant to connect to, before the redirect.
///
/// `ip` is an IPv6 address in network byte order as four `u32`s, exactly as the kernel hands
/// `user_ip6` to BPF programs; IPv4 destinations are stored IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    /// The network namespace cookie of the socket that connected; lets the sock_ops program
    /// file the entry under a key without asking the kernel again.
    pub _pad2: u32,
    pub netns_cookie: u64,
}

/// Key under which the original destination waits for the agent: the connecting socket's
/// network namespace and its local address, which the agent sees as the peer of the accepted
/// socket. Unique for as long as the connection lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub netns_cookie: u64,
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

impl ConnectionKey {
    pub const fn new(netns_cookie: u64, ip: [u32; 4], port: u16) -> Self {
        Self {
            netns_cookie,
            ip,
            port,
            _pad: [0; 6],
        }
    }
}

/// Value in the enrollment map (keyed by netns cookie). Non-zero flags are reserved.
pub type EnrollmentFlags = u32;

/// Value in the inbound capture map (keyed by a pod address, IPv4-mapped for IPv4): whether
/// the pod's inbound TCP to that address goes to the agent (`CAPTURE`) or straight to the app
/// (`CAPTURE_PASS`, a DISABLE pod). An address of an enrolled pod that the map does not hold
/// is unknown to the agent, and connections to it are dropped (fail closed).
pub type CaptureFlags = u32;
/// See [`CaptureFlags`].
pub const CAPTURE: CaptureFlags = 1;
/// See [`CaptureFlags`].
pub const CAPTURE_PASS: CaptureFlags = 0;

/// A connection the agent itself is making to an app inside a pod (a delivery), which inbound
/// capture must let through. Seen from the pod: the app's address and port are local, the
/// (foreign, transparent) source the agent bound is remote. The kernel cannot tell this SYN
/// from one that came over the wire (locally routed packets report the pod interface as their
/// ingress), so the agent names each delivery here for the few microseconds of its handshake.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
}

/// A kubelet probe's way past inbound capture: connections from `source` (a node address the
/// operator exempted) to `destination:port` (a pod address and one of its probe ports, from
/// the control plane). Nothing else from that source is let through: not other ports, not
/// other pods' ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExemptKey {
    pub source: [u32; 4],
    pub destination: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Indexes of the per-CPU redirect counters in the `STATS` map.
pub mod stats {
    /// A connect() from an enrolled pod was rewritten to the agent.
    pub const REDIRECTED: u32 = 0;
    /// A connect() in an enrolled netns came from the agent itself (by cgroup): left alone.
    pub const SKIPPED_AGENT: u32 = 1;
    /// The original destination was filed under the connection key (sock_ops).
    pub const ORIGINAL_DST_RECORDED: u32 = 2;
    /// The original destination could not be saved; the connect() was refused (fail closed).
    pub const REFUSED_NO_SPACE: u32 = 3;
    /// getpeername() answered with the original destination.
    pub const PEERNAME_REWRITTEN: u32 = 4;
    /// An inbound connection from outside a pod was handed to the agent (sk_lookup).
    pub const INBOUND_CAPTURED: u32 = 5;
    /// An inbound connection to a captured pod found no agent listener and was dropped
    /// (fail closed: the agent is gone or restarting).
    pub const INBOUND_DROPPED: u32 = 6;
    /// A pod's bind() to one of the agent's ports was refused.
    pub const BIND_REFUSED: u32 = 7;
    /// An established redirected connection's original destination could not be filed for
    /// the agent (map full); the agent refuses it.
    pub const ORIGINAL_DST_LOST: u32 = 8;
    /// An inbound connection from outside a captured pod to an address the agent does not
    /// know (added after enrollment, link-local) was dropped (fail closed).
    pub const INBOUND_UNKNOWN_ADDRESS: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;
}

/// Builds the IPv4-mapped form of an IPv4 address given in network byte order.
pub const fn ipv4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::OriginalDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectionKey {}
    // SAFETY: as above (36 bytes, no padding).
    unsafe impl aya::Pod for super::DeliveryKey {}
    // SAFETY: as above (36 bytes, explicit padding).
    unsafe impl aya::Pod for super::ExemptKey {}
}
