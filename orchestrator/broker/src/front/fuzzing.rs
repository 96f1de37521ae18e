//! The front's byte-level entry point for the fuzz targets (`fuzz/`) and their regression
//! tests: what a client's socket feeds, run through the same framing, decoding and ACL checks
//! the relay applies, without a socket.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use aloft_proto::{DeviceId, OperatorId};
use rumqttd::protocol::Packet;

use super::acl;
use super::mqtt::{self, FrameReader};
use super::Peer;

/// Frames `bytes` as a device connection would be framed (the first byte picks the packet
/// size cap: device or operator), decodes every frame and applies the ACL to what it names.
/// Never panics, whatever the bytes; returns how many frames decoded.
#[doc(hidden)]
pub fn fuzz_client_stream(bytes: &[u8]) -> usize {
    let Some((&cap, mut stream)) = bytes.split_first() else {
        return 0;
    };
    let defaults = super::FrontConfig::default();
    let max = if cap & 1 == 0 {
        defaults.device_max_packet_bytes
    } else {
        defaults.operator_max_packet_bytes
    };
    let peers = [
        DeviceId::new("dev-0001").map(Peer::Device),
        OperatorId::new("ops-1").map(Peer::Operator),
    ];
    let mut reader = FrameReader::new(max);
    let mut cx = Context::from_waker(Waker::noop());
    let mut decoded = 0;
    loop {
        // A byte slice is always ready, so one poll settles each frame.
        let frame = match pin!(reader.next(&mut stream)).poll(&mut cx) {
            Poll::Ready(Ok(frame)) => frame,
            Poll::Ready(Err(_)) | Poll::Pending => return decoded,
        };
        let _ = mqtt::connack_head(&frame);
        let Ok(packet) = mqtt::decode_client(&frame) else {
            continue;
        };
        decoded += 1;
        for peer in peers.iter().flatten() {
            match &packet {
                Packet::Publish(publish, props) => {
                    let alias = props.as_ref().is_some_and(|p| p.topic_alias.is_some());
                    let _ = acl::check_publish(peer, &publish.topic, publish.retain, alias);
                }
                Packet::Subscribe(subscribe, _) => {
                    for filter in &subscribe.filters {
                        let _ = acl::check_subscribe(peer, &filter.path);
                    }
                }
                Packet::Connect(_, _, Some(will), _, _) => {
                    let _ = acl::check_publish(peer, &will.topic, will.retain, false);
                }
                _ => {}
            }
        }
    }
}
