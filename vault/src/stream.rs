//! STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
//! Nonce-Reuse Misuse-Resistance", CRYPTO 2015): a long plaintext cut into fixed-size segments,
//! each sealed with AES-256-GCM under one key with the nonce
//!
//! ```text
//! nonce = prefix (7 random bytes) ‖ segment counter (u32, big-endian) ‖ last flag (0 or 1)
//! ```
//! and the same associated data (the caller's header). The counter in the nonce detects
//! reordered, dropped or duplicated segments; the flag marks the final segment, so a stream cut
//! at a segment boundary is detected too (its new last segment was sealed with flag 0).
//! Every segment holds exactly `segment_bytes` of plaintext except the last, which holds
//! 0..=`segment_bytes` (so an empty stream is one empty final segment).
//!
//! The `aead` 0.6 generation that `aes-gcm` 0.11 uses no longer ships a `stream` module (it
//! moved to the separate `aead-stream` crate, not yet released for it), so the nonce
//! construction is written here; it is the same as `aead::stream::StreamBE32`.

use std::io::{self, Read, Write};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use zeroize::Zeroizing;

use crate::keys::{MasterKey, TAG_LEN};
use crate::VaultError;

/// The segment size backups use.
pub const SEGMENT_BYTES: usize = 64 * 1024;
/// Bytes of the random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;

fn nonce(prefix: &[u8; NONCE_PREFIX_LEN], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    n[NONCE_PREFIX_LEN..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Encrypts a stream into `inner`. Call [`StreamWriter::finish`]: a writer dropped without it
/// leaves a stream that readers refuse as truncated.
pub struct StreamWriter<W: Write> {
    cipher: Aes256Gcm,
    prefix: [u8; NONCE_PREFIX_LEN],
    aad: Vec<u8>,
    segment_bytes: usize,
    counter: u32,
    buf: Zeroizing<Vec<u8>>,
    inner: W,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(
        key: &MasterKey,
        prefix: [u8; NONCE_PREFIX_LEN],
        aad: Vec<u8>,
        segment_bytes: usize,
        inner: W,
    ) -> Self {
        Self {
            cipher: Aes256Gcm::new(&(*key.as_bytes()).into()),
            prefix,
            aad,
            segment_bytes: segment_bytes.max(1),
            counter: 0,
            buf: Zeroizing::new(Vec::with_capacity(segment_bytes + 1)),
            inner,
        }
    }

    fn emit(&mut self, len: usize, last: bool) -> io::Result<()> {
        let n = nonce(&self.prefix, self.counter, last);
        let sealed = self
            .cipher
            .encrypt(
                &n.into(),
                Payload {
                    msg: &self.buf[..len],
                    aad: &self.aad,
                },
            )
            .map_err(|_| io::Error::other(VaultError::Malformed("segment too long")))?;
        self.inner.write_all(&sealed)?;
        self.buf.drain(..len);
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other(VaultError::StreamTooLong))?;
        Ok(())
    }

    /// Seals what is buffered as the last segment and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let len = self.buf.len();
        self.emit(len, true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for StreamWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        // Hold back a full segment until more data arrives: only `finish` knows which one is last.
        while self.buf.len() > self.segment_bytes {
            self.emit(self.segment_bytes, false)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts a stream from `inner`, one authenticated segment at a time. It never returns
/// plaintext that failed authentication, but a caller must still read to the end (EOF) before
/// trusting the whole: only the final segment proves nothing was cut off.
pub struct StreamReader<R: Read> {
    cipher: Aes256Gcm,
    prefix: [u8; NONCE_PREFIX_LEN],
    aad: Vec<u8>,
    segment_bytes: usize,
    counter: u32,
    inner: R,
    /// One byte read ahead of the current segment, to learn whether it is the last.
    peeked: Option<u8>,
    plain: Zeroizing<Vec<u8>>,
    pos: usize,
    done: bool,
}

impl<R: Read> StreamReader<R> {
    pub fn new(
        key: &MasterKey,
        prefix: [u8; NONCE_PREFIX_LEN],
        aad: Vec<u8>,
        segment_bytes: usize,
        inner: R,
    ) -> Self {
        Self {
            cipher: Aes256Gcm::new(&(*key.as_bytes()).into()),
            prefix,
            aad,
            segment_bytes: segment_bytes.max(1),
            counter: 0,
            inner,
            peeked: None,
            plain: Zeroizing::new(Vec::new()),
            pos: 0,
            done: false,
        }
    }

    /// Reads up to `buf.len()` bytes, stopping only at EOF.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn next_segment(&mut self) -> Result<(), io::Error> {
        let full = self.segment_bytes + TAG_LEN;
        let mut ct = vec![0u8; full];
        let mut have = 0;
        if let Some(b) = self.peeked.take() {
            ct[0] = b;
            have = 1;
        }
        have += self.fill(&mut ct[have..])?;
        ct.truncate(have);
        let last = if have == full {
            let mut one = [0u8; 1];
            match self.fill(&mut one)? {
                0 => true,
                _ => {
                    self.peeked = Some(one[0]);
                    false
                }
            }
        } else {
            true
        };
        let invalid = |e: VaultError| io::Error::new(io::ErrorKind::InvalidData, e);
        if have < TAG_LEN {
            return Err(invalid(VaultError::Truncated));
        }
        let open = |last: bool| {
            self.cipher.decrypt(
                &nonce(&self.prefix, self.counter, last).into(),
                Payload {
                    msg: &ct,
                    aad: &self.aad,
                },
            )
        };
        let opened = match open(last) {
            Ok(p) => Ok(p),
            // A segment that opens as a middle one but ends the file: the rest was cut off.
            Err(_) if last && open(false).is_ok() => Err(VaultError::Truncated),
            Err(_) => Err(VaultError::SegmentAuth(u64::from(self.counter))),
        };
        self.plain = Zeroizing::new(opened.map_err(invalid)?);
        self.pos = 0;
        self.done = last;
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| invalid(VaultError::StreamTooLong))?;
        Ok(())
    }
}

impl<R: Read> Read for StreamReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_segment()?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The [`VaultError`] inside an I/O error from [`StreamReader`] or [`StreamWriter`], if any.
pub fn vault_error(e: &io::Error) -> Option<&VaultError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<VaultError>())
}
