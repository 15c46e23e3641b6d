//! Moving bytes between a TCP socket and an HTTP/2 stream, both ways, with HTTP/2 flow
//! control respected and half-closes carried across (FIN ⇄ END_STREAM).
use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::tcp::OwnedReadHalf,
};

/// Read size from the TCP side; also the most we hand HTTP/2 at once.
const CHUNK: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// From the TCP socket into the stream.
    pub tcp_to_stream: u64,
    /// From the stream into the TCP socket.
    pub stream_to_tcp: u64,
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("http/2 i/o error"))
    } else {
        io::Error::other(e)
    }
}

/// Copies until both directions have finished; the first error ends both.
///
/// Takes a `TcpStream` (not any stream) for its lock-free `into_split`: `tokio::io::split`
/// puts both halves behind one lock, which the two directions then fight over.
///
/// `from_tcp` and `to_tcp` count the bytes as they move, for live views.
///
/// `recv` may still be on its way (the client side sends the app's first bytes with the
/// `CONNECT`, before the peer's answer: one round trip less per connection); if it fails, both
/// directions end and the stream is reset.
pub async fn copy_bidirectional(
    tcp: tokio::net::TcpStream,
    mut send: h2::SendStream<Bytes>,
    recv: impl std::future::Future<Output = io::Result<h2::RecvStream>>,
    from_tcp: &AtomicU64,
    to_tcp: &AtomicU64,
) -> io::Result<Transferred> {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let n = tcp_to_stream(&mut rd, &mut send, from_tcp).await;
        if n.is_err() {
            send.send_reset(h2::Reason::CANCEL);
        }
        n
    };
    let down = async {
        let mut recv = recv.await?;
        let n = stream_to_tcp(&mut recv, &mut wr, to_tcp).await;
        if n.is_ok() {
            let _ = wr.shutdown().await;
        }
        n
    };
    let (tcp_to_stream, stream_to_tcp) = tokio::try_join!(up, down)?;
    Ok(Transferred {
        tcp_to_stream,
        stream_to_tcp,
    })
}

async fn tcp_to_stream(
    rd: &mut OwnedReadHalf,
    send: &mut h2::SendStream<Bytes>,
    counter: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let buf = read_when_ready(rd).await?;
        let n = buf.len();
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        let first = total == 0;
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let mut data = buf.freeze();
        if first {
            // The first chunk goes without waiting for capacity: a new client stream gets
            // none before the connection task has sent its HEADERS, so waiting put the CONNECT
            // and the app's first bytes (a request, usually) in two TLS records and two
            // writes. HTTP/2 holds it (one chunk at most) and sends it within the peer's
            // window.
            send.send_data(data, false).map_err(h2_io)?;
            continue;
        }
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?
                .map_err(h2_io)?;
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

/// Waits until the socket has something to read, and only then takes a buffer for it: an idle
/// connection holds no buffer (thousands of idle connections are the common case, and each
/// 64 KiB buffer costs at least the page its allocator header is written to). The chunk goes
/// to HTTP/2 whole, so a new buffer per read costs no more than reusing one would: a buffer
/// still referenced by queued frames cannot be reused anyway.
async fn read_when_ready(rd: &mut OwnedReadHalf) -> io::Result<BytesMut> {
    let mut buf = BytesMut::new();
    read_into(rd, &mut buf).await?;
    Ok(buf)
}

/// Reads once into `buf` (given room for a chunk only once the socket is readable).
///
/// Through `AsyncRead` rather than `try_read_buf`: a read that returns less than asked for
/// takes the socket off the ready list there, so the next read waits for the next epoll
/// event instead of costing a `recvfrom` that fails with `EAGAIN` (one per request, per side).
async fn read_into(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> io::Result<usize> {
    rd.readable().await?;
    buf.reserve(CHUNK);
    rd.read_buf(buf).await
}

async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut h2::RecvStream,
    wr: &mut W,
    counter: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        // Give the window back only once the bytes are with the app: backpressure.
        let _ = recv.flow_control().release_capacity(n);
    }
    Ok(total)
}

/// Copies between two TCP sockets until both directions finish (FIN carried across), counting
/// as it goes; for plaintext connections the agent passes through.
pub async fn copy_tcp(
    a: tokio::net::TcpStream,
    b: tokio::net::TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> io::Result<(u64, u64)> {
    let (mut a_rd, mut a_wr) = a.into_split();
    let (mut b_rd, mut b_wr) = b.into_split();
    tokio::try_join!(
        one_way(&mut a_rd, &mut b_wr, a_to_b),
        one_way(&mut b_rd, &mut a_wr, b_to_a)
    )
}

async fn one_way<W>(rd: &mut OwnedReadHalf, wr: &mut W, counter: &AtomicU64) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    // One buffer, reused: allocated (not zeroed) at the first read, so an idle connection
    // holds none and a quiet one only the pages its data touched.
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        let n = read_into(rd, &mut buf).await?;
        if n == 0 {
            wr.shutdown().await?;
            return Ok(total);
        }
        wr.write_all(&buf).await?;
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        sync::{Arc, Mutex},
        task::{Context, Poll},
    };

    use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf};

    use super::*;

    /// The client's side of the tunnel, keeping every write it is given.
    struct Recorded {
        io: DuplexStream,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl AsyncRead for Recorded {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorded {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let written = Pin::new(&mut self.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = &written {
                self.writes.lock().expect("lock").push(buf[..*n].to_vec());
            }
            written
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn the_apps_first_bytes_leave_in_the_same_write_as_the_connect() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let recorded = Recorded {
            io: client_io,
            writes: writes.clone(),
        };
        // The peer agent: answers 200 and echoes what the stream carries.
        let peer = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io)
                .await
                .expect("server handshake");
            let (request, mut respond) = conn.accept().await.expect("a stream").expect("ok");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = request.into_body();
            let mut received = Vec::new();
            while let Some(chunk) = body.data().await {
                received.extend_from_slice(&chunk.expect("data"));
            }
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            send.send_data(Bytes::from(received.clone()), true)
                .expect("echo");
            received
        });
        let (sender, connection) = h2::client::handshake(recorded).await.expect("handshake");
        tokio::spawn(connection);
        // The app's connection, with its request already written.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        app.write_all(b"PING\r\n").await.expect("request");
        app.shutdown().await.expect("FIN");
        let endpoint = "10.0.0.2:15008".parse().expect("addr");
        let (send, answer) = crate::tunnel::start_stream(sender, endpoint, endpoint)
            .await
            .expect("CONNECT");
        let answer = async { answer.await.map_err(io::Error::other) };
        let (from, to) = (AtomicU64::new(0), AtomicU64::new(0));
        let moved = copy_bidirectional(accepted, send, answer, &from, &to)
            .await
            .expect("copy");
        assert_eq!(moved.tcp_to_stream, 6);
        assert_eq!(&peer.await.expect("peer")[..], b"PING\r\n");
        // A HEADERS frame of stream 1 (END_HEADERS) and the app's bytes in one write.
        let headers = [0x01, 0x04, 0, 0, 0, 1];
        let writes = writes.lock().expect("lock");
        let connect = writes
            .iter()
            .find(|w| w.windows(headers.len()).any(|f| f == headers))
            .expect("a write with the CONNECT");
        assert!(
            connect.windows(6).any(|b| b == b"PING\r\n"),
            "the CONNECT went out without the app's first bytes: {writes:?}"
        );
    }
}
