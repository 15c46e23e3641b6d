//! Plain-HTTP listeners for kubelet probes and Prometheus scrapes (the agent's metrics and
//! readiness on the node's address, the control plane's health). They are reachable from
//! the network, so each connection has a deadline, the request headers a shorter one, and
//! the connections served at once a cap; the rest wait in the listen backlog.
use std::time::Duration;

/// How a listener limits its callers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a caller has to send its request headers.
    pub header_timeout: Duration,
    /// Time one connection may last, whatever it does.
    pub connection_timeout: Duration,
}

impl Default for Limits {
    /// Enough for a kubelet and a few scrapers; a slow or idle caller is dropped.
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` with `limits` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, router: axum::Router, limits: Limits) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!("plain-HTTP listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_timeout, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, limits));
        addr
    }

    #[tokio::test]
    async fn a_caller_that_sends_nothing_is_dropped_and_the_cap_holds_others_back() {
        let limits = Limits {
            max_connections: 1,
            header_timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_secs(5),
        };
        let addr = start(limits).await;
        // A silent caller holds the only slot until its header deadline.
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "the silent caller must be dropped after the header deadline"
        );
        // Then a real request is served.
        let mut caller = tokio::net::TcpStream::connect(addr).await.expect("connect");
        caller
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(3), caller.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
    }
}
