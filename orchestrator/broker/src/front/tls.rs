//! The front's TLS: rustls' unbuffered server connection under a stream the sessions read and
//! write, holding a buffer only while it holds bytes.
//!
//! Why not tokio-rustls, as before: rustls' buffered connection keeps a 4 KiB read buffer for as
//! long as the connection lives (it sizes it to 4 KiB before every read and never below), and a
//! connected, idle device is what the orchestrator holds most of (goal S4, docs/BENCHMARKS.md).
//! Here received TLS bytes are kept only while a record is incomplete, decrypted bytes only
//! until the session reads them, and encrypted bytes only until the socket takes them: an idle
//! device's connection holds no buffer at all.
//!
//! Invariant: bytes reach the socket in the order rustls produced them (handshake messages,
//! alerts, key updates and application data alike): everything goes through `outgoing`, or
//! straight to the socket only when `outgoing` is empty.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Most received bytes held unprocessed: a whole handshake message (rustls joins them up to
/// 64 KiB) plus a record's worth. Past it the connection fails instead of growing.
const MAX_INCOMING: usize = 0x1_0000 + 0x4400;

/// Bytes asked of the socket per read. A device's requests, reports and its handshake flight
/// are each far smaller.
const READ_SIZE: usize = 8 * 1024;

/// Most plaintext sealed per write: bounds the thread's sealing buffer and what is left in
/// `outgoing` when the socket takes only part.
const MAX_WRITE: usize = 64 * 1024;

thread_local! {
    /// Where a write is sealed before it goes to the socket: per thread, because a write is
    /// sealed and handed to the socket within one poll, so no connection needs its own.
    static SEALED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A server-side TLS connection whose handshake is done.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes not yet processed: an incomplete record at most, once the handshake is
    /// done (rustls processes every complete one as it reads).
    incoming: Vec<u8>,
    /// Decrypted bytes the session has not read yet, from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// Bytes for the socket that it has not taken yet, from `out_at` on.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent close_notify: once `plain` is read, reads see the end of the stream.
    peer_closed: bool,
    /// Our close_notify is in `outgoing` (or sent).
    close_queued: bool,
    /// The reader, while it waits: the writer's half may process a record that gives it bytes.
    reader: Option<Waker>,
}

/// What the writer's half asks of rustls once it may send application data.
enum Outbound<'a> {
    Data(&'a [IoSlice<'a>]),
    CloseNotify,
}

/// Where driving rustls stopped.
enum Stop {
    /// It needs more bytes from the peer (the handshake, or the next record).
    NeedBytes,
    /// The peer closed the connection.
    Closed,
    /// It sealed this many plaintext bytes (or the close_notify) into the thread's buffer,
    /// whose first `sealed` bytes are for the socket.
    Sealed { plain: usize, sealed: usize },
}

