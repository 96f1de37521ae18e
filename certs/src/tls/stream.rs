//! A TLS stream over rustls' unbuffered API, for either end: the front's server connections
//! and the simulated devices' client connections. It holds a buffer only while it holds bytes.
//!
//! Why not tokio-rustls: rustls' buffered connection keeps a 4 KiB read buffer for as long as
//! the connection lives (it sizes it to 4 KiB before every read and never below), and a
//! connected, idle device is what the orchestrator holds most of (goal S4, docs/BENCHMARKS.md);
//! a simulator holds 10,000 such connections (S6). Here received TLS bytes are kept only while a
//! record is incomplete, decrypted bytes only until they are read, and encrypted bytes only
//! until the socket takes them: an idle connection holds no buffer at all. The socket is read
//! up to 32 KiB at a time (rustls' buffered connection reads at most 4 KiB past what it holds,
//! and a simulated device's 16 KiB chunk frame took four or five `recv` calls).
//!
//! Invariant: bytes reach the socket in the order rustls produced them (handshake messages,
//! alerts, key updates and application data alike): everything goes through `outgoing`, or
//! straight to the socket only when `outgoing` is empty.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus, WriteTraffic,
};
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Most received bytes held unprocessed: a whole handshake message (rustls joins them up to
/// 64 KiB) plus a record's worth. Past it the connection fails instead of growing.
const MAX_INCOMING: usize = 0x1_0000 + 0x4400;

/// Bytes asked of the socket per read: a 16 KiB chunk frame and the start of the next.
const READ_SIZE: usize = 32 * 1024;

/// Most plaintext sealed per write: bounds the thread's sealing buffer and what is left in
/// `outgoing` when the socket takes only part. Above what a writer gathers for one write: the
/// front gathers chunk frames until it holds 64 KiB, so four 16 KiB frames (65.8 KiB) left in
/// two writes when this was 64 KiB, the second a 300-byte record of its own: a third of the
/// orchestrator's system calls while 10,000 devices downloaded.
const MAX_WRITE: usize = 128 * 1024;

thread_local! {
    /// Where a write is sealed before it goes to the socket: per thread, because a write is
    /// sealed and handed to the socket within one poll, so no connection needs its own.
    static SEALED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Where the ends of slices are joined into whole records (see [`seal`]).
    static JOINT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Either end of a rustls connection, as the stream drives it.
pub trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Send + Unpin {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

/// rustls gives each end its own inherent `process_tls_records`, and no trait to name both.
macro_rules! side {
    ($conn:ty, $data:ty) => {
        impl Side for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
        }
    };
}

side!(UnbufferedServerConnection, ServerConnectionData);
side!(UnbufferedClientConnection, ClientConnectionData);

/// A TLS connection whose handshake is done, as the server (`TlsStream<Server>`) or the client.
pub struct TlsStream<C> {
    tcp: TcpStream,
    conn: C,
    /// Received bytes not yet processed, from `in_at` on: an incomplete record at most, once
    /// the handshake is done (every complete one is processed as it is read). What rustls is
    /// done with is skipped, not moved: moving the rest of a 32 KiB read down after each
    /// record copied the read several times over.
    incoming: Vec<u8>,
    in_at: usize,
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
    /// Plaintext bytes per record, as rustls cuts them (see [`record_plaintext`]).
    frag: usize,
}

/// The plaintext rustls puts in a record under a config's `max_fragment_size`: that size less
/// the 5-byte record header (rustls' `MessageFragmenter`), or TLS's 16 KiB without one. Only
/// how full records are depends on it, never what arrives.
fn record_plaintext(max_fragment_size: Option<usize>) -> usize {
    max_fragment_size.map_or(16 * 1024, |n| n.saturating_sub(5).clamp(32, 16 * 1024))
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

/// The server's end.
pub type Server = UnbufferedServerConnection;
/// The client's end.
pub type Client = UnbufferedClientConnection;

/// Runs the handshake of `tcp` as the server of `config`. No deadline of its own: the caller
/// bounds it.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream<Server>> {
    let frag = record_plaintext(config.max_fragment_size);
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    handshake(tcp, conn, frag).await
}

/// Runs the handshake of `tcp` as a client of `config` to `name`. No deadline of its own: the
/// caller bounds it.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<TlsStream<Client>> {
    let frag = record_plaintext(config.max_fragment_size);
    let conn = UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    handshake(tcp, conn, frag).await
}

async fn handshake<C: Side>(tcp: TcpStream, conn: C, frag: usize) -> io::Result<TlsStream<C>> {
    let mut tls = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        in_at: 0,
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        out_at: 0,
        peer_closed: false,
        close_queued: false,
        reader: None,
        frag,
    };
    loop {
        let stop = match tls.drive(None, None) {
            Ok(stop) => stop,
            Err(e) => {
                tls.send_alert().await;
                return Err(e);
            }
        };
        tls.flush_outgoing().await?;
        if !tls.common().is_handshaking() {
            return Ok(tls);
        }
        match stop {
            Stop::NeedBytes => {
                if std::future::poll_fn(|cx| tls.poll_fill(cx)).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Stop::Closed | Stop::Sealed { .. } => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

impl<C: Side> TlsStream<C> {
    /// The peer's certificate chain, end entity first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.common().peer_certificates()
    }

    fn common(&self) -> &CommonState {
        &self.conn
    }

    /// Bytes held in the connection's own buffers (for tests: an idle connection holds none).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Runs rustls over the received bytes until it needs more of them, the peer has closed,
    /// or (with `send`) it has sealed what the writer gives it into the thread's buffer.
    /// Decrypted bytes go to `read_into` while it has room and nothing is waiting before them,
    /// then to `plain`; handshake messages, alerts and key updates go to `outgoing`.
    fn drive(
        &mut self,
        mut read_into: Option<&mut ReadBuf<'_>>,
        send: Option<Outbound<'_>>,
    ) -> io::Result<Stop> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process(&mut self.incoming[self.in_at..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.discard(discard);
                    return Err(invalid(e));
                }
            };
            let stop = match state {
                // `plain` is empty (and `plain_at` 0) whenever nothing in it waits to be read:
                // `take_plain` lets it go as it empties it.
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(buf) = read_into.as_deref_mut() {
                            if self.plain.is_empty() {
                                let n = payload.len().min(buf.remaining());
                                buf.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                        }
                        self.plain.extend_from_slice(payload);
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
                        seal(&mut traffic, send, self.frag, sealed)
                            .map(|(plain, n)| Stop::Sealed { plain, sealed: n })
                    })?),
                },
                ConnectionState::BlockedHandshake => Some(Stop::NeedBytes),
                // No early data is accepted (the config allows none), and any state a later
                // rustls adds is one this stream does not know how to serve.
                _ => {
                    self.discard(discard);
                    return Err(invalid("unexpected TLS connection state"));
                }
            };
            self.discard(discard);
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Skips `n` processed bytes of `incoming`, and lets it go once all are processed.
    fn discard(&mut self, n: usize) {
        self.in_at = (self.in_at + n).min(self.incoming.len());
        if self.in_at == self.incoming.len() {
            self.incoming = Vec::new();
            self.in_at = 0;
        }
    }

    /// Reads what the socket holds (up to [`READ_SIZE`]) onto `incoming`: 0 at its end.
    ///
    /// The read goes through a buffer on this call's stack, not in any future: a handshake
    /// that kept 32 KiB in its future cost the front that much per pending handshake, and
    /// its heap kept the high-water mark of a connect storm.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() - self.in_at >= MAX_INCOMING {
            return Poll::Ready(Err(invalid("TLS input over its cap")));
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut read = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut read))?;
        if self.in_at > 0 {
            self.incoming.drain(..self.in_at);
            self.in_at = 0;
        }
        self.incoming.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
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
        self.outgoing_sent();
        Poll::Ready(Ok(()))
    }

    /// Everything in `outgoing` is with the socket: its buffer is let go.
    fn outgoing_sent(&mut self) {
        self.outgoing = Vec::new();
        self.out_at = 0;
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
        self.outgoing_sent();
        Ok(())
    }

    async fn flush_outgoing(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_outgoing(cx)).await
    }

    /// Best effort, after a failed handshake: the alert rustls queued, within the handshake's
    /// own deadline (the caller's).
    async fn send_alert(&mut self) {
        if let ConnectionState::EncodeTlsData(mut encode) =
            match self.conn.process(&mut self.incoming[self.in_at..]).state {
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
        let stop = self.drive(None, Some(send));
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
fn seal<D>(
    traffic: &mut WriteTraffic<'_, D>,
    send: &Outbound<'_>,
    frag: usize,
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
        // rustls cuts records at `frag` bytes of plaintext within one `encrypt`, and ends one at
        // the end of each. Sealed slice by slice, a chunk frame's small header was a record of
        // its own and its body's tail another: slices are packed instead, whole records sealed
        // straight from a slice and what is left joined with what follows in `joint`.
        Outbound::Data(bufs) => {
            plain = JOINT.with_borrow_mut(|joint| {
                pack(bufs, MAX_WRITE, frag, joint, |piece| seal_one(piece, false))
            })?;
        }
        Outbound::CloseNotify => seal_one(&[], true)?,
    }
    Ok((plain, len))
}

/// Hands `bufs` (at most `limit` bytes of them) to `seal` in pieces that are whole records of
/// `frag` bytes, but for the last: whole records straight from a slice, the ends of slices
/// joined in `joint`. Returns the bytes taken.
fn pack(
    bufs: &[IoSlice<'_>],
    limit: usize,
    frag: usize,
    joint: &mut Vec<u8>,
    mut seal: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<usize> {
    joint.resize(frag, 0);
    let mut taken = 0;
    let mut held = 0;
    for buf in bufs {
        let take = buf.len().min(limit - taken);
        if take == 0 {
            break;
        }
        taken += take;
        let mut rest = &buf[..take];
        if held > 0 {
            let n = (frag - held).min(rest.len());
            joint[held..held + n].copy_from_slice(&rest[..n]);
            held += n;
            rest = &rest[n..];
            if held < frag {
                continue;
            }
            seal(&joint[..held])?;
        }
        let whole = rest.len() / frag * frag;
        if whole > 0 {
            seal(&rest[..whole])?;
        }
        let tail = &rest[whole..];
        joint[..tail.len()].copy_from_slice(tail);
        held = tail.len();
    }
    if held > 0 {
        seal(&joint[..held])?;
    }
    Ok(taken)
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<C: Side> AsyncRead for TlsStream<C> {
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
            let filled = buf.filled().len();
            let stop = this.drive(Some(buf), None)?;
            if buf.filled().len() > filled {
                return Poll::Ready(Ok(()));
            }
            match stop {
                Stop::Closed => continue,
                Stop::Sealed { .. } => return Poll::Ready(Err(invalid("sealed on a read"))),
                Stop::NeedBytes if this.plain_at < this.plain.len() => continue,
                Stop::NeedBytes => {}
            }
            // A key update or alert rustls produced goes out before we wait for the peer.
            this.try_outgoing()?;
            match this.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    // The end of the stream without close_notify: whatever is unread is lost,
                    // as it would be for a peer that vanished, and the session ends.
                    this.peer_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if !this
                        .reader
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        this.reader = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<C: Side> AsyncWrite for TlsStream<C> {
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
mod tests;
