//! Pooled tunnel connections: streams with the same source pod, source identity and tunnel
//! endpoint share one TLS+HTTP/2 connection, up to a cap of streams per connection. A new TCP
//! connection from an app thus costs one HTTP/2 stream, not a TLS handshake.
//!
//! Streams fill connections in order (past the first `spread`, which share the busy streams):
//! one TLS write then carries frames of many streams, and a burst's extra connections empty out
//! and are closed once idle for the pool's idle timeout.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::TunnelError;
use crate::identity::SpiffeId;

/// What makes two streams shareable on one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source pod (its netns holds the socket).
    pub source_pod: String,
    pub source_identity: SpiffeId,
    /// The destination's tunnel endpoint (IP:15008).
    pub endpoint: SocketAddr,
    /// The identities the destination may present; part of the key because the TLS session
    /// was verified against them.
    pub expected: Vec<SpiffeId>,
}

/// The certificates a tunnel connection was authenticated with. After a rotation, new
/// streams go on a connection made with the current ones; older connections keep their
/// streams until those end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The leaf we presented (its `tls::fingerprint`).
    pub client_leaf: u64,
    /// The certificate that issued the server's leaf (its `tls::fingerprint`).
    pub server_issuer: u64,
    /// When the server's leaf expires: no new streams after that (the connection itself is
    /// closed a clock skew later).
    pub server_not_after: Option<std::time::SystemTime>,
}

#[cfg(test)]
use crate::tls::fingerprint;

/// One HTTP/2 connection in the pool.
pub struct PooledConnection {
    sender: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    /// Since when the connection has had no stream (meaningful while `active` is 0).
    idle_since: Mutex<Instant>,
    closed: Arc<AtomicBool>,
    credentials: Credentials,
}

impl PooledConnection {
    /// `closed` must be set by whoever drives the connection when it ends.
    pub fn new(
        sender: h2::client::SendRequest<Bytes>,
        closed: Arc<AtomicBool>,
        credentials: Credentials,
    ) -> Self {
        Self {
            sender,
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            closed,
            credentials,
        }
    }

    fn try_reserve(&self, max: usize) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A stream slot on a pooled connection; gives the slot back when dropped.
pub struct Checkout {
    conn: Arc<PooledConnection>,
}

impl Checkout {
    pub fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.conn.sender.clone()
    }

    /// Marks the connection unusable (e.g. the stream failed at the HTTP/2 level).
    pub fn poison(&self) {
        self.conn.closed.store(true, Ordering::Release);
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// The pool.
pub struct Pool {
    max_streams: usize,
    /// Connections per key that busy streams are spread over before sharing.
    spread: usize,
    connections: Mutex<HashMap<PoolKey, Vec<Arc<PooledConnection>>>>,
    /// One connection set-up at a time per key, so a burst of new streams shares one handshake.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    pub fn new(max_streams: usize) -> Self {
        Self::with_spread(max_streams, 1)
    }

    /// A pool that spreads busy streams over up to `spread` connections per key first.
    pub fn with_spread(max_streams: usize, spread: usize) -> Self {
        Self {
            max_streams: max_streams.max(1),
            spread: spread.max(1),
            connections: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
        }
    }

    fn reuse(
        &self,
        key: &PoolKey,
        current: &(dyn Fn(&Credentials) -> bool + Sync),
    ) -> Option<Checkout> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let list = connections.get_mut(key)?;
        // Closed connections go; so do idle ones made with outdated certificates (dropping
        // the last sender lets the connection end). Busy outdated ones drain.
        list.retain(|c| {
            !c.closed.load(Ordering::Acquire)
                && (current(&c.credentials) || c.active.load(Ordering::Acquire) > 0)
        });
        // Busy streams are spread over up to `spread` connections (so that the TLS work of
        // parallel streams can run on several cores), the least loaded first; past those,
        // connections fill in order. Packing matters: after a burst opened many connections,
        // spreading new streams over all of them cost a TLS record and a wake-up per stream
        // where one shared connection batches them (50 clients' requests fell from 81 000 to
        // 40 000 a second), and the extra connections could never empty out and close.
        let mut usable = list.iter().filter(|c| current(&c.credentials));
        let mut by_load: Vec<&Arc<PooledConnection>> = usable.by_ref().take(self.spread).collect();
        if by_load.len() < self.spread
            && by_load.iter().all(|c| c.active.load(Ordering::Acquire) > 0)
        {
            return None;
        }
        by_load.sort_by_key(|c| c.active.load(Ordering::Acquire));
        let conn = by_load
            .into_iter()
            .chain(usable)
            .find(|c| c.try_reserve(self.max_streams))?;
        Some(Checkout { conn: conn.clone() })
    }

