//! MQTT 5 wire handling for the front: framing with a size cap, decoding client packets, and the
//! few packets the front writes itself (CONNACK, SUBACK, DISCONNECT).
//!
//! Decoding uses rumqttd's own v5 codec on purpose: the front decides on the same parse the
//! backend will make of the very same bytes, so there is no parser differential to smuggle a
//! topic through. The codec is only ever handed one complete frame whose size we already
//! capped, and packet types a client may not send are refused before it sees them (its
//! `read_mut` reaches `unreachable!()` on a CONNACK or UNSUBACK with a body). The tests below
//! fuzz it with random and mutated frames.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Error as CodecError, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt};

/// MQTT 5 reason codes the front sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    Success = 0x00,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    KeepAliveTimeout = 0x8D,
    PacketTooLarge = 0x95,
    /// A SUBSCRIBE beyond the session's subscription quota.
    QuotaExceeded = 0x97,
    /// The session was ended by the server's operator: its certificate was revoked.
    AdministrativeAction = 0x98,
    /// A QoS 2 PUBLISH: the front grants at most QoS 1 (CONNACK Maximum QoS).
    QosNotSupported = 0x9B,
}

/// Why reading the next frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error("packet of {0} bytes exceeds the limit")]
    Oversized(usize),
    #[error("malformed fixed header")]
    BadHeader,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Why a complete frame is not an acceptable client packet.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("packet type {0} is not sent by clients")]
    NotFromClient(u8),
    #[error("reserved flags {flags:#x} are wrong for packet type {kind}")]
    BadFlags { kind: u8, flags: u8 },
    #[error("protocol name or version is not MQTT 5")]
    UnsupportedProtocol,
    #[error("malformed packet: {0}")]
    Malformed(CodecError),
}

/// Parses an MQTT fixed header: `Ok(None)` if more bytes are needed, else the header length
/// and the remaining length.
pub fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(FrameError::BadHeader)
}

/// Bytes a [`FrameReader`] keeps allocated while nothing is buffered.
const IDLE_CAPACITY: usize = 512;

/// Reads whole MQTT frames from a stream, never buffering more than the size cap allows.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max_packet_bytes: usize,
}

impl FrameReader {
    pub fn new(max_packet_bytes: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_packet_bytes,
        }
    }

    /// A reader that starts with `buffered` (bytes already read from the stream).
    pub fn with_buffered(max_packet_bytes: usize, buffered: BytesMut) -> Self {
        Self {
            buf: buffered,
            max_packet_bytes,
        }
    }

    /// The next complete frame (fixed header included).
    ///
    /// The size cap is checked as soon as the fixed header is in, before the body is read: a
    /// 4-byte remaining length can claim 256 MB. Cancel-safe: bytes already read stay buffered
    /// in `self`, so a call after a cancelled one resumes the same frame.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Bytes, FrameError> {
        // Nothing buffered: a large buffer from an earlier packet is let go rather than kept
        // through what may be a long idle wait (10,000 idle devices each kept 4 KiB here).
        if self.buf.is_empty() && self.buf.capacity() > IDLE_CAPACITY {
            self.buf = BytesMut::new();
        }
        loop {
            if let Some((head, remaining)) = fixed_header(&self.buf)? {
                let total = head + remaining;
                if total > self.max_packet_bytes {
                    return Err(FrameError::Oversized(total));
                }
                if self.buf.len() >= total {
                    return Ok(self.buf.split_to(total).freeze());
                }
                self.buf.reserve(total - self.buf.len());
            } else {
                self.buf.reserve(64);
            }
            if r.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    FrameError::Closed
                } else {
                    FrameError::Truncated
                });
            }
        }
    }

    /// Bytes read past the last returned frame (a pipelined next packet).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.buf.split()
    }
}

/// Decodes one complete frame from a client.
pub fn decode_client(frame: &[u8]) -> Result<Packet, DecodeError> {
    let Some(&byte1) = frame.first() else {
        return Err(DecodeError::Malformed(CodecError::MalformedPacket));
    };
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0F);
    let expected_flags = match kind {
        // PUBLISH carries DUP/QoS/RETAIN; the codec refuses QoS 3.
        3 => flags,
        1 | 4 | 5 | 7 | 12 | 14 => 0,
        6 | 8 | 10 => 0b0010,
        // CONNACK, SUBACK, UNSUBACK, PINGRESP come from servers; AUTH (15) is not supported by
        // rumqttd; 0 is reserved.
        other => return Err(DecodeError::NotFromClient(other)),
    };
    if flags != expected_flags {
        return Err(DecodeError::BadFlags { kind, flags });
    }
    let mut buf = BytesMut::from(frame);
    match V5.read_mut(&mut buf, frame.len()) {
        Ok(packet) => Ok(packet),
        Err(CodecError::InvalidProtocol | CodecError::InvalidProtocolLevel(_)) => {
            Err(DecodeError::UnsupportedProtocol)
        }
        Err(e) => Err(DecodeError::Malformed(e)),
    }
}

/// Encodes a packet with rumqttd's codec (used for the rewritten CONNECT).
pub fn encode(packet: Packet) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::new();
    V5.write(packet, &mut buf)?;
    Ok(buf.freeze())
}