/// Runs the handshake of `tcp` as the server of `config`. No deadline of its own: the caller
/// bounds it.
pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut tls = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        out_at: 0,
        peer_closed: false,
        close_queued: false,
        reader: None,
    };
    loop {
        let stop = match tls.drive(None) {
            Ok(stop) => stop,
            Err(e) => {
                tls.send_alert().await;
                return Err(e);
            }
        };
        tls.flush_outgoing().await?;
        if !tls.conn.is_handshaking() {
            return Ok(tls);
        }
        match stop {
            Stop::NeedBytes => {
                if tls.incoming.len() >= MAX_INCOMING {
                    return Err(invalid("handshake message over the input cap"));
                }
                let mut buf = [0u8; READ_SIZE];
                let n = tls.tcp.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                tls.incoming.extend_from_slice(&buf[..n]);
            }
            Stop::Closed | Stop::Sealed { .. } => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

impl TlsStream {
    /// The client's certificate chain, end entity first.
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Bytes held in the connection's own buffers (for tests: an idle connection holds none).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Runs rustls over the received bytes until it needs more of them, the peer has closed,
    /// or (with `send`) it has sealed what the writer gives it into the thread's buffer.
    /// Decrypted bytes go to `plain`; handshake messages, alerts and key updates to `outgoing`.
    fn drive(&mut self, send: Option<Outbound<'_>>) -> io::Result<Stop> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    discard_front(&mut self.incoming, discard);
                    return Err(invalid(e));
                }
            };
            let stop = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    if self.plain_at == self.plain.len() {
                        self.plain.clear();
                        self.plain_at = 0;
                    }
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let at = self.outgoing.len();
                    let mut room = 1024;
                    loop {
                        self.outgoing.resize(at + room, 0);
                        match encode.encode(&mut self.outgoing[at..]) {
                            Ok(n) => {
                                self.outgoing.truncate(at + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => room = required_size,
                            Err(EncodeError::AlreadyEncoded) => {
                                self.outgoing.truncate(at);
                                break;
                            }
                        }
                    }
                    None
                }
                // What rustls encoded is in `outgoing`, and goes to the socket before anything
                // sealed later (see the module's invariant).
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    if send.is_none() {
                        Some(Stop::Closed)
                    } else {
                        None
                    }
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Stop::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => match &send {
                    None => Some(Stop::NeedBytes),
                    Some(send) => Some(SEALED.with_borrow_mut(|sealed| {
                        seal(&mut traffic, send, sealed)
                            .map(|(plain, n)| Stop::Sealed { plain, sealed: n })
                    })?),
                },
                ConnectionState::BlockedHandshake => Some(Stop::NeedBytes),
                // No early data is accepted (the config allows none), and any state a later
                // rustls adds is one this stream does not know how to serve.
                _ => {
                    discard_front(&mut self.incoming, discard);
                    return Err(invalid("unexpected TLS connection state"));
                }
            };
            discard_front(&mut self.incoming, discard);
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Takes decrypted bytes into `buf`; false if there were none.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let held = &self.plain[self.plain_at..];
        if held.is_empty() || buf.remaining() == 0 {
            return false;
        }
        let n = held.len().min(buf.remaining());
        buf.put_slice(&held[..n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        true
    }

    /// Wakes a waiting reader if the writer's half gave it something to read.
    fn wake_reader(&mut self) {
        if self.plain_at < self.plain.len() || self.peer_closed {
            if let Some(waker) = self.reader.take() {
                waker.wake();
            }
        }
    }

    /// Hands `outgoing` to the socket, registering for when it can take more.
    fn poll_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.outgoing = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Hands `outgoing` to the socket as far as it takes it now, without registering for
    /// later: the reader's half uses this, so that it never takes the writer's place as the
    /// task woken when the socket can take more. What is left goes with the next write.
    fn try_outgoing(&mut self) -> io::Result<()> {
        while self.out_at < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.out_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.outgoing = Vec::new();
        self.out_at = 0;
        Ok(())
    }

    async fn flush_outgoing(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_outgoing(cx)).await
    }

    /// Best effort, after a failed handshake: the alert rustls queued, within the handshake's
    /// own deadline (the caller's).
    async fn send_alert(&mut self) {
        if let ConnectionState::EncodeTlsData(mut encode) =
            match self.conn.process_tls_records(&mut self.incoming).state {
                Ok(state) => state,
                Err(_) => return,
            }
        {
            let mut alert = [0u8; 64];
            if let Ok(n) = encode.encode(&mut alert) {
                let _ = self.tcp.write_all(&alert[..n]).await;
            }
        }
    }

    /// The writer's half: seals `send` and hands it to the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>, send: Outbound<'_>) -> Poll<io::Result<usize>> {
        // Earlier bytes first, and at most one write's worth waiting at any time.
        ready!(self.poll_outgoing(cx))?;
        let stop = self.drive(Some(send));
        self.wake_reader();
        let (plain, sealed) = match stop? {
            Stop::Sealed { plain, sealed } => (plain, sealed),
            Stop::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Stop::NeedBytes => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        };
        // What rustls produced on the way (a key update) goes first. The write is sealed now,
        // so nothing below may return `Pending`: what the socket does not take waits in
        // `outgoing`, and the write counts as done.
        if let Poll::Ready(Err(e)) = self.poll_outgoing(cx) {
            return Poll::Ready(Err(e));
        }
        SEALED.with_borrow(|buf| -> io::Result<()> {
            let buf = &buf[..sealed];
            let mut at = 0;
            if self.outgoing.is_empty() {
                while at < buf.len() {
                    match Pin::new(&mut self.tcp).poll_write(cx, &buf[at..]) {
                        Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => break,
                    }
                }
            }
            // Sealed bytes are never sealed again: what the socket did not take waits here.
            self.outgoing.extend_from_slice(&buf[at..]);
            Ok(())
        })?;
        Poll::Ready(Ok(plain))
    }
}

