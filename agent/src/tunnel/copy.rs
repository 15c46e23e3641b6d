//! Moving bytes between a TCP socket and an HTTP/2 stream, both ways, with HTTP/2 flow
//! control respected and half-closes carried across (FIN ⇄ END_STREAM).
use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
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
///
/// Any error resets the TCP side too (`SO_LINGER` 0): a refused or broken tunnel stream is a
/// reset to the app, never a clean end of stream.
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
    let result = tokio::try_join!(up, down);
    let (tcp_to_stream, stream_to_tcp) = match result {
        Ok(done) => done,
        Err(e) => {
            // The tunnel side failed (the peer refused the CONNECT, reset the stream, went
            // away): the app must see a reset, not a clean end as if the server had answered
            // and closed.
            if let Ok(tcp) = rd.reunite(wr) {
                let _ = tcp.set_zero_linger();
            }
            return Err(e);
        }
    };
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
    let mut bulk = false;
    loop {
        let buf = read_chunk(rd, &mut bulk).await?;
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

/// A read that fills this much means more is waiting: the next read takes a whole `CHUNK`.
const PROBE: usize = 16 * 1024;

/// Reads what the socket has, in a buffer sized by what arrived; empty at end of stream.
///
/// An idle connection must hold no buffer: thousands of idle connections are the common case,
/// and readiness can be reported for a socket that has nothing to read (a heap profile of
/// 10 000 idle connections found a reserved 64 KiB buffer behind each, 706 MB allocated, one or
/// two pages of each resident: 10 KiB per connection where 4 KiB were the connection's own).
/// So a read first goes to a buffer on the stack, live only while the read is polled, and the
/// bytes that came are copied into one of their size. A read that fills it switches to `bulk`:
/// reads straight into a `CHUNK` buffer until one comes back short.
///
/// Reads go through `AsyncRead`, which takes a socket off the ready list after a short read, so
/// the next read waits for the next event instead of costing a `recvfrom` that fails with
/// `EAGAIN` (one per request, per side).
async fn read_chunk(rd: &mut OwnedReadHalf, bulk: &mut bool) -> io::Result<BytesMut> {
    if *bulk {
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = rd.read_buf(&mut buf).await?;
        *bulk = n == CHUNK;
        return Ok(buf);
    }
    let buf = poll_fn(|cx| {
        // Not zeroed: 16 KiB of memset per read would cost more than the read.
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); PROBE];
        let mut read = ReadBuf::uninit(&mut probe);
        std::task::ready!(Pin::new(&mut *rd).poll_read(cx, &mut read))?;
        Poll::Ready(Ok::<_, io::Error>(BytesMut::from(read.filled())))
    })
    .await?;
    *bulk = buf.len() == PROBE;
    Ok(buf)
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
    let mut bulk = false;
    loop {
        let buf = read_chunk(rd, &mut bulk).await?;
        let n = buf.len();
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
        sync::{Arc, Mutex},
        task::Context,
    };

    use tokio::io::DuplexStream;

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

    /// An app's connection on loopback: (the app's end, the accepted end).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let app = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (app, accepted)
    }

    #[tokio::test]
    async fn reads_take_buffers_the_size_of_what_came_until_a_bulk_transfer() {
        let (mut app, accepted) = tcp_pair().await;
        let (mut rd, _wr) = accepted.into_split();
        let mut bulk = false;
        app.write_all(b"PING\r\n").await.expect("request");
        let small = read_chunk(&mut rd, &mut bulk).await.expect("read");
        assert_eq!(&small[..], b"PING\r\n");
        assert!(
            small.capacity() < 64,
            "a request's buffer is its size, not a chunk's"
        );
        assert!(!bulk);
        // More than the probe at once: bulk reads take whole chunks.
        let data = vec![7u8; PROBE + CHUNK];
        app.write_all(&data).await.expect("bulk");
        let first = read_chunk(&mut rd, &mut bulk).await.expect("read");
        assert_eq!(first.len(), PROBE);
        assert!(bulk, "a full probe means more is waiting");
        let mut got = first.len();
        while got < data.len() {
            let next = read_chunk(&mut rd, &mut bulk).await.expect("read");
            assert!(!next.is_empty());
            got += next.len();
        }
        assert_eq!(got, data.len());
        drop(app);
        assert!(read_chunk(&mut rd, &mut bulk)
            .await
            .expect("EOF")
            .is_empty());
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
        let (mut app, accepted) = tcp_pair().await;
        app.write_all(b"PING\r\n").await.expect("request");
        app.shutdown().await.expect("FIN");
        let endpoint = "10.0.0.2:15008".parse().expect("addr");
        let (send, answer) = crate::tunnel::start_stream(sender, endpoint, endpoint, "")
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
