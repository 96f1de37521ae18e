//! Unit tests of the front's MQTT wire handling, including a small fuzz of rumqttd's v5 codec
//! as the front uses it.

use super::*;
use rumqttd::protocol::{
    Connect, ConnectProperties, Disconnect, DisconnectReasonCode, Filter, LastWill,
    LastWillProperties, Login, PubAck, PubAckReason, Publish, PublishProperties, QoS,
    RetainForwardRule, Subscribe, SubscribeProperties, Unsubscribe,
};

/// A tiny deterministic PRNG (xorshift64*), so failures replay from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn valid_frames() -> Vec<Bytes> {
    let connect = Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: "dev-1".into(),
            clean_session: true,
        },
        Some(ConnectProperties {
            session_expiry_interval: Some(60),
            receive_maximum: Some(10),
            max_packet_size: Some(65536),
            topic_alias_max: Some(0),
            request_response_info: None,
            request_problem_info: Some(1),
            user_properties: vec![("k".into(), "v".into())],
            authentication_method: None,
            authentication_data: None,
        }),
        Some(LastWill {
            topic: Bytes::from_static(b"aloft/v1/d/dev-1/status"),
            message: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
        }),
        Some(LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("application/json".into()),
            response_topic: None,
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![],
        }),
        Some(Login {
            username: "u".into(),
            password: "p".into(),
        }),
    );
    let publish = Packet::Publish(
        Publish::new("aloft/v1/d/dev-1/status", "{\"state\":\"idle\"}", false),
        Some(PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(9),
            topic_alias: None,
            response_topic: Some("aloft/v1/o/alice/reply".into()),
            correlation_data: Some(Bytes::from_static(b"42")),
            user_properties: vec![("a".into(), "b".into())],
            subscription_identifiers: vec![],
            content_type: Some("json".into()),
        }),
    );
    let subscribe = Packet::Subscribe(
        Subscribe {
            pkid: 7,
            filters: vec![Filter {
                path: "aloft/v1/d/dev-1/#".into(),
                qos: QoS::AtLeastOnce,
                nolocal: true,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            }],
        },
        Some(SubscribeProperties {
            id: Some(3),
            user_properties: vec![],
        }),
    );
    let unsubscribe = Packet::Unsubscribe(
        Unsubscribe {
            pkid: 8,
            filters: vec!["aloft/v1/manifests/#".into()],
        },
        None,
    );
    let puback = Packet::PubAck(
        PubAck {
            pkid: 9,
            reason: PubAckReason::Success,
        },
        None,
    );
    let disconnect = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    let mut frames: Vec<Bytes> = [connect, publish, subscribe, unsubscribe, puback, disconnect]
        .into_iter()
        .map(|p| encode(p).unwrap())
        .collect();
    // QoS 1 PUBLISH with packet id and no properties, PUBREL, PINGREQ, PUBREC with reason.
    frames.push(Bytes::from_static(b"\x32\x0d\x00\x06a/b/cd\x00\x05\x00xyz"));
    frames.push(Bytes::from_static(b"\x62\x02\x00\x05"));
    frames.push(Bytes::from_static(b"\xc0\x00"));
    frames.push(Bytes::from_static(b"\x50\x04\x00\x05\x10\x00"));
    frames
}

#[test]
fn valid_client_packets_decode() {
    for frame in valid_frames() {
        assert!(decode_client(&frame).is_ok(), "{frame:02x?}");
    }
}

#[test]
fn server_only_packet_types_are_refused_before_the_codec_sees_them() {
    // A CONNACK or UNSUBACK with a body would reach `unreachable!()` inside rumqttd.
    for frame in [
        &b"\x20\x03\x00\x00\x00"[..],
        b"\xb0\x04\x00\x01\x00\x00",
        b"\x90\x04\x00\x01\x00\x00",
        b"\xd0\x00",
        b"\xf0\x02\x00\x00",
        b"\x00\x00",
    ] {
        assert!(matches!(
            decode_client(frame),
            Err(DecodeError::NotFromClient(_))
        ));
    }
}

#[test]
fn wrong_reserved_flags_are_malformed() {
    assert!(matches!(
        decode_client(b"\x80\x07\x00\x01\x00\x00\x01a\x00"),
        Err(DecodeError::BadFlags { .. })
    ));
    assert!(matches!(
        decode_client(b"\xc1\x00"),
        Err(DecodeError::BadFlags { .. })
    ));
}

#[test]
fn mqtt_3_connect_is_an_unsupported_protocol() {
    let v311 = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04dev1";
    assert!(matches!(
        decode_client(v311),
        Err(DecodeError::UnsupportedProtocol)
    ));
    let v31 = b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04dev1";
    assert!(matches!(
        decode_client(v31),
        Err(DecodeError::UnsupportedProtocol)
    ));
}

