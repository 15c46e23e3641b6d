//! Moving bytes between a TCP socket and an HTTP/2 stream, both ways, with HTTP/2 flow
//! control respected and half-closes carried across (FIN ⇄ END_STREAM).
use std::{future::poll_fn, io};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
pub async fn copy_bidirectional(
    tcp: tokio::net::TcpStream,
    mut send: h2::SendStream<Bytes>,
    mut recv: h2::RecvStream,
) -> io::Result<Transferred> {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let n = tcp_to_stream(&mut rd, &mut send).await;
        if n.is_err() {
            send.send_reset(h2::Reason::CANCEL);
        }
        n
    };
    let down = async {
        let n = stream_to_tcp(&mut recv, &mut wr).await;
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

async fn tcp_to_stream<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut h2::SendStream<Bytes>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        let mut data = buf.split().freeze();
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

async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut h2::RecvStream,
    wr: &mut W,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        total += n as u64;
        // Give the window back only once the bytes are with the app: backpressure.
        let _ = recv.flow_control().release_capacity(n);
    }
    Ok(total)
}
