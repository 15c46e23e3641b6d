//! Limits on what a peer can make the agent hold: timeouts for each phase of a tunnel
//! connection, and caps on connections per source address and in total.
//!
//! Everything a remote peer can open costs the agent a file descriptor, a task and some
//! buffers. Without caps, 20 000 idle connections to 15008 exhausted the agent's descriptors
//! and real traffic failed; with them, the newest connections past a cap are refused at once
//! (shed) while the ones already admitted keep working.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

/// Timeouts and limits of the tunnel (HBONE) on both sides. The defaults follow Istio's
/// ztunnel where it has one (200 streams per connection, 64 KiB of headers, a PING every
/// 10 s and a peer dead after 20 s without an answer).
#[derive(Debug, Clone)]
pub struct TunnelLimits {
    /// TCP accepted → TLS handshake done → HTTP/2 preface read: a peer that does not get
    /// there in this time is dropped.
    pub handshake_timeout: Duration,
    /// A server-side tunnel connection with no stream for this long is closed (GOAWAY). Longer
    /// than the client pool's own idle timeout, so that clients close first.
    pub idle_timeout: Duration,
    /// An HTTP/2 PING this often on every tunnel connection...
    pub keepalive_interval: Duration,
    /// ...that must be answered within this time, else the peer is dead and the connection is
    /// dropped (its streams fail; the next stream dials a fresh connection). Also the
    /// `TCP_USER_TIMEOUT` of tunnel sockets: unacknowledged data for this long kills them.
    pub keepalive_timeout: Duration,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the server advertises and enforces.
    pub max_streams: u32,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`, both sides.
    pub max_header_list_size: u32,
    /// How long the client waits for the answer to a CONNECT (the peer's delivery is bounded
    /// by the kernel at ~7 s, so this leaves room for it).
    pub connect_response_timeout: Duration,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            max_streams: 200,
            max_header_list_size: 64 * 1024,
            connect_response_timeout: Duration::from_secs(15),
        }
    }
}

/// Caps on live connections: per source address and in total. Cheap: one lock around a map
/// with an entry per source that has connections now.
#[derive(Debug)]
pub struct ConnectionLimiter {
    per_source: usize,
    total: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    #[error("the source has {0} connections open, its cap (--max-connections-per-source)")]
    PerSource(usize),
    #[error("the agent holds {0} connections, its cap (--max-inbound-connections)")]
    Total(usize),
}

impl Shed {
    /// A metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Shed::PerSource(_) => "per_source_limit",
            Shed::Total(_) => "total_limit",
        }
    }
}

impl ConnectionLimiter {
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_source: per_source.max(1),
            total: total.max(1),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A slot for one connection from `source`, held until the permit drops; or why not.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Shed> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.total {
            return Err(Shed::Total(counts.total));
        }
        let n = counts.by_source.entry(source).or_default();
        if *n >= self.per_source {
            return Err(Shed::PerSource(*n));
        }
        *n += 1;
        counts.total += 1;
        Ok(Permit {
            limiter: self.clone(),
            source,
        })
    }

    /// Connections held now.
    pub fn current(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// One admitted connection; gives its slot back when dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnectionLimiter>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

/// Raises the soft open-files limit to the hard one and returns the limit in force: every
/// proxied connection costs a socket or two, and the caps above are derived from it.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return hard,
            Err(e) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}")
            }
        }
    }
    soft
}

/// The default total cap on inbound connections for an open-files limit: a connection from
/// a peer holds up to two descriptors (its socket and a delivery), and a quarter of the limit
/// stays for the pods' listeners, outbound connections and the agent's own files, so that
/// shedding starts well before the descriptors run out.
pub fn default_inbound_cap(open_files: u64) -> usize {
    usize::try_from(open_files.saturating_mul(3) / 8)
        .unwrap_or(usize::MAX)
        .max(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_in_total_and_frees_on_drop() {
        let limiter = ConnectionLimiter::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = limiter.try_acquire(a).expect("a1");
        let _a2 = limiter.try_acquire(a).expect("a2");
        assert_eq!(limiter.try_acquire(a).unwrap_err(), Shed::PerSource(2));
        let _b1 = limiter.try_acquire(b).expect("b1");
        assert_eq!(limiter.try_acquire(b).unwrap_err(), Shed::Total(3));
        drop(a1);
        assert_eq!(limiter.current(), 2);
        let _b2 = limiter.try_acquire(b).expect("a freed slot is reused");
        assert_eq!(limiter.current(), 3);
    }

    #[test]
    fn sources_with_no_connection_leave_no_entry() {
        let limiter = ConnectionLimiter::new(10, 100);
        for i in 0..50u8 {
            let permit = limiter
                .try_acquire(IpAddr::from([10, 0, 1, i]))
                .expect("slot");
            drop(permit);
        }
        assert!(limiter.counts.lock().expect("lock").by_source.is_empty());
    }

    #[test]
    fn the_inbound_cap_leaves_descriptors_spare() {
        assert_eq!(default_inbound_cap(1 << 20), 393_216);
        assert_eq!(default_inbound_cap(1024), 384);
        assert_eq!(default_inbound_cap(10), 64);
    }
}
