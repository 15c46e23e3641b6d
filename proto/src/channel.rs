//! gRPC channels to these APIs (the control plane, or an agent's node socket): `unix:/path` or an
//! `http://host:port` address.
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{address:?} is neither unix:/path nor host:port")]
    BadTlsAddress { address: String },
    #[error("{address:?} is neither unix:/path nor http(s)://host:port: {source}")]
    BadAddress {
        address: String,
        source: tonic::transport::Error,
    },
}

/// A lazily connecting channel: the agent starts (and keeps its state) while the far end is
/// down, and the channel reconnects by itself.
pub fn connect_lazy(address: &str) -> Result<Channel, ChannelError> {
    if let Some(path) = address.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        // The URI is a placeholder; the connector below decides where to go.
        let endpoint = Endpoint::from_static("http://[::1]:50051");
        Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        )
    } else {
        let endpoint = Endpoint::from_shared(address.to_string()).map_err(|source| {
            ChannelError::BadAddress {
                address: address.to_string(),
                source,
            }
        })?;
        Ok(endpoint.connect_lazy())
    }
}

/// A lazily connecting channel over TLS (mutual, when `tls` carries a client certificate) to
/// `unix:/path` or `host:port`, or to the first that answers of several such addresses
/// separated by commas (control-plane replicas: when the one in use goes away, the channel's
/// next connection tries the others, starting after it). SNI is fixed; the verifier in `tls`
/// decides.
///
/// No connection is attempted before `ready` is true (e.g. before the node holds the
/// certificate the connection must present); calls wait meanwhile.
pub fn connect_lazy_tls(
    address: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    ready: tokio::sync::watch::Receiver<bool>,
) -> Result<Channel, ChannelError> {
    enum Target {
        Unix(PathBuf),
        Tcp(String),
    }
    let parse = |address: &str| -> Result<Target, ChannelError> {
        Ok(match address.strip_prefix("unix:") {
            Some(path) => Target::Unix(PathBuf::from(path)),
            None => {
                let hostport = address
                    .strip_prefix("https://")
                    .or_else(|| address.strip_prefix("http://"))
                    .unwrap_or(address);
                if !hostport.contains(':') {
                    return Err(ChannelError::BadTlsAddress {
                        address: address.to_string(),
                    });
                }
                Target::Tcp(hostport.to_string())
            }
        })
    };
    let targets: Vec<Target> = address
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(parse)
        .collect::<Result<_, _>>()?;
    if targets.is_empty() {
        return Err(ChannelError::BadTlsAddress {
            address: address.to_string(),
        });
    }
    let targets = std::sync::Arc::new(targets);
    // The replica to try first: the last one that answered.
    let current = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let endpoint = with_deadlines(Endpoint::from_static("http://[::1]:50051"));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let (targets, current) = (targets.clone(), current.clone());
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            let mut ready = ready.clone();
            async move {
                ready
                    .wait_for(|r| *r)
                    .await
                    .map_err(|_| std::io::Error::other("shutting down"))?;
                let name = rustls::pki_types::ServerName::try_from("meshlet-controlplane")
                    .map_err(std::io::Error::other)?;
                let first = current.load(std::sync::atomic::Ordering::Relaxed);
                let mut last_error = None;
                for i in 0..targets.len() {
                    let index = (first + i) % targets.len();
                    let connected = async {
                        Ok::<_, std::io::Error>(match &targets[index] {
                            Target::Unix(path) => {
                                let io = tokio::net::UnixStream::connect(path).await?;
                                Either::Unix(connector.connect(name.clone(), io).await?)
                            }
                            Target::Tcp(hostport) => {
                                let io = tokio::net::TcpStream::connect(hostport.as_str()).await?;
                                io.set_nodelay(true)?;
                                Either::Tcp(connector.connect(name.clone(), io).await?)
                            }
                        })
                    }
                    .await;
                    match connected {
                        Ok(stream) => {
                            current.store(index, std::sync::atomic::Ordering::Relaxed);
                            return Ok::<_, std::io::Error>(TokioIo::new(stream));
                        }
                        Err(e) => last_error = Some(e),
                    }
                }
                Err(last_error.unwrap_or_else(|| std::io::Error::other("no control-plane address")))
            }
        })),
    )
}

/// Bounds on a control-plane connection: connecting (TCP and TLS) takes at most 10 s, and a
/// half-open connection is found by HTTP/2 PINGs (every 10 s, even with no call running;
/// dead after 20 s without an answer) instead of hanging a discovery stream forever.
/// Deadlines on single calls are set per call (`tonic::Request::set_timeout`).
pub fn with_deadlines(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true)
}

/// A TLS stream over either transport.
enum Either {
    Unix(tokio_rustls::client::TlsStream<tokio::net::UnixStream>),
    Tcp(tokio_rustls::client::TlsStream<tokio::net::TcpStream>),
}

impl tokio::io::AsyncRead for Either {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Either::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Either {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Either::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Either::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Either::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Either::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}
