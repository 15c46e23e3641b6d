//! The drain signal, threaded through the servers: once the agent has handed its node over to
//! a successor, every listener stops accepting, tunnel connections from peers get a GOAWAY
//! (their next streams go to the successor), and the connections in flight run to their end.
use std::sync::Arc;

use tokio::sync::watch;

/// Cheap to clone; every clone sees the same signal.
#[derive(Debug, Clone)]
pub struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }
}

impl Drain {
    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: the wait ends only by the signal.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_signal() {
        let drain = Drain::default();
        let other = drain.clone();
        assert!(!other.is_draining());
        let waiter = tokio::spawn(async move { other.signaled().await });
        drain.start();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("signaled")
            .expect("task");
        assert!(drain.is_draining());
    }
}
