//! A connected UDP socket as a byte link, for protocols whose LAN variant
//! carries one message per datagram (IntelliVue Data Export over LAN).
//!
//! Each `write` sends one datagram (sessions write each message with one
//! `write_all`); reads hand out received datagrams in order, buffering a
//! datagram larger than the caller's buffer instead of truncating it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;

/// Largest datagram accepted (the UDP maximum payload).
const MAX_DATAGRAM: usize = 65_507;

#[derive(Debug)]
pub struct UdpLink {
    sock: UdpSocket,
    /// Rest of a datagram the caller's buffer could not take.
    pending: Vec<u8>,
    at: usize,
}

impl UdpLink {
    /// Wrap a socket already `connect`ed to its peer.
    pub fn new(sock: UdpSocket) -> Self {
        UdpLink {
            sock,
            pending: Vec::new(),
            at: 0,
        }
    }

    /// Bind an ephemeral local port and connect to `peer` (`host:port`).
    pub async fn connect(peer: &str) -> io::Result<Self> {
        let addr: SocketAddr = tokio::net::lookup_host(peer).await?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{peer}: no address"))
        })?;
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("literal");
        let sock = UdpSocket::bind(local).await?;
        sock.connect(addr).await?;
        Ok(UdpLink::new(sock))
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }
}

impl AsyncRead for UdpLink {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.pending.len() {
            let n = (self.pending.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.pending[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        let mut dgram = vec![0u8; MAX_DATAGRAM];
        let mut rb = ReadBuf::new(&mut dgram);
        match self.sock.poll_recv(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let len = rb.filled().len();
                let n = len.min(buf.remaining());
                buf.put_slice(&dgram[..n]);
                if n < len {
                    dgram.truncate(len);
                    self.pending = dgram;
                    self.at = n;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for UdpLink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.sock.poll_send(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn datagrams_round_trip_and_large_ones_are_not_truncated() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut client = UdpLink::connect(&server.local_addr().unwrap().to_string())
            .await
            .unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 16];
        let (n, from) = server.recv_from(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"hello");
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        server.send_to(&big, from).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        while got.len() < big.len() {
            let n = client.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, big);
    }
}
