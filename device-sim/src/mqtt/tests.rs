//! Unit tests of the session: its pure parts (in-flight packet ids, the keep-alive clock, giving
//! buffers back, read sizes, the codec at its limits), then the session itself over an
//! in-memory stream against a scripted server; no sockets.

use super::*;

fn publish(topic: &str, qos: QoS, pkid: u16, payload: Vec<u8>) -> Packet {
    let mut p = Publish::new(topic, qos, payload, None);
    p.pkid = pkid;
    Packet::Publish(p)
}

#[test]
fn in_flight_publishes_stop_at_the_limit_and_each_puback_frees_one() {
    let mut f = InFlight::new(3);
    let ids: Vec<u16> = (0..3).filter_map(|_| f.take()).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(f.take(), None, "a fourth publish is over the limit");
    assert!(f.ack(ids[1]));
    assert_eq!(f.acked, 1);
    assert!(
        !f.ack(ids[1]),
        "a second PUBACK for the same id matches nothing"
    );
    assert!(
        !f.ack(999),
        "a PUBACK for an id never taken matches nothing"
    );
    assert!(f.take().is_some());
    assert_eq!(f.take(), None);
    assert_eq!(f.acked, 1);
}

#[test]
fn packet_ids_are_never_zero_and_never_reuse_one_in_flight_across_the_wrap() {
    let mut f = InFlight::new(2);
    let kept = f.take().expect("room");
    for _ in 0..70_000 {
        let id = f.take().expect("one slot stays free");
        assert_ne!(id, 0);
        assert_ne!(id, kept, "an id in flight is not handed out again");
        assert!(f.ack(id));
    }
}

#[test]
fn a_zero_limit_still_lets_one_publish_through() {
    let mut f = InFlight::new(0);
    assert!(f.take().is_some());
    assert_eq!(f.take(), None);
}

#[test]
fn keep_alive_pings_after_silence_and_gives_up_when_the_ping_goes_unanswered() {
    let t0 = Instant::now();
    let every = Duration::from_secs(10);
    let mut k = KeepAlive::new(every, t0);
    assert_eq!(k.due(t0 + Duration::from_secs(9)), Due::Nothing);
    k.sent(t0 + Duration::from_secs(5));
    k.received(t0 + Duration::from_secs(6));
    assert_eq!(k.deadline(), t0 + Duration::from_secs(15));
    assert_eq!(k.due(t0 + Duration::from_secs(12)), Due::Nothing);
    assert_eq!(k.due(t0 + Duration::from_secs(15)), Due::Ping);
    // Waiting for the answer now: the deadline is the ping's plus the keep-alive.
    assert_eq!(k.deadline(), t0 + Duration::from_secs(25));
    assert_eq!(k.due(t0 + Duration::from_secs(20)), Due::Nothing);
    assert_eq!(k.due(t0 + Duration::from_secs(25)), Due::Dead);
}

#[test]
fn any_packet_from_the_server_answers_a_ping() {
    let t0 = Instant::now();
    let mut k = KeepAlive::new(Duration::from_secs(10), t0);
    assert_eq!(k.due(t0 + Duration::from_secs(10)), Due::Ping);
    k.sent(t0 + Duration::from_secs(10));
    k.received(t0 + Duration::from_secs(11));
    assert_eq!(k.due(t0 + Duration::from_secs(19)), Due::Nothing);
    assert_eq!(k.due(t0 + Duration::from_secs(20)), Due::Ping);
}

#[test]
fn a_device_that_keeps_sending_still_pings_a_silent_server() {
    let t0 = Instant::now();
    let mut k = KeepAlive::new(Duration::from_secs(10), t0);
    for s in 1..10 {
        k.sent(t0 + Duration::from_secs(s));
    }
    // QoS 0 heartbeats get no answer: the server's silence alone calls for a ping.
    assert_eq!(k.due(t0 + Duration::from_secs(10)), Due::Ping);
    k.sent(t0 + Duration::from_secs(10));
    assert_eq!(k.due(t0 + Duration::from_secs(20)), Due::Dead);
}

#[test]
fn a_zero_keep_alive_never_pings() {
    let t0 = Instant::now();
    let mut k = KeepAlive::new(Duration::ZERO, t0);
    assert_eq!(k.due(t0 + Duration::from_secs(100_000)), Due::Nothing);
    assert!(k.deadline() > t0 + Duration::from_secs(100_000));
}

