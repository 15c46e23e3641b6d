//! The live inbound connections of this node: who they came from, where they go, and a way to
//! close each one when a new policy or mode no longer allows it.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::SystemTime,
};

use tokio::sync::watch;

use crate::{identity::SpiffeId, policy::Transport};

/// One admitted inbound connection.
#[derive(Debug)]
pub struct LiveConnection {
    pub id: u64,
    /// The destination pod (uid).
    pub pod: String,
    pub transport: Transport,
    pub source_identity: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
    pub started: SystemTime,
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

/// Removes the connection from the registry when its task ends.
pub struct Registration {
    id: u64,
    registry: Weak<LiveConnections>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.map().remove(&self.id);
        }
    }
}

/// What a new connection is, for [`LiveConnections::register`].
pub struct NewConnection {
    pub pod: String,
    pub transport: Transport,
    pub source_identity: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

#[derive(Default)]
pub struct LiveConnections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<LiveConnection>>>,
}

impl LiveConnections {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConnection>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection; it stays listed until the returned registration drops.
    pub fn register(self: &Arc<Self>, new: NewConnection) -> (Registration, CloseSignal) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, signal) = watch::channel(None);
        let connection = Arc::new(LiveConnection {
            id,
            pod: new.pod,
            transport: new.transport,
            source_identity: new.source_identity,
            source_ip: new.source_ip,
            destination: new.destination,
            started: SystemTime::now(),
            close,
        });
        self.map().insert(id, connection);
        (
            Registration {
                id,
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
    async fn close_reaches_the_connection_and_drop_unlists_it() {
        let registry = Arc::new(LiveConnections::default());
        let (registration, mut signal) = registry.register(NewConnection {
            pod: "p".into(),
            transport: Transport::Plaintext,
            source_identity: None,
            source_ip: "10.0.0.1".parse().expect("ip"),
            destination: "10.0.0.2:80".parse().expect("addr"),
        });
        let listed = registry.list();
        assert_eq!(listed.len(), 1);
        listed[0].close("denied by shop/x rule 0".into());
        assert_eq!(signal.closed().await, "denied by shop/x rule 0");
        drop(registration);
        assert!(registry.list().is_empty());
    }
}
