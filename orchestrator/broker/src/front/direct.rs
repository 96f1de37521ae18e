//! Direct delivery: the orchestrator hands a device-bound PUBLISH to the front, which writes it
//! on that device's connection between two relayed packets, without passing through the
//! embedded broker.
//!
//! Why: rumqttd keeps every topic's log in memory for the life of the process and the stored
//! publishes pin the buffers they were read into, so streaming firmware chunks through it costs
//! memory that grows with fleet × image (docs/BENCHMARKS.md). Chunk responses need none of what
//! the broker adds (they are not retained, not durable, and go to exactly one connection), so
//! they take this path. They are QoS 0: a frame that cannot be queued is dropped and counted, and
//! the device requests it again when its timer expires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aloft_proto::DeviceId;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

/// Frames queued per device at most; beyond that, deliveries are dropped. A device keeps only a
/// small window of chunk requests outstanding, so a full queue means it is not reading.
pub const QUEUE_FRAMES: usize = 16;

/// Why a packet was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("the device is not connected through this front")]
    NotConnected,
    #[error("the device's queue is full")]
    QueueFull,
}

#[derive(Debug)]
struct Route {
    serial: u64,
    tx: mpsc::Sender<Bytes>,
}

/// Where each connected device's direct packets go.
#[derive(Debug, Default)]
pub struct DirectRoutes {
    routes: Mutex<HashMap<DeviceId, Route>>,
    next_serial: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl DirectRoutes {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Route>> {
        // Single inserts and removes: a poisoned map is still consistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a QoS 0 PUBLISH of `payload` on `topic` for `device`.
    pub fn deliver(
        &self,
        device: &DeviceId,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), DeliverError> {
        let tx = match self.lock().get(device) {
            Some(route) => route.tx.clone(),
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(DeliverError::NotConnected);
            }
        };
        match tx.try_send(publish_qos0(topic, payload)) {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => DeliverError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => DeliverError::NotConnected,
                })
            }
        }
    }

    /// Packets queued for delivery so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Packets dropped (device not connected, or its queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Opens the route of a device's new session; it closes when the guard drops.
    pub(crate) fn open(self: &Arc<Self>, device: DeviceId) -> (RouteGuard, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(device.clone(), Route { serial, tx });
        let guard = RouteGuard {
            routes: Arc::clone(self),
            device,
            serial,
        };
        (guard, rx)
    }
}

/// A session's hold on its device's route.
#[derive(Debug)]
pub(crate) struct RouteGuard {
    routes: Arc<DirectRoutes>,
    device: DeviceId,
    serial: u64,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut routes = self.routes.lock();
        // Only our own route: a newer session of the same device may have replaced it.
        if routes
            .get(&self.device)
            .is_some_and(|r| r.serial == self.serial)
        {
            routes.remove(&self.device);
        }
    }
}

/// An MQTT 5 PUBLISH, QoS 0, no retain, no properties.
pub fn publish_qos0(topic: &str, payload: &[u8]) -> Bytes {
    let remaining = 2 + topic.len() + 1 + payload.len();
    let mut out = BytesMut::with_capacity(5 + remaining);
    out.put_u8(0x30);
    super::mqtt::put_varint(&mut out, remaining);
    // Topics are ours and short; the length always fits two bytes.
    out.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.put_slice(topic.as_bytes());
    out.put_u8(0); // property length
    out.put_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::v5::V5;
    use rumqttd::protocol::{Packet, Protocol};

    #[test]
    fn publish_encodes_as_mqtt_5_for_every_length_class() {
        for len in [0usize, 1, 100, 16 * 1024 + 30, 200_000] {
            let payload = vec![7u8; len];
            let frame = publish_qos0("aloft/v1/d/dev-1/chunk/resp", &payload);
            let mut buf = BytesMut::from(&frame[..]);
            let packet = V5.read_mut(&mut buf, 1 << 24).unwrap();
            let Packet::Publish(p, _) = packet else {
                panic!("not a publish: {packet:?}")
            };
            assert_eq!(&p.topic[..], b"aloft/v1/d/dev-1/chunk/resp");
            assert_eq!(p.payload.len(), len);
            assert!(buf.is_empty(), "nothing left over");
        }
    }

    #[test]
    fn a_closed_session_route_is_removed_but_not_a_newer_one() {
        let routes = Arc::new(DirectRoutes::default());
        let dev = DeviceId::new("dev-1").unwrap();
        let (old, _rx_old) = routes.open(dev.clone());
        let (_new, mut rx_new) = routes.open(dev.clone());
        drop(old);
        routes.deliver(&dev, "t", b"x").unwrap();
        assert!(
            rx_new.try_recv().is_ok(),
            "the newer session still gets packets"
        );
    }

    #[test]
    fn deliveries_beyond_the_queue_are_dropped_and_counted() {
        let routes = Arc::new(DirectRoutes::default());
        let dev = DeviceId::new("dev-1").unwrap();
        assert_eq!(
            routes.deliver(&dev, "t", b"x"),
            Err(DeliverError::NotConnected)
        );
        let (_guard, _rx) = routes.open(dev.clone());
        for _ in 0..QUEUE_FRAMES {
            routes.deliver(&dev, "t", b"x").unwrap();
        }
        assert_eq!(
            routes.deliver(&dev, "t", b"x"),
            Err(DeliverError::QueueFull)
        );
        assert_eq!(
            (routes.delivered(), routes.dropped()),
            (QUEUE_FRAMES as u64, 2)
        );
    }
}