#[test]
fn the_read_buffer_is_given_back_once_a_large_packet_is_decoded() {
    let mut wire = BytesMut::new();
    publish(
        "aloft/v1/d/dev-1/chunk/resp",
        QoS::AtMostOnce,
        0,
        vec![7; 16 * 1024],
    )
    .write(&mut wire, None)
    .expect("encodes");
    let mut read = BytesMut::with_capacity(wire.len());
    read.extend_from_slice(&wire);
    let packet = Packet::read(&mut read, Some(20 * 1024)).expect("decodes");
    assert!(read.is_empty());
    relax_read(&mut read);
    assert_eq!(read.capacity(), 0, "an empty buffer holds no allocation");
    // The decoded publish keeps its own bytes.
    let Packet::Publish(p) = packet else {
        panic!("not a publish")
    };
    assert_eq!(p.payload.len(), 16 * 1024);
    assert!(p.payload.iter().all(|&b| b == 7));
}

#[test]
fn a_read_buffer_holding_the_start_of_the_next_packet_is_kept() {
    let mut read = BytesMut::from(&[0x30u8, 0x05][..]);
    relax_read(&mut read);
    assert_eq!(&read[..], &[0x30, 0x05]);
}

#[test]
fn a_packet_over_the_maximum_is_refused_from_its_fixed_header() {
    let mut wire = BytesMut::new();
    publish("t", QoS::AtMostOnce, 0, vec![0; 10_000])
        .write(&mut wire, None)
        .expect("encodes");
    // Only the fixed header has arrived: the codec refuses before the body is read.
    let mut read = BytesMut::from(&wire[..4]);
    assert!(matches!(
        Packet::read(&mut read, Some(4096)),
        Err(CodecError::PayloadSizeLimitExceeded { .. })
    ));
}

#[test]
fn room_grows_to_exactly_what_is_asked() {
    let mut b = BytesMut::with_capacity(64);
    b.extend_from_slice(&[1; 60]);
    make_room(&mut b, 16_000);
    assert_eq!(b.capacity(), 16_060);
    assert_eq!(&b[..], &[1; 60][..]);
    let cap = b.capacity();
    make_room(&mut b, 10);
    assert_eq!(b.capacity(), cap, "enough room already: nothing changes");
}

#[test]
fn a_read_takes_a_step_at_first_and_the_rest_of_the_packet_once_bytes_came() {
    assert_eq!(read_size(0, 2), MIN_READ);
    assert_eq!(read_size(60, 16_500), READ_STEP);
    assert_eq!(read_size(READ_STEP + 60, 12_000), 12_000);
    assert_eq!(read_size(100, 1_000), 1_000);
}

#[test]
fn the_write_buffer_is_given_back_once_a_large_packet_is_written() {
    let mut w = WriteBuf::default();
    w.put(&publish("csr", QoS::AtLeastOnce, 1, vec![1; 4000]), None)
        .expect("encodes");
    let len = w.unsent().len();
    w.advance(1000);
    assert_eq!(w.unsent().len(), len - 1000);
    w.advance(len - 1000);
    assert!(w.unsent().is_empty());
    assert_eq!(w.buf.capacity(), 0);

    w.put(&Packet::PubAck(PubAck::new(3, None)), None)
        .expect("encodes");
    let cap = w.buf.capacity();
    let n = w.unsent().len();
    w.advance(n);
    assert_eq!(
        w.buf.capacity(),
        cap,
        "a small buffer is kept for the next packet"
    );
}

#[test]
fn a_packet_over_the_servers_maximum_is_not_queued() {
    let mut w = WriteBuf::default();
    w.put(&Packet::PubAck(PubAck::new(3, None)), None)
        .expect("encodes");
    let before = w.unsent().to_vec();
    assert!(w
        .put(
            &publish("status", QoS::AtLeastOnce, 2, vec![0; 500]),
            Some(100)
        )
        .is_err());
    assert_eq!(w.unsent(), &before[..]);
}

