//! The MLLP (HL7 v2 over TCP) server of both programs' listeners: the
//! agent's `hl7-mllp` devices and the hub's ADT feed.
//!
//! TCP, TLS optional (a rustls [`ServerConfig`], see [`crate::tls`]). Each
//! connection is framed with the sans-IO codec of
//! [`shared_protocol::hl7v2`]; every complete message goes to the
//! [`Handler`], whose answer (an ACK) is framed and written back before the
//! next message of that connection is handled, so messages of one
//! connection are handled in order.
//!
//! Limits ([`Limits`]): connections over `max_connections` are closed at
//! once (counted); a message over `max_message_bytes` is dropped without
//! being buffered and answered by [`Handler::oversized`]; unframed input
//! beyond `max_junk_bytes` closes the connection, as do `idle_timeout` of
//! silence and a TLS handshake longer than `handshake_timeout`. On shutdown
//! the server stops accepting and lets each open connection finish the
//! message in hand.
//!
//! The server logs nothing itself: it reports what happened as an
//! [`Event`] to the handler, which logs it with its own fields and words
//! (never message content).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rustls::ServerConfig;
use shared_protocol::hl7v2::{MllpDecoder, MllpError, mllp_encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long a client may take for the TLS handshake (both listeners).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections; more are closed at once.
    pub max_connections: usize,
    /// Largest message (without framing); larger ones are answered by
    /// [`Handler::oversized`] and dropped.
    pub max_message_bytes: usize,
    /// Unframed input a connection may send before it is closed.
    pub max_junk_bytes: usize,
    /// Silence after which a connection is closed.
    pub idle_timeout: Duration,
    /// Time limit of the TLS handshake.
    pub handshake_timeout: Duration,
}

/// What the server counts itself (the handler counts its answers).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections closed at once (over `max_connections`).
    pub connections_refused: AtomicU64,
    /// Bytes dropped by the framer: junk, truncated or oversized messages.
    pub bytes_dropped: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Something the server did, for the handler's logs and counters.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// Bound and accepting.
    Ready {
        listen: Option<SocketAddr>,
        tls: bool,
    },
    /// `accept` failed (e.g. out of file descriptors); retried after 100 ms.
    AcceptFailed(&'a io::Error),
    /// A connection over `max` was closed at once.
    Refused { max: usize },
    /// A connection was accepted.
    Connected { peer: SocketAddr },
    /// The TLS handshake failed; the connection is closed.
    HandshakeFailed(&'a io::Error),
    /// The TLS handshake took too long; the connection is closed.
    HandshakeTimedOut,
    /// The framer dropped bytes (already counted in
    /// [`Counters::bytes_dropped`]). An oversized message is then answered
    /// by [`Handler::oversized`]; other errors resynchronise silently.
    Unframed(&'a MllpError),
    /// Too much unframed input (`junk` bytes); the connection is closed.
    TooMuchJunk { junk: usize },
    /// No input for `idle_timeout`; the connection is closed.
    Idle,
    /// Shut down: no longer accepting, every connection finished.
    Stopped,
}

/// Who sent a message: the connection's peer address and, over TLS with
/// client authentication, the client's verified end-entity certificate
/// (DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub client_certificate: Option<Vec<u8>>,
}

/// What a listener does with its messages.
pub trait Handler: Send + Sync + 'static {
    /// One complete message (framing removed) from `peer` → the ACK to
    /// send back (unframed; the server frames it).
    fn message(&self, peer: &Peer, message: Vec<u8>) -> impl Future<Output = Vec<u8>> + Send;

    /// The ACK (normally AR) for a message larger than `max` bytes, of
    /// which only the first bytes (`head`, enough for MSH) were kept.
    fn oversized(&self, head: &[u8], max: usize) -> Vec<u8>;

    /// Where the server counts connections and dropped bytes.
    fn counters(&self) -> &Counters;

    /// Told of everything else that happens (logs, further counters).
    fn event(&self, event: Event<'_>) {
        let _ = event;
    }
}