/// Appends an MQTT variable byte integer.
pub(crate) fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

/// Properties the front puts in a CONNACK.
#[derive(Debug, Default, Clone)]
pub struct ConnAckProps {
    /// Server Keep Alive (0x13): set when the front changed the client's keep-alive.
    pub server_keep_alive: Option<u16>,
    /// Maximum Packet Size (0x27) the front accepts from this client.
    pub max_packet_size: Option<u32>,
    /// Retain Available (0x25), Shared Subscription Available (0x2A) and Topic Alias Maximum
    /// (0x22, absent = 0) tell a well-behaved client what the ACL would refuse anyway.
    pub no_retain_no_shared: bool,
    /// Reason String (0x1F) for refusals.
    pub reason_string: Option<String>,
    /// Maximum QoS (0x24) = 1: sessions the front serves itself grant at most QoS 1.
    pub max_qos_1: bool,
}

/// A v5 CONNACK.
pub fn connack(session_present: bool, reason: Reason, props: &ConnAckProps) -> Bytes {
    let mut p = BytesMut::new();
    if let Some(k) = props.server_keep_alive {
        p.put_u8(0x13);
        p.put_u16(k);
    }
    if let Some(m) = props.max_packet_size {
        p.put_u8(0x27);
        p.put_u32(m);
    }
    if props.no_retain_no_shared {
        p.put_slice(&[0x25, 0, 0x2A, 0]);
    }
    if props.max_qos_1 {
        p.put_slice(&[0x24, 1]);
    }
    if let Some(s) = &props.reason_string {
        let s = &s.as_bytes()[..s.len().min(1024)];
        p.put_u8(0x1F);
        p.put_u16(s.len() as u16);
        p.put_slice(s);
    }
    let mut body = BytesMut::with_capacity(8 + p.len());
    body.put_u8(u8::from(session_present));
    body.put_u8(reason as u8);
    put_varint(&mut body, p.len());
    body.put_slice(&p);
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0x20);
    put_varint(&mut out, body.len());
    out.put_slice(&body);
    out.freeze()
}

/// A v5 SUBACK for packet `pkid` giving every one of `filters` filters the same `reason`,
/// with no properties.
pub fn suback(pkid: u16, filters: usize, reason: Reason) -> Bytes {
    // Packet id, an empty property length, one reason code per filter.
    let body = 2 + 1 + filters;
    let mut out = BytesMut::with_capacity(5 + body);
    out.put_u8(0x90);
    put_varint(&mut out, body);
    out.put_u16(pkid);
    out.put_u8(0);
    out.put_bytes(reason as u8, filters);
    out.freeze()
}

/// A v5 SUBACK for packet `pkid` with one reason code per filter (a granted QoS, or a refusal).
pub fn suback_codes(pkid: u16, codes: &[u8]) -> Bytes {
    let body = 2 + 1 + codes.len();
    let mut out = BytesMut::with_capacity(5 + body);
    out.put_u8(0x90);
    put_varint(&mut out, body);
    out.put_u16(pkid);
    out.put_u8(0);
    out.put_slice(codes);
    out.freeze()
}

/// A v5 UNSUBACK for packet `pkid` with one reason code per filter.
pub fn unsuback(pkid: u16, codes: &[u8]) -> Bytes {
    let body = 2 + 1 + codes.len();
    let mut out = BytesMut::with_capacity(5 + body);
    out.put_u8(0xB0);
    put_varint(&mut out, body);
    out.put_u16(pkid);
    out.put_u8(0);
    out.put_slice(codes);
    out.freeze()
}

/// A v5 PUBACK (success, no properties: the short form of §3.4.2.1).
pub fn puback(pkid: u16) -> Bytes {
    let [hi, lo] = pkid.to_be_bytes();
    Bytes::copy_from_slice(&[0x40, 0x02, hi, lo])
}

/// A PINGRESP.
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// The QoS and packet id of a PUBLISH frame already decoded by [`decode_client`] (rumqttd's
/// `Publish` keeps both private). `None` if the frame is not a well-formed PUBLISH.
pub fn publish_qos_pkid(frame: &[u8]) -> Option<(u8, Option<u16>)> {
    let first = *frame.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    if qos == 0 {
        return Some((0, None));
    }
    let (head, _) = fixed_header(frame).ok()??;
    let topic_len = usize::from(u16::from_be_bytes([
        *frame.get(head)?,
        *frame.get(head + 1)?,
    ]));
    let at = head + 2 + topic_len;
    let pkid = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    Some((qos, Some(pkid)))
}

/// A v5 DISCONNECT with a reason code and no properties.
pub fn disconnect(reason: Reason) -> [u8; 4] {
    [0xE0, 0x02, reason as u8, 0x00]
}

/// Reads a CONNACK frame's session-present flag and reason code.
pub fn connack_head(frame: &[u8]) -> Option<(bool, u8)> {
    let (head, _) = fixed_header(frame).ok()??;
    if frame.first() != Some(&0x20) {
        return None;
    }
    let flags = *frame.get(head)?;
    let code = *frame.get(head + 1)?;
    Some((flags & 1 == 1, code))
}

#[cfg(test)]
mod tests;