#[test]
fn the_connect_carries_the_devices_limits() {
    let connect = Connect {
        keep_alive: 60,
        client_id: "dev-1".into(),
        clean_start: true,
        properties: Some(ConnectProperties {
            receive_maximum: Some(RECEIVE_MAXIMUM),
            max_packet_size: Some(20_000),
            ..ConnectProperties::new()
        }),
    };
    let mut wire = BytesMut::new();
    Packet::Connect(connect, None, None)
        .write(&mut wire, None)
        .expect("encodes");
    let Ok(Packet::Connect(c, None, None)) = Packet::read(&mut wire, None) else {
        panic!("not a connect")
    };
    let p = c.properties.expect("properties");
    assert_eq!(c.client_id, "dev-1");
    assert!(c.clean_start);
    assert_eq!(p.receive_maximum, Some(RECEIVE_MAXIMUM));
    assert_eq!(p.max_packet_size, Some(20_000));
}

// The session over an in-memory stream, against a scripted server speaking rumqttc's codec.

use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, SubAck};
use tokio::io::{AsyncReadExt, DuplexStream};

/// The server's end: a stream and what it has read but not decoded yet.
struct Server {
    io: DuplexStream,
    buf: BytesMut,
}

impl Server {
    async fn read(&mut self) -> Packet {
        loop {
            match Packet::read(&mut self.buf, None) {
                Ok(p) => return p,
                Err(CodecError::InsufficientBytes(_)) => {
                    let n = self.io.read_buf(&mut self.buf).await.expect("server read");
                    assert!(n > 0, "the client closed the stream");
                }
                Err(e) => panic!("the client sent a malformed packet: {e}"),
            }
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut b = BytesMut::new();
        packet.write(&mut b, None).expect("encodes");
        self.io.write_all(&b).await.expect("server write");
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("server write");
    }
}

fn connack(code: ConnectReturnCode, receive_max: Option<u16>) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: receive_max.map(|r| ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(r),
            max_qos: None,
            retain_available: None,
            max_packet_size: None,
            assigned_client_identifier: None,
            topic_alias_max: None,
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        }),
    })
}

const MAX_IN: u32 = 20_000;

/// A session whose CONNECT the server answered with `answer`.
async fn start(
    inflight: u16,
    answer: Packet,
) -> (Result<Session<DuplexStream>, SessionError>, Server) {
    let (client, io) = tokio::io::duplex(64 * 1024);
    let mut server = Server {
        io,
        buf: BytesMut::new(),
    };
    let serve = async {
        let Packet::Connect(c, None, None) = server.read().await else {
            panic!("the first packet is not a CONNECT")
        };
        assert_eq!(c.client_id, "dev-1");
        server.send(answer).await;
    };
    let (session, ()) = tokio::join!(
        Session::start(client, "dev-1", Duration::from_secs(60), inflight, MAX_IN),
        serve
    );
    (session, server)
}

async fn connected(inflight: u16, receive_max: Option<u16>) -> (Session<DuplexStream>, Server) {
    let (session, server) = start(inflight, connack(ConnectReturnCode::Success, receive_max)).await;
    (session.expect("connected"), server)
}

#[tokio::test]
async fn a_refused_connack_ends_the_connect_with_its_reason() {
    let (session, _server) = start(4, connack(ConnectReturnCode::NotAuthorized, None)).await;
    assert!(matches!(
        session,
        Err(SessionError::Refused(ConnectReturnCode::NotAuthorized))
    ));
}

#[tokio::test]
async fn every_filter_must_be_granted_or_the_session_ends() {
    let (mut session, mut server) = connected(4, None).await;
    session
        .subscribe(vec!["a/job".into(), "a/ack".into()])
        .expect("queued");
    let serve = async {
        let Packet::Subscribe(s) = server.read().await else {
            panic!("not a SUBSCRIBE")
        };
        assert!(s.filters.iter().all(|f| f.qos == QoS::AtLeastOnce));
        server
            .send(Packet::SubAck(SubAck {
                pkid: s.pkid,
                return_codes: vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::NotAuthorized,
                ],
                properties: None,
            }))
            .await;
    };
    let (next, ()) = tokio::join!(session.next(), serve);
    assert!(matches!(
        next,
        Err(SessionError::SubscriptionRefused(
            SubscribeReasonCode::NotAuthorized
        ))
    ));
}

#[tokio::test]
async fn a_granted_subscription_is_reported_once() {
    let (mut session, mut server) = connected(4, None).await;
    session.subscribe(vec!["a/job".into()]).expect("queued");
    let serve = async {
        let Packet::Subscribe(s) = server.read().await else {
            panic!("not a SUBSCRIBE")
        };
        server
            .send(Packet::SubAck(SubAck {
                pkid: s.pkid,
                return_codes: vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                properties: None,
            }))
            .await;
    };
    let (next, ()) = tokio::join!(session.next(), serve);
    assert!(matches!(next, Ok(Incoming::Subscribed)));
}