/// Seals what `send` asks into `sealed` (grown as rustls asks), returning the plaintext taken
/// and the sealed length.
fn seal(
    traffic: &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
    send: &Outbound<'_>,
    sealed: &mut Vec<u8>,
) -> io::Result<(usize, usize)> {
    let mut plain = 0;
    let mut len = 0;
    let mut seal_one = |data: &[u8], close: bool| -> io::Result<()> {
        loop {
            let room = &mut sealed[len..];
            let r = if close {
                traffic.queue_close_notify(room)
            } else {
                traffic.encrypt(data, room)
            };
            match r {
                Ok(n) => {
                    len += n;
                    return Ok(());
                }
                Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                    sealed.resize(len + required_size, 0);
                }
                Err(e @ EncryptError::EncryptExhausted) => return Err(invalid(e)),
            }
        }
    };
    match send {
        Outbound::Data(bufs) => {
            for buf in bufs.iter() {
                let take = buf.len().min(MAX_WRITE - plain);
                if take == 0 {
                    break;
                }
                seal_one(&buf[..take], false)?;
                plain += take;
            }
        }
        Outbound::CloseNotify => seal_one(&[], true)?,
    }
    Ok((plain, len))
}

fn discard_front(buf: &mut Vec<u8>, n: usize) {
    if n == 0 {
        return;
    }
    if n >= buf.len() {
        *buf = Vec::new();
    } else {
        buf.drain(..n);
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.take_plain(buf) || this.peer_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.drive(None)? {
                Stop::Closed => continue,
                Stop::Sealed { .. } => return Poll::Ready(Err(invalid("sealed on a read"))),
                Stop::NeedBytes if this.plain_at < this.plain.len() => continue,
                Stop::NeedBytes => {}
            }
            // A key update or alert rustls produced goes out before we wait for the peer.
            this.try_outgoing()?;
            if this.incoming.len() >= MAX_INCOMING {
                return Poll::Ready(Err(invalid("TLS input over its cap")));
            }
            let mut scratch = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut read = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut this.tcp).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The end of the stream without close_notify: whatever is unread is lost,
                    // as it would be for a peer that vanished, and the session ends.
                    this.peer_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => this.incoming.extend_from_slice(read.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    this.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        self.get_mut().poll_send(cx, Outbound::Data(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            // A connection rustls has closed already has nothing more to say.
            let _ = ready!(this.poll_send(cx, Outbound::CloseNotify));
            this.close_queued = true;
        }
        ready!(this.poll_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use aloft_certs::tls::{client_config, install_crypto_provider, server_config};
    use aloft_certs::{device_csr, FleetCa, Validity};
    use aloft_proto::DeviceId;
    use rustls::pki_types::ServerName;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    /// A fleet CA's server config, and a client config for device `dev-1` whose certificate
    /// the fleet CA issued, or (`stranger`) another CA.
    fn configs(stranger: bool) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        install_crypto_provider();
        let ca = FleetCa::create("Aloft TLS Test CA", 1).expect("ca");
        let hosts = ["localhost".to_owned()];
        let server = ca.issue_server(&hosts, Validity::days(1)).expect("server");
        let tls = server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem, vec![])
            .expect("server config");
        let other = FleetCa::create("Another CA", 1).expect("other ca");
        let issuer = if stranger { &other } else { &ca };
        let csr = device_csr(&DeviceId::new("dev-1").expect("id"), &[7; 32]).expect("csr");
        let cert = issuer
            .issue_device(&csr.csr_pem, Validity::days(1))
            .expect("cert");
        // The client trusts the fleet CA's server either way.
        let client = client_config(ca.cert_pem(), &cert, &csr.key_pem).expect("client config");
        (Arc::new(tls), Arc::new(client))
    }

    /// Accepts one connection with `server` and connects `client` to it.
    async fn pair(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (
        io::Result<TlsStream>,
        io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            accept(tcp, server).await
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let client = TlsConnector::from(client).connect(name, tcp).await;
        (accepted.await.expect("join"), client)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_megabyte_each_way_arrives_whole_and_an_idle_connection_holds_no_buffer() {
        let (server, client) = configs(false);
        let (server, client) = pair(server, client).await;
        let (mut server, mut client) = (server.expect("server side"), client.expect("client"));
        let cert = server.peer_certificates().and_then(|c| c.first()).cloned();
        let identity = aloft_certs::parse_identity(cert.expect("client certificate").as_ref());
        assert_eq!(identity.expect("identity").id, "dev-1");

        let up: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
        let send_up = {
            let up = up.clone();
            async move {
                client.write_all(&up).await.expect("client writes");
                let mut got = vec![0u8; 1 << 20];
                client.read_exact(&mut got).await.expect("client reads");
                (client, got)
            }
        };
        let serve = async {
            let mut got = vec![0u8; up.len()];
            server.read_exact(&mut got).await.expect("server reads");
            // Written in pieces of every size, vectored, as the sessions write.
            let mut at = 0;
            let mut size = 1;
            while at < down.len() {
                let end = (at + size).min(down.len());
                let (a, b) = down[at..end].split_at((end - at) / 2);
                let n = server
                    .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                    .await
                    .expect("server writes");
                at += n;
                size = size * 3 + 1;
            }
            server.flush().await.expect("server flushes");
            got
        };
        let ((mut client, client_got), server_got) = tokio::join!(send_up, serve);
        assert!(server_got == up, "the server read what the client wrote");
        assert!(client_got == down, "the client read what the server wrote");
        assert_eq!(server.held(), 0, "an idle connection holds no buffer");

        // A close_notify is the end of the stream for the server's reader, and the server's
        // own goes back as a clean end for the client.
        client.shutdown().await.expect("client closes");
        let mut rest = Vec::new();
        assert_eq!(
            server
                .read_to_end(&mut rest)
                .await
                .expect("server reads the end"),
            0
        );
        server.shutdown().await.expect("server closes");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("a clean end for the client");
        assert!(rest.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_of_another_ca_is_refused_with_an_alert() {
        let (server, client) = configs(true);
        let (server, client) = pair(server, client).await;
        assert!(server.is_err(), "the handshake fails on the server");
        // In TLS 1.3 the client's handshake is over before the server has checked its
        // certificate: it learns why on its first read, from the server's alert.
        let mut client = client.expect("the client's side of the handshake completes");
        let mut b = [0u8; 1];
        let err = client.read(&mut b).await.expect_err("refused");
        assert!(
            err.to_string().contains("received fatal alert"),
            "an alert, not a closed socket: {err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_that_are_not_tls_records_end_the_read_with_an_error() {
        let (server, client) = configs(false);
        let (server, client) = pair(server, client).await;
        let (mut server, client) = (server.expect("server side"), client.expect("client"));
        let (mut tcp, _) = client.into_inner();
        // A record header with an unknown content type and a length past any record's.
        tcp.write_all(&[0x42, 0x03, 0x03, 0xff, 0xff, 0, 0, 0])
            .await
            .expect("garbage");
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