/// A bound MLLP server, ready to [`serve`](Self::serve).
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Server {
    /// Binds `addr`; with `tls`, every connection is TLS.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<Arc<ServerConfig>>,
        limits: Limits,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server {
            listener,
            tls: tls.map(TlsAcceptor::from),
            limits,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accepts connections until `shutdown` turns true, then lets open
    /// connections finish the message in hand.
    pub async fn serve<H: Handler>(self, handler: Arc<H>, mut shutdown: watch::Receiver<bool>) {
        handler.event(Event::Ready {
            listen: self.listener.local_addr().ok(),
            tls: self.tls.is_some(),
        });
        let limits = self.limits;
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    handler.event(Event::AcceptFailed(&e));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                Counters::add(&handler.counters().connections_refused, 1);
                handler.event(Event::Refused {
                    max: limits.max_connections,
                });
                drop(stream);
                continue;
            };
            Counters::add(&handler.counters().connections, 1);
            let _ = stream.set_nodelay(true);
            let (handler, tls, sd) = (handler.clone(), self.tls.clone(), shutdown.clone());
            conns.spawn(async move {
                let _permit = permit;
                handler.event(Event::Connected { peer });
                match tls {
                    Some(acc) => {
                        match tokio::time::timeout(limits.handshake_timeout, acc.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => {
                                let client_certificate = s
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| c.as_ref().to_vec());
                                let peer = Peer {
                                    addr: peer,
                                    client_certificate,
                                };
                                connection(s, &peer, &*handler, &limits, sd).await
                            }
                            Ok(Err(e)) => handler.event(Event::HandshakeFailed(&e)),
                            Err(_) => handler.event(Event::HandshakeTimedOut),
                        }
                    }
                    None => {
                        let peer = Peer {
                            addr: peer,
                            client_certificate: None,
                        };
                        connection(stream, &peer, &*handler, &limits, sd).await
                    }
                }
            });
        }
        drop(self.listener);
        while conns.join_next().await.is_some() {}
        handler.event(Event::Stopped);
    }

    /// [`Server::serve`] until `stop` resolves (for a caller that signals
    /// shutdown by a future, e.g. a cancellation token's `cancelled()`),
    /// then the same shutdown: no more accepts, open connections finish the
    /// message in hand.
    pub async fn serve_until<H: Handler>(
        self,
        handler: Arc<H>,
        stop: impl Future<Output = ()> + Send,
    ) {
        let (tx, rx) = watch::channel(false);
        let serve = self.serve(handler, rx);
        tokio::pin!(serve);
        tokio::select! {
            () = &mut serve => return,
            () = stop => {
                let _ = tx.send(true);
            }
        }
        serve.await;
    }
}

/// One connection: MLLP in, one ACK out per message, in order.
async fn connection<S, H>(
    mut stream: S,
    peer: &Peer,
    handler: &H,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut dec = MllpDecoder::new(limits.max_message_bytes);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut junk = 0usize;
    loop {
        loop {
            let reply = match dec.decode(&mut buf) {
                Ok(Some(msg)) => Some(handler.message(peer, msg).await),
                Ok(None) => break,
                Err(e) => {
                    // Unframed bytes count toward the junk limit; an oversized
                    // message is answered and skipped without buffering.
                    if !matches!(e, MllpError::Oversized { .. }) {
                        junk += e.dropped();
                    }
                    Counters::add(&handler.counters().bytes_dropped, e.dropped() as u64);
                    handler.event(Event::Unframed(&e));
                    match &e {
                        MllpError::Oversized { head, max, .. } => {
                            Some(handler.oversized(head, *max))
                        }
                        _ => None,
                    }
                }
            };
            if let Some(ack) = reply
                && stream.write_all(&mllp_encode(&ack)).await.is_err()
            {
                return;
            }
            if junk > limits.max_junk_bytes {
                handler.event(Event::TooMuchJunk { junk });
                return;
            }
        }
        let _ = stream.flush().await;
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let read = tokio::select! {
            r = tokio::time::timeout(limits.idle_timeout, stream.read_buf(&mut buf)) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                handler.event(Event::Idle);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
