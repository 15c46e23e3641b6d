//! The live connections of this node, both directions: who they came from, where they go, how
//! many bytes moved so far, and a way to close each one when a new policy or mode no longer
//! allows it. Registering and dropping a connection is also what the connection metrics count.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::SystemTime,
};

use tokio::sync::watch;

use crate::{
    identity::SpiffeId,
    metrics::{ConnectionLabels, DirectionLabels, Metrics},
    state::policy::Transport,
};

/// Which side of the mesh the connection is on, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A local app's connection, leaving through a tunnel (or plaintext to a DISABLE peer).
    Outbound,
    /// A connection to a local app.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Bytes moved so far; the copy loops add as they go.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// From the local app's side... towards the peer (outbound) / from the peer to the app
    /// (inbound): always "into the connection from its source".
    pub from_source: AtomicU64,
    /// Back towards the source.
    pub to_source: AtomicU64,
}

impl ByteCounters {
    pub fn add_from_source(&self, n: usize) {
        self.from_source.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn add_to_source(&self, n: usize) {
        self.to_source.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One live connection.
#[derive(Debug)]
pub struct LiveConnection {
    pub id: u64,
    pub direction: Direction,
    /// The local pod (uid): the source outbound, the destination inbound.
    pub pod: String,
    pub transport: Transport,
    pub source_identity: Option<SpiffeId>,
    pub destination_identity: Option<SpiffeId>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub started: SystemTime,
    pub bytes: ByteCounters,
    labels: ConnectionLabels,
    close: watch::Sender<Option<String>>,
}

impl LiveConnection {
    /// Asks the connection's task to close it, with the reason for its log line.
    pub fn close(&self, reason: String) {
        self.close.send_replace(Some(reason));
    }
}

/// Resolves when the connection has been told to close; yields the reason.
pub struct CloseSignal(watch::Receiver<Option<String>>);

impl CloseSignal {
    pub async fn closed(&mut self) -> String {
        loop {
            if let Some(reason) = self.0.borrow_and_update().clone() {
                return reason;
            }
            if self.0.changed().await.is_err() {
                // The registry entry is gone, so nobody can close us: wait forever.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The connection's entry: unlisted and counted as closed when this drops.
pub struct Registration {
    connection: Arc<LiveConnection>,
    registry: Weak<LiveConnections>,
}

impl Registration {
    pub fn bytes(&self) -> &ByteCounters {
        &self.connection.bytes
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.map().remove(&self.connection.id);
            let m = &registry.metrics;
            let c = &self.connection;
            m.connections_closed.get_or_create(&c.labels).inc();
            m.bytes_sent
                .get_or_create(&c.labels)
                .inc_by(c.bytes.from_source.load(Ordering::Relaxed));
            m.bytes_received
                .get_or_create(&c.labels)
                .inc_by(c.bytes.to_source.load(Ordering::Relaxed));
            m.connections_active
                .get_or_create(&DirectionLabels {
                    direction: c.direction.as_str(),
                })
                .dec();
        }
    }
}

/// What a new connection is, for [`LiveConnections::register`].
pub struct NewConnection {
    pub direction: Direction,
    pub pod: String,
    pub transport: Transport,
    pub source_identity: Option<SpiffeId>,
    pub destination_identity: Option<SpiffeId>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

pub struct LiveConnections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<LiveConnection>>>,
    metrics: Arc<Metrics>,
}

impl LiveConnections {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConnection>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection; it stays listed until the returned registration drops.
    pub fn register(self: &Arc<Self>, new: NewConnection) -> (Registration, CloseSignal) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, signal) = watch::channel(None);
        let labels = self.metrics.connection_labels(
            new.direction.as_str(),
            new.source_identity
                .as_ref()
                .map(|i| i.to_string())
                .as_deref(),
            new.destination_identity
                .as_ref()
                .map(|i| i.to_string())
                .as_deref(),
        );
        self.metrics.connections_opened.get_or_create(&labels).inc();
        self.metrics
            .connections_active
            .get_or_create(&DirectionLabels {
                direction: new.direction.as_str(),
            })
            .inc();
        let connection = Arc::new(LiveConnection {
            id,
            direction: new.direction,
            pod: new.pod,
            transport: new.transport,
            source_identity: new.source_identity,
            destination_identity: new.destination_identity,
            source: new.source,
            destination: new.destination,
            started: SystemTime::now(),
            bytes: ByteCounters::default(),
            labels,
            close,
        });
        self.map().insert(id, connection.clone());
        (
            Registration {
                connection,
                registry: Arc::downgrade(self),
            },
            CloseSignal(signal),
        )
    }

    /// A snapshot of the live connections, oldest first.
    pub fn list(&self) -> Vec<Arc<LiveConnection>> {
        let mut list: Vec<_> = self.map().values().cloned().collect();
        list.sort_by_key(|c| c.id);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_reaches_the_connection_and_drop_unlists_and_counts_it() {
        let metrics = Arc::new(Metrics::new("node-1"));
        let registry = Arc::new(LiveConnections::new(metrics.clone()));
        let (registration, mut signal) = registry.register(NewConnection {
            direction: Direction::Inbound,
            pod: "p".into(),
            transport: Transport::Plaintext,
            source_identity: None,
            destination_identity: None,
            source: "10.0.0.1:5000".parse().expect("addr"),
            destination: "10.0.0.2:80".parse().expect("addr"),
        });
        registration.bytes().add_from_source(7);
        let listed = registry.list();
        assert_eq!(listed.len(), 1);
        listed[0].close("denied by shop/x rule 0".into());
        assert_eq!(signal.closed().await, "denied by shop/x rule 0");
        drop(registration);
        assert!(registry.list().is_empty());
        let text = metrics.encode(None).expect("encode");
        assert!(text.contains("meshlet_connections_closed_total{direction=\"inbound\",source_identity=\"none\",destination_identity=\"none\"} 1"), "{text}");
        assert!(text.contains("meshlet_sent_bytes_total{direction=\"inbound\",source_identity=\"none\",destination_identity=\"none\"} 7"), "{text}");
    }
}
