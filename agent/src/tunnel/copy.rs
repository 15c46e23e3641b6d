//! Moving bytes between a TCP socket and an HTTP/2 stream, both ways, with HTTP/2 flow
//! control respected and half-closes carried across (FIN ⇄ END_STREAM).
use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
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
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let mut data = buf.freeze();
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
async fn read_into(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        rd.readable().await?;
        buf.reserve(CHUNK);
        match rd.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
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