#[tokio::test]
async fn an_incoming_qos1_publish_is_acknowledged_and_a_qos2_one_ends_the_session() {
    let (mut session, mut server) = connected(4, None).await;
    server
        .send(publish("a/ack", QoS::AtLeastOnce, 7, b"ok".to_vec()))
        .await;
    let Ok(Incoming::Publish { topic, payload }) = session.next().await else {
        panic!("no publish")
    };
    assert_eq!((&topic[..], &payload[..]), (&b"a/ack"[..], &b"ok"[..]));
    drop((topic, payload));
    let serve = async {
        let Packet::PubAck(ack) = server.read().await else {
            panic!("not a PUBACK")
        };
        assert_eq!(ack.pkid, 7);
        server
            .send(publish("a/ack", QoS::ExactlyOnce, 8, b"x".to_vec()))
            .await;
    };
    let (next, ()) = tokio::join!(session.next(), serve);
    assert!(matches!(next, Err(SessionError::Protocol(_))));
}

#[tokio::test]
async fn publishes_over_the_servers_receive_maximum_are_dropped_until_a_puback_frees_one() {
    // The device allows 4; the server's Receive Maximum of 2 lowers that.
    let (mut session, mut server) = connected(4, Some(2)).await;
    assert_eq!(session.publish("s", QoS::AtLeastOnce, vec![1]), Ok(()));
    assert_eq!(session.publish("s", QoS::AtLeastOnce, vec![2]), Ok(()));
    assert_eq!(
        session.publish("s", QoS::AtLeastOnce, vec![3]),
        Err(Dropped)
    );
    assert_eq!(session.publish("h", QoS::AtMostOnce, vec![4]), Ok(()));
    let serve = async {
        let mut first = None;
        for want in [1u8, 2, 4] {
            let Packet::Publish(p) = server.read().await else {
                panic!("not a PUBLISH")
            };
            assert_eq!(&p.payload[..], &[want][..]);
            first = first.or(Some(p.pkid));
        }
        server
            .send(Packet::PubAck(PubAck::new(first.expect("one"), None)))
            .await;
        server
            .send(publish("a/job", QoS::AtMostOnce, 0, b"j".to_vec()))
            .await;
    };
    let (next, ()) = tokio::join!(session.next(), serve);
    assert!(matches!(next, Ok(Incoming::Publish { .. })));
    assert_eq!(session.acknowledged(), 1);
    assert_eq!(session.publish("s", QoS::AtLeastOnce, vec![5]), Ok(()));
}

#[tokio::test]
async fn a_puback_for_no_publish_in_flight_ends_the_session() {
    let (mut session, mut server) = connected(4, None).await;
    server.send(Packet::PubAck(PubAck::new(42, None))).await;
    assert!(matches!(
        session.next().await,
        Err(SessionError::Protocol(_))
    ));
}

#[tokio::test]
async fn a_packet_over_the_maximum_ends_the_session_on_its_fixed_header() {
    let (mut session, mut server) = connected(4, None).await;
    // A PUBLISH announcing 1 MiB (remaining length 0x100000): only its header is ever sent.
    server.send_raw(&[0x30, 0x80, 0x80, 0x40]).await;
    assert!(matches!(
        session.next().await,
        Err(SessionError::Codec(
            CodecError::PayloadSizeLimitExceeded { .. }
        ))
    ));
}

#[tokio::test]
async fn a_server_that_closes_the_stream_ends_the_session() {
    let (mut session, server) = connected(4, None).await;
    drop(server);
    assert!(matches!(
        session.next().await,
        Err(SessionError::Closed | SessionError::Io(_))
    ));
}

#[tokio::test]
async fn a_clean_close_sends_disconnect_then_ends_the_stream() {
    let (session, mut server) = connected(4, None).await;
    Box::new(session).close(Duration::from_secs(5)).await;
    // MQTT 5's shortest DISCONNECT (normal, no properties), which rumqttd's codec and
    // Mosquitto read (rumqttc's own reader does not), then the end of the stream.
    let mut rest = Vec::new();
    server.io.read_to_end(&mut rest).await.expect("read");
    assert!(server.buf.is_empty());
    assert_eq!(rest, [0xE0, 0x00]);
}