    /// A stream slot for `key`: on an open connection with room that was made with
    /// `current` credentials, or on a new one from `connect`.
    pub async fn checkout<F, Fut>(
        &self,
        key: &PoolKey,
        current: &(dyn Fn(&Credentials) -> bool + Sync),
        connect: F,
    ) -> Result<Checkout, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PooledConnection, TunnelError>>,
    {
        if let Some(checkout) = self.reuse(key, current) {
            return Ok(checkout);
        }
        let gate = {
            let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            dialing.entry(key.clone()).or_default().clone()
        };
        let _dialing = gate.lock().await;
        // Someone else may have dialled while we waited.
        if let Some(checkout) = self.reuse(key, current) {
            return Ok(checkout);
        }
        let conn = Arc::new(connect().await?);
        let reserved = conn.try_reserve(self.max_streams);
        debug_assert!(reserved);
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(Checkout { conn })
    }

    /// Lets go of connections that have carried no stream for `idle_timeout` (dropping the
    /// pool's handle ends the HTTP/2 connection with a GOAWAY), of closed ones, and of the dial
    /// gates of destinations left with no connection.
    pub fn sweep(&self, idle_timeout: Duration) {
        let idle_too_long = |c: &PooledConnection| {
            c.active.load(Ordering::Acquire) == 0
                && c.idle_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed()
                    >= idle_timeout
        };
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|_, list| {
            list.retain(|c| !c.closed.load(Ordering::Acquire) && !idle_too_long(c));
            !list.is_empty()
        });
        // A gate someone holds or waits on is in use (more than the map's reference).
        self.dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, gate| Arc::strong_count(gate) > 1 || connections.contains_key(key));
    }

    /// Open connections (for the debug view and tests).
    pub fn connection_count(&self) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections
            .values()
            .flatten()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A real HTTP/2 connection over an in-memory pipe.
    async fn h2_pair() -> PooledConnection {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = h2::server::handshake(server_io).await {
                while let Some(Ok(_)) = conn.accept().await {}
            }
        });
        let (sender, connection) = h2::client::handshake(client_io).await.expect("h2");
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        tokio::spawn(async move {
            let _ = connection.await;
            flag.store(true, Ordering::Release);
        });
        PooledConnection::new(sender, closed, Credentials::default())
    }

    fn key(endpoint: &str) -> PoolKey {
        PoolKey {
            source_pod: "pod-a".into(),
            source_identity: SpiffeId::parse("spiffe://td/ns/a/sa/a").expect("id"),
            endpoint: endpoint.parse().expect("addr"),
            expected: vec![SpiffeId::parse("spiffe://td/ns/b/sa/b").expect("id")],
        }
    }

    #[tokio::test]
    async fn shares_connections_up_to_the_stream_cap() {
        let pool = Pool::new(2);
        let any = |_: &Credentials| true;
        let dials = AtomicUsize::new(0);
        let k = key("10.0.0.2:15008");
        let dial = || async {
            dials.fetch_add(1, Ordering::SeqCst);
            Ok(h2_pair().await)
        };
        let a = pool.checkout(&k, &any, dial).await.expect("a");
        let b = pool.checkout(&k, &any, dial).await.expect("b");
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "two streams share one connection"
        );
        let c = pool.checkout(&k, &any, dial).await.expect("c");
        assert_eq!(
            dials.load(Ordering::SeqCst),
            2,
            "the cap forces a second connection"
        );
        drop(a);
        let _d = pool.checkout(&k, &any, dial).await.expect("d");
        assert_eq!(dials.load(Ordering::SeqCst), 2, "a freed slot is reused");
        // Another destination never shares.
        let _e = pool
            .checkout(&key("10.0.0.3:15008"), &any, dial)
            .await
            .expect("e");
        assert_eq!(dials.load(Ordering::SeqCst), 3);
        // A poisoned connection is not handed out again.
        b.poison();
        drop(b);
        drop(c);
        let f = pool.checkout(&k, &any, dial).await.expect("f");
        assert_eq!(
            dials.load(Ordering::SeqCst),
            3,
            "the healthy connection is reused"
        );
        assert_eq!(pool.connection_count(), 2, "the poisoned one is gone");
        f.poison();
        let _g = pool.checkout(&k, &any, dial).await.expect("g");
        assert_eq!(
            dials.load(Ordering::SeqCst),
            4,
            "no healthy connection left: dial anew"
        );
    }

    #[tokio::test]
    async fn busy_streams_spread_over_connections_then_share_the_least_loaded() {
        let pool = Pool::with_spread(10, 2);
        let any = |_: &Credentials| true;
        let dials = AtomicUsize::new(0);
        let k = key("10.0.0.2:15008");
        let dial = || async {
            dials.fetch_add(1, Ordering::SeqCst);
            Ok(h2_pair().await)
        };
        let a = pool.checkout(&k, &any, dial).await.expect("a");
        let b = pool.checkout(&k, &any, dial).await.expect("b");
        assert_eq!(
            dials.load(Ordering::SeqCst),
            2,
            "a second busy stream gets its own connection"
        );
        assert!(!Arc::ptr_eq(&a.conn, &b.conn));
        let c = pool.checkout(&k, &any, dial).await.expect("c");
        assert_eq!(dials.load(Ordering::SeqCst), 2, "then they share");
        // Loads are now 2 (a, c) and 1 (b): the next goes to b's connection.
        assert!(Arc::ptr_eq(&c.conn, &a.conn));
        let d = pool.checkout(&k, &any, dial).await.expect("d");
        assert!(
            Arc::ptr_eq(&d.conn, &b.conn),
            "the least loaded connection takes it"
        );
        drop((a, b, c, d));
        // One stream at a time reuses an idle connection: no dial.
        let _e = pool.checkout(&k, &any, dial).await.expect("e");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn streams_fill_connections_in_order_and_idle_connections_close() {
        let pool = Pool::new(2);
        let any = |_: &Credentials| true;
        let k = key("10.0.0.2:15008");
        let dial = || async { Ok(h2_pair().await) };
        let a = pool.checkout(&k, &any, dial).await.expect("a");
        let b = pool.checkout(&k, &any, dial).await.expect("b");
        let c = pool.checkout(&k, &any, dial).await.expect("c");
        assert!(
            !Arc::ptr_eq(&a.conn, &c.conn),
            "the cap made a second connection"
        );
        let second_closed = c.conn.closed.clone();
        drop((b, c));
        // One stream on the first, none on the second: the first takes the next one (the
        // least loaded would be the second), so the second can empty out.
        let e = pool.checkout(&k, &any, dial).await.expect("e");
        assert!(Arc::ptr_eq(&e.conn, &a.conn), "streams pack onto the first");
        pool.sweep(Duration::from_secs(3600));
        assert_eq!(pool.connection_count(), 2, "not idle for long enough yet");
        pool.sweep(Duration::ZERO);
        assert_eq!(
            pool.connection_count(),
            1,
            "the idle one went, the busy one stayed"
        );
        // Let go of, the HTTP/2 connection ends.
        for _ in 0..500 {
            if second_closed.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            second_closed.load(Ordering::Acquire),
            "the swept connection closed"
        );
        drop((a, e));
        pool.sweep(Duration::ZERO);
        assert_eq!(pool.connection_count(), 0);
        assert!(
            pool.dialing.lock().expect("lock").is_empty(),
            "no dial gate is left for a destination with no connection"
        );
    }

    #[tokio::test]
    async fn connections_made_with_outdated_certificates_take_no_new_streams() {
        let pool = Pool::new(10);
        let k = key("10.0.0.2:15008");
        let old = |c: &Credentials| c.client_leaf == 0;
        let new = |c: &Credentials| c.client_leaf == fingerprint(b"new");
        let first = pool
            .checkout(&k, &old, || async { Ok(h2_pair().await) })
            .await
            .expect("first");
        // After a rotation the busy old connection keeps its stream but gets no new one.
        let second = pool
            .checkout(&k, &new, || async {
                let mut c = h2_pair().await;
                c.credentials.client_leaf = fingerprint(b"new");
                Ok(c)
            })
            .await
            .expect("second");
        assert!(!Arc::ptr_eq(&first.conn, &second.conn));
        assert_eq!(pool.connection_count(), 2, "the old one drains");
        drop(first);
        let _third = pool
            .checkout(&k, &new, || async {
                panic!("must reuse the current connection")
            })
            .await
            .expect("third");
        assert_eq!(pool.connection_count(), 1, "the idle old one is let go");
    }
}
