//! A socket read in larger steps than TLS asks for. rustls reads at most 4 KiB past what it
//! holds, so a 16 KiB chunk frame took four or five `recv` calls; a simulator with 10,000
//! devices made half a million of them every five seconds of a campaign (docs/BENCHMARKS.md,
//! S3b). Here one `recv` of up to [`READ_AHEAD`] bytes fills a scratch buffer per thread,
//! what the caller asked for is handed over at once, and only the rest is kept, sized to
//! what arrived and freed as soon as it is read: an idle device holds nothing.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read of the socket may take: a chunk frame and the start of the next.
pub const READ_AHEAD: usize = 32 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_AHEAD].into_boxed_slice());
}

/// `inner`, read ahead (see the module doc); writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Read from the socket, not yet by the caller: `ahead[at..]`.
    ahead: Vec<u8>,
    at: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            ahead: Vec::new(),
            at: 0,
        }
    }

    /// Bytes read from the socket and not yet handed over.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.ahead.len() - self.at
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.ahead.len() {
            let n = out.remaining().min(this.ahead.len() - this.at);
            out.put_slice(&this.ahead[this.at..this.at + n]);
            this.at += n;
            if this.at == this.ahead.len() {
                this.ahead = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let got = buf.filled();
                    let n = got.len().min(out.remaining());
                    out.put_slice(&got[..n]);
                    if n < got.len() {
                        this.ahead = got[n..].to_vec();
                        this.at = 0;
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every byte arrives once and in order, whatever the reader's step; what was read ahead is
    /// freed once handed over; writes and end of stream pass through.
    #[tokio::test]
    async fn hands_over_every_byte_in_order_and_keeps_nothing_once_read() {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let mut reader = ReadAhead::new(a);
        let mut writer = b;
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();

        let mut got = Vec::new();
        let mut step = [0u8; 4096];
        let n = reader.read(&mut step[..1000]).await.unwrap();
        got.extend_from_slice(&step[..n]);
        assert!(reader.pending() > 0, "one read took more than was asked");
        loop {
            let n = reader.read(&mut step).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&step[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!((reader.pending(), reader.ahead.capacity()), (0, 0));

        // A large read goes straight to the stream.
        let (a, mut b) = tokio::io::duplex(256 * 1024);
        let mut reader = ReadAhead::new(a);
        b.write_all(&sent[..50_000]).await.unwrap();
        let mut big = vec![0u8; 2 * READ_AHEAD];
        let n = reader.read(&mut big).await.unwrap();
        assert_eq!(&big[..n], &sent[..n]);
        assert_eq!(reader.pending(), 0);
        reader.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        b.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
    }
}
