//! The server over real loopback sockets, with a handler that answers
//! `ACK <message>` (after an optional delay) and records the events.

use super::*;
use crate::tls::ClientAuth;
use std::sync::Mutex;
use tokio::net::TcpStream;

#[derive(Debug, Default)]
struct Echo {
    counters: Counters,
    events: Mutex<Vec<String>>,
    delay: Duration,
    /// The peer of each message handled.
    peers: Mutex<Vec<Peer>>,
}

impl Echo {
    fn saw(&self, prefix: &str) -> usize {
        let ev = self.events.lock().unwrap();
        ev.iter().filter(|e| e.starts_with(prefix)).count()
    }
}

impl Handler for Echo {
    async fn message(&self, peer: &Peer, message: Vec<u8>) -> Vec<u8> {
        self.peers.lock().unwrap().push(peer.clone());
        tokio::time::sleep(self.delay).await;
        [b"ACK ".as_slice(), &message].concat()
    }

    fn oversized(&self, head: &[u8], max: usize) -> Vec<u8> {
        format!("AR {max} {}", String::from_utf8_lossy(&head[..3])).into_bytes()
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn event(&self, event: Event<'_>) {
        let name = format!("{event:?}");
        self.events.lock().unwrap().push(name);
    }
}

fn limits() -> Limits {
    Limits {
        max_connections: 4,
        max_message_bytes: 64,
        max_junk_bytes: 100,
        idle_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(5),
    }
}

struct Running {
    addr: SocketAddr,
    handler: Arc<Echo>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(handler: Echo, limits: Limits, tls: Option<Arc<ServerConfig>>) -> Running {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), tls, limits)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let handler = Arc::new(handler);
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve(handler.clone(), rx));
    Running {
        addr,
        handler,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) -> Arc<Echo> {
        // (Already gone when the test stopped it itself.)
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops")
            .unwrap();
        self.handler
    }
}

/// Reads one framed answer.
async fn answer<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut dec = MllpDecoder::default();
    let mut buf = BytesMut::new();
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(a)) => return Some(String::from_utf8(a).unwrap()),
            Ok(None) => {}
            // Not MLLP (e.g. a TLS alert): skipped.
            Err(_) => continue,
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
            .await
            .expect("an answer or a close in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
    }
}

/// True when the peer closed the connection (EOF or reset).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
    matches!(r, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test]