#[test]
fn random_and_mutated_frames_never_panic_the_decoder() {
    let seed = 0x5eed_a10f_u64;
    println!("fuzz seed {seed:#x}");
    let mut rng = Rng(seed);
    let seeds = valid_frames();
    for i in 0..200_000 {
        let mut frame = seeds[i % seeds.len()].to_vec();
        match rng.below(4) {
            // Flip a few bytes.
            0 | 1 => {
                for _ in 0..=rng.below(4) {
                    let at = rng.below(frame.len());
                    frame[at] = rng.next() as u8;
                }
            }
            // Truncate the body but keep the header's claim.
            2 => frame.truncate(1 + rng.below(frame.len())),
            // Pure noise.
            _ => {
                frame = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            }
        }
        // The front only hands complete frames to the decoder; try both that and the raw
        // bytes (a header claiming more or less than is there).
        if let Ok(Some((head, remaining))) = fixed_header(&frame) {
            if let Some(exact) = frame.get(..head + remaining) {
                let _ = decode_client(exact);
            }
        }
        let _ = decode_client(&frame);
    }
}

#[test]
fn fixed_header_rejects_a_fifth_length_byte_and_waits_for_more() {
    assert!(matches!(
        fixed_header(b"\x30\xff\xff\xff\xff\x01"),
        Err(FrameError::BadHeader)
    ));
    assert!(matches!(fixed_header(b"\x30\xff"), Ok(None)));
    assert!(matches!(fixed_header(b"\x30"), Ok(None)));
    assert_eq!(
        fixed_header(b"\x30\xff\xff\xff\x7f").unwrap(),
        Some((5, 268_435_455))
    );
}

#[tokio::test]
async fn frame_reader_refuses_an_oversized_claim_before_reading_the_body() {
    // Claims 100 MB; the reader must refuse on the header alone.
    let mut input: &[u8] = b"\x30\x80\xde\xe1\x2f";
    let mut r = FrameReader::new(16 * 1024);
    assert!(matches!(
        r.next(&mut input).await,
        Err(FrameError::Oversized(n)) if n > 100_000_000
    ));
}

#[tokio::test]
async fn frame_reader_splits_pipelined_frames_and_reports_truncation() {
    let mut input: &[u8] = b"\xc0\x00\xe0\x00\x30\x05\x00";
    let mut r = FrameReader::new(1024);
    assert_eq!(&r.next(&mut input).await.unwrap()[..], b"\xc0\x00");
    assert_eq!(&r.next(&mut input).await.unwrap()[..], b"\xe0\x00");
    assert!(matches!(
        r.next(&mut input).await,
        Err(FrameError::Truncated)
    ));
    let mut empty: &[u8] = b"";
    let mut r = FrameReader::new(1024);
    assert!(matches!(r.next(&mut empty).await, Err(FrameError::Closed)));
}

#[test]
fn connack_and_disconnect_encode_as_mqtt_5() {
    let refusal = connack(
        false,
        Reason::NotAuthorized,
        &ConnAckProps {
            reason_string: Some("no".into()),
            ..Default::default()
        },
    );
    assert_eq!(&refusal[..], b"\x20\x08\x00\x87\x05\x1f\x00\x02no");
    assert_eq!(connack_head(&refusal), Some((false, 0x87)));
    let ok = connack(
        true,
        Reason::Success,
        &ConnAckProps {
            server_keep_alive: Some(300),
            max_packet_size: Some(16384),
            no_retain_no_shared: true,
            reason_string: None,
            max_qos_1: true,
        },
    );
    assert_eq!(connack_head(&ok), Some((true, 0)));
    assert_eq!(
        &ok[..],
        b"\x20\x11\x01\x00\x0e\x13\x01\x2c\x27\x00\x00\x40\x00\x25\x00\x2a\x00\x24\x01"
    );
    assert_eq!(disconnect(Reason::NotAuthorized), [0xE0, 0x02, 0x87, 0x00]);
}

#[test]
fn replies_the_front_writes_itself_decode_as_their_packets() {
    assert_eq!(&puback(0x0102)[..], &[0x40, 0x02, 0x01, 0x02]);
    assert_eq!(
        &suback_codes(9, &[1, 0])[..],
        &[0x90, 0x05, 0x00, 0x09, 0x00, 0x01, 0x00]
    );
    assert_eq!(
        &unsuback(9, &[0, 0x11])[..],
        &[0xB0, 0x05, 0x00, 0x09, 0x00, 0x00, 0x11]
    );
    let q1 = crate::front::direct::publish_qos1("a/b", 0x0304, false, b"xy");
    assert_eq!(publish_qos_pkid(&q1), Some((1, Some(0x0304))));
    let q0 = crate::front::direct::publish_qos0("a/b", b"xy");
    assert_eq!(publish_qos_pkid(&q0), Some((0, None)));
    assert_eq!(publish_qos_pkid(&[0x32, 0x03, 0x00]), None, "truncated");
    assert_eq!(publish_qos_pkid(&puback(1)), None, "not a publish");
}

#[test]
fn a_quota_suback_carries_one_reason_per_filter_and_no_properties() {
    assert_eq!(
        &suback(0x0107, 3, Reason::QuotaExceeded)[..],
        &[0x90, 0x06, 0x01, 0x07, 0x00, 0x97, 0x97, 0x97]
    );
}
