//! meshlet's kernel side: steer every TCP `connect()` of an enrolled pod to the agent's
//! outbound listener in that pod's own network namespace, and remember where it was going.
//!
//! The flow for one connection:
//! 1. `connect4`/`connect6` (cgroup/connect*, attached to the node's pod cgroup subtree): the
//!    socket's netns is enrolled and the caller is not the agent (by cgroup), so the destination is saved
//!    under the socket cookie and rewritten to `127.0.0.1:15001` (`[::1]:15001`); an IPv4
//!    socket is also bound to a loopback source of that destination's own (`bind_loopback_source`).
//! 2. `sock_ops` at active-established: the client's local address is now known, so the saved
//!    destination is filed under (netns cookie, client address, client port), the peer address
//!    the agent sees on the accepted socket. It runs before the client ACKs the SYN-ACK, so the
//!    entry exists before the agent can accept: no race.
//! 3. `getpeername4/6`: the app sees the peer it dialled, not the agent.
//! 4. `sock_ops` at close: both entries go, so the maps do not fill with dead connections
//!    (state callbacks are asked for at the connect, so failed connects are cleaned up too).
//!
//! Inbound, `inbound_capture` (sk_lookup, attached to each enrolled pod's netns) hands every
//! TCP connection that arrives from outside the pod for an app port to the agent's listener on
//! 15006 in that netns, so the agent decides (mTLS mode, authorization) before the app sees a
//! byte. `bind4`/`bind6` keep apps off the agent's ports.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            bpf_sock_addr, sockaddr, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
            BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        },
        helpers::{
            bpf_bind, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        },
        macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
        maps::{Array, HashMap, PerCpuArray, SockHash},
        programs::{SkLookupContext, SockAddrContext, SockOpsContext},
        EbpfContext,
    };
    use aya_log_ebpf::{debug, warn};
    use meshlet_common::{
        ipv4_mapped, stats, CaptureFlags, ConnectionKey, DeliveryKey, EnrollmentFlags, ExemptKey,
        OriginalDst, AGENT_PORTS, CAPTURE, OUTBOUND_PORT,
    };

    const IPPROTO_TCP: u32 = 6;
    const AF_INET: u32 = 2;
    const TCP_CLOSE: u32 = 7;
    /// Return values of cgroup sock_addr programs.
    const ALLOW: i32 = 1;
    const REFUSE: i32 = 0;
    const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

    /// Network namespaces (by cookie) of the pods this node's agent has enrolled.
    #[map(name = "ENROLLED")]
    static ENROLLED: HashMap<u64, EnrollmentFlags> = HashMap::pinned(16_384, 0);

    /// Original destination by socket cookie, for sock_ops and getpeername. A plain hash, not
    /// an LRU: under an LRU one pod's churn evicted other pods' entries, and their connections
    /// were refused or lost their peer name. Entries go when their socket closes (sock_ops
    /// asks for state callbacks from the connect on); when the map is full, new connects are
    /// refused and counted (fail closed). Sized for the node by the agent
    /// (`--max-redirected-connections`); not preallocated.
    #[map(name = "ORIG_DST_BY_COOKIE_V2")]
    static ORIG_DST_BY_COOKIE: HashMap<u64, OriginalDst> =
        HashMap::pinned(262_144, BPF_F_NO_PREALLOC);

    /// Original destination by connection key, for the agent (which takes the entry when it
    /// accepts the connection). A failed insert is counted; the agent then refuses the
    /// connection.
    #[map(name = "ORIG_DST_BY_CONN_V2")]
    static ORIG_DST_BY_CONN: HashMap<ConnectionKey, OriginalDst> =
        HashMap::pinned(262_144, BPF_F_NO_PREALLOC);

    /// Pod addresses whose inbound TCP the agent takes (IPv4-mapped for IPv4).
    #[map(name = "INBOUND_CAPTURE")]
    static INBOUND_CAPTURE: HashMap<[u32; 4], CaptureFlags> = HashMap::pinned(16_384, 0);

    /// The agent's plaintext inbound listener (15006) in the pod netns, by pod address. Not
    /// pinned: a socket lives only as long as the agent that made it. When the agent is gone
    /// the entry is gone, and `inbound_capture` drops instead of letting plaintext through.
    #[map(name = "INBOUND_LISTENERS")]
    static INBOUND_LISTENERS: SockHash<[u32; 4]> = SockHash::with_max_entries(16_384, 0);

    /// Kubelet probes let past capture: (exempt node address, pod address, probe port). Not
    /// pinned: they are the running agent's settings.
    #[map(name = "CAPTURE_EXEMPT_V2")]
    static CAPTURE_EXEMPT: HashMap<ExemptKey, u32> = HashMap::with_max_entries(65_536, 0);

    /// The agents' deliveries in progress (see `DeliveryKey`). Pinned: during a handover the
    /// predecessor still delivers the streams it accepted while its successor's capture
    /// program is already the one attached; each entry lives only while its SYN is sent.
    /// Its layout is frozen (the agent's `PINNED_MAPS` says why).
    #[map(name = "DELIVERIES")]
    static DELIVERIES: HashMap<DeliveryKey, u32> = HashMap::pinned(65_536, 0);

    /// The cgroups (v2 ids) of the agent that loaded these programs (slot 0) and, during a
    /// handover, of the predecessor it takes over from (slot 1; 0 when none): their sockets
    /// are never redirected. Not pinned: each agent's programs carry their own.
    #[map(name = "AGENT_CGROUP")]
    static AGENT_CGROUP: Array<u64> = Array::with_max_entries(2, 0);

    /// Redirect counters, see `meshlet_common::stats`.
    #[map(name = "STATS")]
    static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

    /// Reads `user_ip6` as four 32-bit loads: the verifier only allows whole-word context
    /// access there, and a plain array copy may compile to byte loads.
    #[inline(always)]
    fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
        let base = sa.user_ip6.as_ptr();
        // SAFETY: in-bounds, aligned reads of the context's user_ip6 words.
        unsafe {
            [
                core::ptr::read_volatile(base),
                core::ptr::read_volatile(base.add(1)),
                core::ptr::read_volatile(base.add(2)),
                core::ptr::read_volatile(base.add(3)),
            ]
        }
    }

    /// Writes `user_ip6` as four 32-bit stores (see `read_ip6`).
    #[inline(always)]
    fn write_ip6(sa: &mut bpf_sock_addr, ip: [u32; 4]) {
        let base = sa.user_ip6.as_mut_ptr();
        // SAFETY: in-bounds, aligned writes of the context's user_ip6 words.
        unsafe {
            core::ptr::write_volatile(base, ip[0]);
            core::ptr::write_volatile(base.add(1), ip[1]);
            core::ptr::write_volatile(base.add(2), ip[2]);
            core::ptr::write_volatile(base.add(3), ip[3]);
        }
    }

    /// Whether an address in the programs' form (IPv6, IPv4-mapped for IPv4) is IPv4-mapped.
    #[inline(always)]
    fn is_ipv4_mapped(ip: [u32; 4]) -> bool {
        ip[0] == 0 && ip[1] == 0 && ip[2] == ipv4_mapped(0)[2]
    }

    /// Whether an address in the programs' form is a loopback address (`127.0.0.0/8`, `::1`).
    #[inline(always)]
    fn is_loopback(ip: [u32; 4]) -> bool {
        if is_ipv4_mapped(ip) {
            (u32::from_be(ip[3]) >> 24) == 127
        } else {
            ip == LOOPBACK6
        }
    }

    #[inline(always)]
    fn count(index: u32) {
        if let Some(counter) = STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
            unsafe { *counter += 1 };
        }
    }

    /// Whether the calling task is the agent (making a tunnel, plaintext or delivery socket
    /// in a pod's netns). Decided by the caller's cgroup, which a pod cannot change: the
    /// agent runs outside the pods' cgroups, and a process in a pod, root or not, cannot
    /// move itself there. A socket mark would not do: any pod process with CAP_NET_ADMIN can
    /// set the agent's mark and so send plaintext past the mesh.
    #[inline(always)]
    fn is_agent() -> bool {
        // SAFETY: helper without arguments, allowed in cgroup sock_addr programs.
        let current = unsafe { bpf_get_current_cgroup_id() };
        let is = |slot: u32| {
            AGENT_CGROUP
                .get(slot)
                .is_some_and(|&id| id != 0 && id == current)
        };
        is(0) || is(1)
    }

    /// Common part of connect4/connect6: returns the rewrite to apply, if any.
    #[inline(always)]
    fn save_original(ctx: &SockAddrContext, ip: [u32; 4], port: u16) -> Result<bool, ()> {
        // SAFETY: plain helper calls on the program's own context.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: read-only lookup; the value is not kept past this call.
        if unsafe { ENROLLED.get(&netns_cookie) }.is_none() {
            return Ok(false);
        }
        if is_agent() {
            count(stats::SKIPPED_AGENT);
            return Ok(false);
        }
        // SAFETY: as above.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let original = OriginalDst {
            ip,
            port,
            _pad: 0,
            _pad2: 0,
            netns_cookie,
        };
        if ORIG_DST_BY_COOKIE.insert(&cookie, &original, 0).is_err() {
            count(stats::REFUSED_NO_SPACE);
            warn!(
                ctx,
                "meshlet: cannot save original destination; refusing connect"
            );
            return Err(());
        }
        count(stats::REDIRECTED);
        debug!(
            ctx,
            "meshlet: redirect port {} netns {}", port, netns_cookie
        );
        Ok(true)
    }

    /// `struct sockaddr_in`, for `bpf_bind`.
    #[repr(C)]
    struct SockaddrIn {
        family: u16,
        port_be: u16,
        addr_be: u32,
        zero: [u8; 8],
    }

    /// Binds a redirected socket to a loopback source of its original destination's own
    /// (127.x.y.z, from a hash of that address and port; the port is still picked at connect).
    ///
    /// Every redirected connection goes to 127.0.0.1:15001, so from one source address they
    /// would all share one 4-tuple space, whatever their real destinations: TIME_WAITs of
    /// connections to one service (10 000 held idle ones, say) made every later connect() of
    /// the pod search the port range past them (new connections fell from 7 400 to 5 300 a
    /// second), where plain connections to another service would not have noticed. A source
    /// per destination gives each destination its own space, as without the mesh. A socket
    /// the app bound itself keeps its address (the helper refuses, and that is fine).
    #[inline(always)]
    fn bind_loopback_source(ctx: &SockAddrContext, ip_be: u32, port: u16) {
        let mut h = u32::from_be(ip_be) ^ (u32::from(port) << 16 | u32::from(port));
        h = h.wrapping_mul(0x9E37_79B1);
        h ^= h >> 15;
        // 127.a.b.c with c in 1..=254: never a network or broadcast-looking address.
        let source = (127 << 24) | ((h >> 8) & 0xffff) << 8 | (1 + (h & 0xff) % 254);
        let mut addr = SockaddrIn {
            family: AF_INET as u16,
            port_be: 0,
            addr_be: source.to_be(),
            zero: [0; 8],
        };
        // SAFETY: the program's own context, and a sockaddr_in of the size we pass.
        let _ = unsafe {
            bpf_bind(
                ctx.sock_addr,
                (&mut addr as *mut SockaddrIn).cast::<sockaddr>(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        };
    }

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        // SAFETY: the kernel hands a valid, writable bpf_sock_addr to connect hooks.
        let (protocol, ip_be, port_be) = unsafe {
            let sa = &*ctx.sock_addr;
            (sa.protocol, sa.user_ip4, sa.user_port)
        };
        if protocol != IPPROTO_TCP || (u32::from_be(ip_be) >> 24) == 127 {
            return ALLOW;
        }
        let port = u16::from_be(port_be as u16);
        match save_original(&ctx, ipv4_mapped(ip_be), port) {
            Ok(true) => {
                bind_loopback_source(&ctx, ip_be, port);
                // SAFETY: as above; no other reference to the context is live.
                let sa = unsafe { &mut *ctx.sock_addr };
                sa.user_ip4 = LOOPBACK4;
                sa.user_port = u32::from(OUTBOUND_PORT.to_be());
                ALLOW
            }
            Ok(false) => ALLOW,
            Err(()) => REFUSE,
        }
    }

    #[cgroup_sock_addr(connect6)]
    pub fn connect6(ctx: SockAddrContext) -> i32 {
        // SAFETY: as in connect4.
        let sa = unsafe { &mut *ctx.sock_addr };
        if sa.protocol != IPPROTO_TCP {
            return ALLOW;
        }
        let ip = read_ip6(sa);
        if is_loopback(ip) {
            return ALLOW;
        }
        let mapped = is_ipv4_mapped(ip);
        let port = u16::from_be(sa.user_port as u16);
        match save_original(&ctx, ip, port) {
            Ok(true) => {
                let agent = if mapped {
                    ipv4_mapped(LOOPBACK4)
                } else {
                    LOOPBACK6
                };
                write_ip6(sa, agent);
                sa.user_port = u32::from(OUTBOUND_PORT.to_be());
                ALLOW
            }
            Ok(false) => ALLOW,
            Err(()) => REFUSE,
        }
    }

    #[inline(always)]
    fn connection_key(ctx: &SockOpsContext, netns_cookie: u64) -> ConnectionKey {
        let ip = if ctx.family() == AF_INET {
            ipv4_mapped(ctx.local_ip4())
        } else {
            // SAFETY: the kernel hands a valid bpf_sock_ops; whole-word reads as in read_ip6.
            let base = unsafe { (*ctx.ops).local_ip6.as_ptr() };
            // SAFETY: in-bounds, aligned reads of the context's local_ip6 words.
            unsafe {
                [
                    core::ptr::read_volatile(base),
                    core::ptr::read_volatile(base.add(1)),
                    core::ptr::read_volatile(base.add(2)),
                    core::ptr::read_volatile(base.add(3)),
                ]
            }
        };
        ConnectionKey::new(netns_cookie, ip, ctx.local_port() as u16)
    }

    #[sock_ops]
    pub fn sock_ops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if op != BPF_SOCK_OPS_TCP_CONNECT_CB
            && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            && op != BPF_SOCK_OPS_STATE_CB
        {
            return 1;
        }
        // SAFETY: helper call on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out at once.
        let Some(original) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }).copied() else {
            return 1;
        };
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
            // Ask for state callbacks from the SYN on, so that the entries go when the socket
            // closes, also when the connect never completes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            return 1;
        }
        let key = connection_key(&ctx, original.netns_cookie);
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            if ORIG_DST_BY_CONN.insert(&key, &original, 0).is_ok() {
                count(stats::ORIGINAL_DST_RECORDED);
            } else {
                // The agent will find no destination and refuse the connection: say so.
                count(stats::ORIGINAL_DST_LOST);
                warn!(
                    &ctx,
                    "meshlet: cannot file an original destination (map full); the agent will refuse it"
                );
            }
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        } else if ctx.arg(1) == TCP_CLOSE {
            let _ = ORIG_DST_BY_CONN.remove(&key);
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
        }
        1
    }

    #[inline(always)]
    fn original_for_peername(ctx: &SockAddrContext) -> Option<OriginalDst> {
        // SAFETY: helper call on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out at once.
        unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }.copied()
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn getpeername4(ctx: SockAddrContext) -> i32 {
        // SAFETY: the kernel hands a valid, writable bpf_sock_addr to getpeername hooks.
        let sa = unsafe { &mut *ctx.sock_addr };
        if sa.user_ip4 != LOOPBACK4 || sa.user_port != u32::from(OUTBOUND_PORT.to_be()) {
            return ALLOW;
        }
        if let Some(original) = original_for_peername(&ctx) {
            sa.user_ip4 = original.ip[3];
            sa.user_port = u32::from(original.port.to_be());
            count(stats::PEERNAME_REWRITTEN);
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn getpeername6(ctx: SockAddrContext) -> i32 {
        // SAFETY: as in getpeername4.
        let sa = unsafe { &mut *ctx.sock_addr };
        if sa.user_port != u32::from(OUTBOUND_PORT.to_be()) {
            return ALLOW;
        }
        let ip = read_ip6(sa);
        if ip != LOOPBACK6 && ip != ipv4_mapped(LOOPBACK4) {
            return ALLOW;
        }
        if let Some(original) = original_for_peername(&ctx) {
            write_ip6(sa, original.ip);
            sa.user_port = u32::from(original.port.to_be());
            count(stats::PEERNAME_REWRITTEN);
        }
        ALLOW
    }

    /// sk_lookup verdicts.
    const SK_PASS: u32 = 1;
    const SK_DROP: u32 = 0;
    /// The loopback device is interface 1 in every network namespace.
    const LOOPBACK_IFINDEX: u32 = 1;

    /// Inbound capture, attached to each enrolled pod's netns: a new TCP connection to a
    /// captured pod address, for a port that is not the agent's, goes to the agent's plaintext
    /// listener instead of the app, unless it is the agent's own delivery. A connection from
    /// outside to an address the agent does not know is dropped: capture covers every
    /// address the pod has, whenever it was added, not a list taken at enrollment.
    #[sk_lookup]
    pub fn inbound_capture(ctx: SkLookupContext) -> u32 {
        // SAFETY: the kernel hands a valid bpf_sk_lookup to sk_lookup programs.
        let lookup = unsafe { &*ctx.lookup };
        if lookup.protocol != IPPROTO_TCP {
            return SK_PASS;
        }
        let port = lookup.local_port as u16;
        if AGENT_PORTS.contains(&port) {
            return SK_PASS;
        }
        let (local, remote) = if lookup.family == AF_INET {
            (
                ipv4_mapped(lookup.local_ip4),
                ipv4_mapped(lookup.remote_ip4),
            )
        } else {
            let (l, r) = (lookup.local_ip6.as_ptr(), lookup.remote_ip6.as_ptr());
            // SAFETY: in-bounds, aligned whole-word reads of the context's address arrays
            // (the verifier refuses narrower loads there).
            unsafe {
                (
                    [
                        core::ptr::read_volatile(l),
                        core::ptr::read_volatile(l.add(1)),
                        core::ptr::read_volatile(l.add(2)),
                        core::ptr::read_volatile(l.add(3)),
                    ],
                    [
                        core::ptr::read_volatile(r),
                        core::ptr::read_volatile(r.add(1)),
                        core::ptr::read_volatile(r.add(2)),
                        core::ptr::read_volatile(r.add(3)),
                    ],
                )
            }
        };
        let delivery = DeliveryKey {
            local_ip: local,
            remote_ip: remote,
            local_port: port,
            remote_port: u16::from_be(lookup.remote_port),
        };
        let probe = ExemptKey {
            source: remote,
            destination: local,
            port,
            _pad: 0,
        };
        // SAFETY: read-only lookups; the values are not kept.
        if unsafe { CAPTURE_EXEMPT.get(&probe) }.is_some()
            || unsafe { DELIVERIES.get(&delivery) }.is_some()
        {
            return SK_PASS;
        }
        // SAFETY: as above.
        match unsafe { INBOUND_CAPTURE.get(&local) }.copied() {
            Some(CAPTURE) => {}
            Some(_) => return SK_PASS,
            None => {
                // This program runs only in enrolled pods' netns, so this is an address of a
                // captured pod that the agent was never told of (an address added after
                // enrollment, a link-local one). Only the pod's own traffic may use it:
                // loopback addresses, what came in on lo, the pod talking to itself.
                if is_loopback(local)
                    || lookup.ingress_ifindex == LOOPBACK_IFINDEX
                    || local == remote
                {
                    return SK_PASS;
                }
                count(stats::INBOUND_UNKNOWN_ADDRESS);
                return SK_DROP;
            }
        }
        match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
            Ok(()) => {
                count(stats::INBOUND_CAPTURED);
                SK_PASS
            }
            Err(_) => {
                // Captured pod, no agent listener: refuse rather than reach the app unchecked.
                count(stats::INBOUND_DROPPED);
                SK_DROP
            }
        }
    }

    /// Shared part of bind4/bind6: enrolled pods may not bind the agent's ports.
    #[inline(always)]
    fn bind_allowed(ctx: &SockAddrContext, port_be: u32) -> i32 {
        let port = u16::from_be(port_be as u16);
        if !AGENT_PORTS.contains(&port) {
            return ALLOW;
        }
        // SAFETY: helper call on the program's own context.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: read-only lookup.
        if unsafe { ENROLLED.get(&netns_cookie) }.is_none() || is_agent() {
            return ALLOW;
        }
        count(stats::BIND_REFUSED);
        REFUSE
    }

    #[cgroup_sock_addr(bind4)]
    pub fn bind4(ctx: SockAddrContext) -> i32 {
        // SAFETY: the kernel hands a valid bpf_sock_addr to bind hooks.
        let port = unsafe { (*ctx.sock_addr).user_port };
        bind_allowed(&ctx, port)
    }

    #[cgroup_sock_addr(bind6)]
    pub fn bind6(ctx: SockAddrContext) -> i32 {
        // SAFETY: as in bind4.
        let port = unsafe { (*ctx.sock_addr).user_port };
        bind_allowed(&ctx, port)
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