async fn frames_split_across_reads_and_several_in_one_read() {
    let r = start(Echo::default(), limits(), None).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    // One message, a byte per write.
    for b in mllp_encode(b"MSH|one") {
        c.write_all(&[b]).await.unwrap();
        c.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|one"));
    // Two messages and the start of a third in one write; the rest later.
    let mut w = mllp_encode(b"MSH|two");
    w.extend(mllp_encode(b"MSH|three"));
    let four = mllp_encode(b"MSH|four");
    w.extend(&four[..5]);
    c.write_all(&w).await.unwrap();
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|two"));
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|three"));
    c.write_all(&four[5..]).await.unwrap();
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|four"));
    let h = r.stop().await;
    assert_eq!(Counters::get(&h.counters.connections), 1);
    assert_eq!(Counters::get(&h.counters.bytes_dropped), 0);
    assert_eq!(h.saw("Ready"), 1);
    assert_eq!(h.saw("Connected"), 1);
    assert_eq!(h.saw("Stopped"), 1);
}

#[tokio::test]
async fn an_oversized_message_is_answered_counted_and_skipped() {
    let r = start(Echo::default(), limits(), None).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut big = b"MSH|".to_vec();
    big.extend(std::iter::repeat_n(b'x', 200));
    let mut w = mllp_encode(&big);
    w.extend(mllp_encode(b"MSH|next"));
    c.write_all(&w).await.unwrap();
    assert_eq!(answer(&mut c).await.as_deref(), Some("AR 64 MSH"));
    // The connection goes on with the next message.
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|next"));
    let h = r.stop().await;
    let dropped = Counters::get(&h.counters.bytes_dropped);
    assert!(dropped >= 200, "{dropped}");
    assert_eq!(h.saw("Unframed(Oversized"), 1);
    assert_eq!(h.saw("TooMuchJunk"), 0, "an oversized message is not junk");
}

#[tokio::test]
async fn junk_is_dropped_and_too_much_of_it_closes_the_connection() {
    let r = start(Echo::default(), limits(), None).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    // A little junk before a message is skipped.
    let mut w = b"noise".to_vec();
    w.extend(mllp_encode(b"MSH|after-noise"));
    c.write_all(&w).await.unwrap();
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|after-noise"));
    assert_eq!(Counters::get(&r.handler.counters.bytes_dropped), 5);
    // More than max_junk_bytes of it closes the connection.
    c.write_all(&[b'j'; 300]).await.unwrap();
    assert!(closed(&mut c).await);
    let h = r.stop().await;
    assert_eq!(h.saw("TooMuchJunk"), 1);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let r = start(
        Echo::default(),
        Limits {
            max_connections: 1,
            ..limits()
        },
        None,
    )
    .await;
    let mut first = TcpStream::connect(r.addr).await.unwrap();
    first.write_all(&mllp_encode(b"MSH|1")).await.unwrap();
    assert_eq!(answer(&mut first).await.as_deref(), Some("ACK MSH|1"));
    let mut second = TcpStream::connect(r.addr).await.unwrap();
    assert!(closed(&mut second).await);
    assert_eq!(Counters::get(&r.handler.counters.connections_refused), 1);
    // Once the first is gone, a new one is served.
    drop(first);
    let mut third = loop {
        let mut c = TcpStream::connect(r.addr).await.unwrap();
        c.write_all(&mllp_encode(b"MSH|3")).await.unwrap();
        if answer(&mut c).await.is_some() {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    third.write_all(&mllp_encode(b"MSH|4")).await.unwrap();
    assert_eq!(answer(&mut third).await.as_deref(), Some("ACK MSH|4"));
    let h = r.stop().await;
    assert!(h.saw("Refused { max: 1 }") >= 1);
    assert_eq!(Counters::get(&h.counters.connections), 2, "first and third");
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let r = start(
        Echo::default(),
        Limits {
            idle_timeout: Duration::from_millis(100),
            ..limits()
        },
        None,
    )
    .await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    assert!(closed(&mut c).await);
    let h = r.stop().await;
    assert_eq!(h.saw("Idle"), 1);
}

#[tokio::test]
async fn shutdown_finishes_the_message_in_hand_then_closes() {
    let r = start(
        Echo {
            delay: Duration::from_millis(300),
            ..Echo::default()
        },
        limits(),
        None,
    )
    .await;
    let mut busy = TcpStream::connect(r.addr).await.unwrap();
    let mut idle = TcpStream::connect(r.addr).await.unwrap();
    busy.write_all(&mllp_encode(b"MSH|slow")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.stop.send(true).unwrap();
    // The message being handled is still answered, then both close.
    assert_eq!(answer(&mut busy).await.as_deref(), Some("ACK MSH|slow"));
    assert!(closed(&mut busy).await);
    assert!(closed(&mut idle).await);
    let addr = r.addr;
    let h = r.stop().await;
    assert_eq!(h.saw("Stopped"), 1);
    // No longer listening.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn serve_until_shuts_down_when_its_future_resolves() {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), None, limits())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let handler = Arc::new(Echo::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve_until(handler.clone(), async move {
        let _ = stopped.await;
    }));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&mllp_encode(b"MSH|1")).await.unwrap();
    assert_eq!(answer(&mut c).await.as_deref(), Some("ACK MSH|1"));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server stopped")
        .unwrap();
    assert!(closed(&mut c).await);
    assert_eq!(handler.saw("Stopped"), 1);
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn tls_with_the_built_configs_and_plaintext_refused() {
    let pki = crate::tls::tests::Pki::new();
    let ca = crate::tls::PemFile::new("client_ca_file", &pki.ca);
    let r = start(
        Echo::default(),
        limits(),
        Some(pki.server(ClientAuth::Required(ca))),
    )
    .await;
    let connector = tokio_rustls::TlsConnector::from(pki.client(true));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(r.addr).await.unwrap();
    let mut s = connector.connect(name.clone(), tcp).await.unwrap();
    s.write_all(&mllp_encode(b"MSH|tls")).await.unwrap();
    assert_eq!(answer(&mut s).await.as_deref(), Some("ACK MSH|tls"));
    // Plaintext MLLP to the TLS port gets no answer.
    let mut plain = TcpStream::connect(r.addr).await.unwrap();
    plain.write_all(&mllp_encode(b"MSH|plain")).await.unwrap();
    assert_eq!(answer(&mut plain).await, None);
    // Without a client certificate (required here) nothing is answered.
    let tcp = TcpStream::connect(r.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client(false));
    if let Ok(mut s) = connector.connect(name, tcp).await {
        let _ = s.write_all(&mllp_encode(b"MSH|anon")).await;
        let mut b = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    }
    let h = r.stop().await;
    assert_eq!(h.saw("HandshakeFailed"), 2, "plaintext and no certificate");
    // The handler learns who sent the message: address and certificate.
    let peers = h.peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert!(peers[0].addr.ip().is_loopback());
    let cert = peers[0]
        .client_certificate
        .as_deref()
        .expect("client certificate");
    assert_eq!(cert.first(), Some(&0x30), "DER SEQUENCE");
    assert_eq!(Counters::get(&h.counters.connections), 3);
}
