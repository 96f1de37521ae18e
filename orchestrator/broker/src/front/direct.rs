//! The device road: every message between a device and the orchestrator passes here, between
//! the device's own connection and the orchestrator, without the embedded broker.
//!
//! Why: rumqttd's router matches the first publish on every new topic against every
//! subscription filter and every new filter against every known topic (DESIGN.md, "Scaling
//! facts"). Per-device topics made that O(devices) per message: at 3,000 devices creating a
//! campaign took more than 30 s. Each relayed device also cost three file descriptors and a
//! broker session. The front already authenticates the device, checks every packet against its
//! own topics and frames its packets, so it serves device sessions itself (see `session`):
//!
//! - device → orchestrator: PUBLISHes on the device's four topics become [`DeviceMessage`]s in
//!   one bounded inbox that the orchestrator takes once ([`DirectRoutes::take_inbox`]); a QoS 1
//!   PUBLISH is acknowledged (PUBACK) once the inbox has taken it, so a busy orchestrator slows
//!   its devices down through TCP instead of losing their reports.
//! - orchestrator → device: [`DirectRoutes::publish`] queues acks and certificates (QoS 1) and
//!   chunk frames (QoS 0) on the device's connection, and keeps each device's retained job,
//!   which a session receives when it subscribes and whenever it changes. Jobs are never
//!   dropped: a session is told that its job changed and reads the newest one when it writes.
//!
//! Costs: one map entry per connected device, one retained job per device that has one, a
//! bounded queue each. Nothing here grows with the number of other devices.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aloft_proto::DeviceId;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, Notify};

use super::queue;

pub use super::acl::DeviceTopic;

/// Chunk frames queued per device at most; beyond that, deliveries are dropped. A device keeps
/// at most a window of chunk requests outstanding, which PROTOCOL.md bounds by this.
pub const QUEUE_FRAMES: usize = 16;
/// Acknowledgements and certificates queued per device at most. A device has one report in
/// flight at a time (PROTOCOL.md §9.5) and renews rarely, so a full queue means it stopped
/// reading or floods: what does not fit is dropped and counted, and an honest device's timers
/// recover it. Room for a burst of answers to a device that sent many requests at once.
pub const CONTROL_FRAMES: usize = 64;
/// Bytes of chunk frames queued on devices' connections at most, over the whole fleet. Beyond
/// it a delivery is refused with [`DeliverError::Busy`] and the orchestrator tells the device
/// to come back later (a `busy` frame, PROTOCOL.md §5.5), instead of letting frames wait until
/// the device's timer gives up on them: this bounds how long a frame waits here to about the
/// budget over the rate the fleet reads at, whatever the fleet's size.
pub const FLEET_BUDGET_BYTES: u64 = 32 * 1024 * 1024;
/// Device messages waiting for the orchestrator, over all devices. When it is full, devices'
/// QoS 1 PUBLISHes wait (their PUBACK with them) and QoS 0 heartbeats are dropped.
pub const INBOX: usize = 8_192;

/// Why a packet was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("the device is not connected through this front")]
    NotConnected,
    #[error("the device's queue is full")]
    QueueFull,
    #[error("the fleet's chunk budget is spent")]
    Busy,
}

/// A chunk frame queued for one device: a PUBLISH header of its own and a frame body that may
/// be shared by every device served the same chunk. Its bytes count against the fleet budget
/// until it is written or dropped.
#[derive(Debug)]
pub(crate) struct Frame {
    pub head: Bytes,
    pub body: Bytes,
    _meter: Option<Meter>,
}

/// Gives a frame's bytes back to the fleet budget when it is dropped.
#[derive(Debug)]
struct Meter {
    spent: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.spent.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What the orchestrator sends a device, by topic (PROTOCOL.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceBound {
    /// `job`: retained, QoS 1.
    Job,
    /// `ack`: QoS 1.
    Ack,
    /// `cert`: QoS 1.
    Cert,
    /// `chunk/resp`: QoS 0.
    ChunkResponse,
}

/// A PUBLISH a device sent on one of its own topics, for the orchestrator.
#[derive(Debug, Clone)]
pub struct DeviceMessage {
    pub device: DeviceId,
    pub topic: DeviceTopic,
    pub payload: Bytes,
}

#[derive(Debug)]
struct Route {
    serial: u64,
    chunks: queue::Sender<Frame>,
    control: queue::Sender<(DeviceBound, Bytes)>,
    job: Arc<Notify>,
}

/// What one device session reads from the road.
#[derive(Debug)]
pub(crate) struct SessionQueues {
    pub chunks: queue::Receiver<Frame>,
    pub control: queue::Receiver<(DeviceBound, Bytes)>,
    /// Signalled when the device's retained job changed.
    pub job: Arc<Notify>,
}

/// The device road's shared state: routes of connected devices, retained jobs, the inbox.
#[derive(Debug)]
pub struct DirectRoutes {
    routes: Mutex<HashMap<DeviceId, Route>>,
    retained: Mutex<HashMap<DeviceId, Bytes>>,
    inbox: mpsc::Sender<DeviceMessage>,
    inbox_rx: Mutex<Option<mpsc::Receiver<DeviceMessage>>>,
    next_serial: AtomicU64,
    /// Bytes of chunk frames queued now, over every device.
    spent: Arc<AtomicU64>,
    budget: u64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    busy: AtomicU64,
    control_dropped: AtomicU64,
}

impl Default for DirectRoutes {
    fn default() -> Self {
        Self::with_inbox(INBOX)
    }
}

/// Locks a map of single inserts and removes: a poisoned one is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DirectRoutes {
    /// A road whose inbox holds `capacity` device messages.
    pub fn with_inbox(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            routes: Mutex::default(),
            retained: Mutex::default(),
            inbox: tx,
            inbox_rx: Mutex::new(Some(rx)),
            next_serial: AtomicU64::new(0),
            spent: Arc::default(),
            budget: FLEET_BUDGET_BYTES,
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            control_dropped: AtomicU64::new(0),
        }
    }

    /// The same road with a fleet budget of `bytes` for queued chunk frames.
    #[must_use]
    pub fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes.max(1);
        self
    }

    /// The receiving end of the device inbox; `Some` only the first time.
    pub fn take_inbox(&self) -> Option<mpsc::Receiver<DeviceMessage>> {
        lock(&self.inbox_rx).take()
    }

    pub(crate) fn inbox(&self) -> &mpsc::Sender<DeviceMessage> {
        &self.inbox
    }

    /// Hands the orchestrator a device message as a device's session would after its ACL
    /// check; `false` if the inbox is closed. Tests use it to play a compromised front.
    pub async fn submit(&self, message: DeviceMessage) -> bool {
        self.inbox.send(message).await.is_ok()
    }

    /// Queues a QoS 0 PUBLISH of the chunk frame `body` on `topic` for `device`, within the
    /// fleet budget. `body` is not copied: one frame may be queued for many devices.
    pub fn deliver(&self, device: &DeviceId, topic: &str, body: Bytes) -> Result<(), DeliverError> {
        self.queue(device, topic, body, true)
    }

    /// Like [`DirectRoutes::deliver`], outside the budget: for the small frames that tell a
    /// device why it got no chunk (errors, `busy`), which must not be refused for want of it.
    pub fn deliver_unmetered(
        &self,
        device: &DeviceId,
        topic: &str,
        body: Bytes,
    ) -> Result<(), DeliverError> {
        self.queue(device, topic, body, false)
    }

    fn queue(
        &self,
        device: &DeviceId,
        topic: &str,
        body: Bytes,
        metered: bool,
    ) -> Result<(), DeliverError> {
        let tx = match lock(&self.routes).get(device) {
            Some(route) => route.chunks.clone(),
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(DeliverError::NotConnected);
            }
        };
        let head = publish_qos0_head(topic, body.len());
        let meter = if metered {
            let bytes = (head.len() + body.len()) as u64;
            let before = self.spent.fetch_add(bytes, Ordering::Relaxed);
            let meter = Meter {
                spent: Arc::clone(&self.spent),
                bytes,
            };
            // Anything fits into an empty budget, so a frame larger than the budget still
            // goes out (alone).
            if before > 0 && before + bytes > self.budget {
                drop(meter);
                self.busy.fetch_add(1, Ordering::Relaxed);
                return Err(DeliverError::Busy);
            }
            Some(meter)
        } else {
            None
        };
        match tx.try_send(Frame {
            head,
            body,
            _meter: meter,
        }) {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Err(match e {
                    queue::TrySendError::Full(_) => DeliverError::QueueFull,
                    queue::TrySendError::Closed(_) => DeliverError::NotConnected,
                })
            }
        }
    }

    /// Bytes of chunk frames queued on connections right now, over every device.
    pub fn queued_bytes(&self) -> u64 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Devices with a live session on the device road now (one map length read, for metrics).
    pub fn connected(&self) -> usize {
        lock(&self.routes).len()
    }

    /// Chunk frames refused because the fleet budget was spent.
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }

    /// Sends `payload` to `device` on the topic `kind`. A retained job replaces the device's
    /// stored one (an empty payload clears it) and reaches its session whenever the device is
    /// or becomes subscribed; other messages reach only a connected, subscribed device and are
    /// otherwise dropped, as a broker without sessions would.
    pub fn publish(
        &self,
        device: &DeviceId,
        kind: DeviceBound,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), DeliverError> {
        if kind == DeviceBound::Job && retain {
            {
                let mut retained = lock(&self.retained);
                if payload.is_empty() {
                    retained.remove(device);
                } else {
                    retained.insert(device.clone(), payload);
                }
            }
            if let Some(route) = lock(&self.routes).get(device) {
                route.job.notify_one();
            }
            return Ok(());
        }
        if kind == DeviceBound::ChunkResponse {
            let topic = aloft_proto::topics::chunk_response(device);
            return self.deliver(device, &topic, payload);
        }
        let tx = match lock(&self.routes).get(device) {
            Some(route) => route.control.clone(),
            None => return Err(DeliverError::NotConnected),
        };
        tx.try_send((kind, payload)).map_err(|e| {
            self.control_dropped.fetch_add(1, Ordering::Relaxed);
            match e {
                queue::TrySendError::Full(_) => DeliverError::QueueFull,
                queue::TrySendError::Closed(_) => DeliverError::NotConnected,
            }
        })
    }

    /// The device's retained job, if it has one.
    pub fn retained_job(&self, device: &DeviceId) -> Option<Bytes> {
        lock(&self.retained).get(device).cloned()
    }

    /// Devices with a retained job.
    pub fn retained_jobs(&self) -> usize {
        lock(&self.retained).len()
    }

    /// Chunk frames queued for delivery so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Chunk frames dropped (device not connected, or its queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Acks and certificates dropped because the device's control queue was full.
    pub fn control_dropped(&self) -> u64 {
        self.control_dropped.load(Ordering::Relaxed)
    }

    /// Opens the route of a device's new session; it closes when the guard drops.
    pub(crate) fn open(self: &Arc<Self>, device: DeviceId) -> (RouteGuard, SessionQueues) {
        // Queues that hold no memory until something is queued: most connected devices are
        // idle, and a tokio channel's first block was 2.6 KB of each device's session.
        let (chunks_tx, chunks) = queue::bounded(QUEUE_FRAMES);
        let (control_tx, control) = queue::bounded(CONTROL_FRAMES);
        let job = Arc::new(Notify::new());
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let route = Route {
            serial,
            chunks: chunks_tx,
            control: control_tx,
            job: Arc::clone(&job),
        };
        lock(&self.routes).insert(device.clone(), route);
        let guard = RouteGuard {
            routes: Arc::clone(self),
            device,
            serial,
        };
        (
            guard,
            SessionQueues {
                chunks,
                control,
                job,
            },
        )
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
        let mut routes = lock(&self.routes.routes);
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
    let mut out = BytesMut::from(&publish_qos0_head(topic, payload.len())[..]);
    out.put_slice(payload);
    out.freeze()
}

/// Everything of a QoS 0 PUBLISH (no retain, no properties) before its payload.
fn publish_qos0_head(topic: &str, payload_len: usize) -> Bytes {
    let remaining = 2 + topic.len() + 1 + payload_len;
    let mut out = BytesMut::with_capacity(8 + topic.len());
    out.put_u8(0x30);
    super::mqtt::put_varint(&mut out, remaining);
    // Topics are ours and short; the length always fits two bytes.
    out.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.put_slice(topic.as_bytes());
    out.put_u8(0); // property length
    out.freeze()
}

/// An MQTT 5 PUBLISH, QoS 1, with packet id `pkid`, no properties.
pub(crate) fn publish_qos1(topic: &str, pkid: u16, retain: bool, payload: &[u8]) -> Bytes {
    let remaining = 2 + topic.len() + 2 + 1 + payload.len();
    let mut out = BytesMut::with_capacity(5 + remaining);
    out.put_u8(0x32 | u8::from(retain));
    super::mqtt::put_varint(&mut out, remaining);
    out.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.put_slice(topic.as_bytes());
    out.put_u16(pkid);
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
    fn publishes_encode_as_mqtt_5_for_every_length_class() {
        for len in [0usize, 1, 100, 16 * 1024 + 30, 200_000] {
            let payload = vec![7u8; len];
            for frame in [
                publish_qos0("aloft/v1/d/dev-1/chunk/resp", &payload),
                publish_qos1("aloft/v1/d/dev-1/chunk/resp", 7, true, &payload),
            ] {
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
    }

    #[test]
    fn a_closed_session_route_is_removed_but_not_a_newer_one() {
        let routes = Arc::new(DirectRoutes::default());
        let dev = DeviceId::new("dev-1").unwrap();
        let (old, _rx_old) = routes.open(dev.clone());
        let (_new, mut rx_new) = routes.open(dev.clone());
        drop(old);
        routes.deliver(&dev, "t", Bytes::from_static(b"x")).unwrap();
        assert!(
            rx_new.chunks.try_recv().is_some(),
            "the newer session still gets packets"
        );
    }

    #[test]
    fn deliveries_beyond_the_queue_are_dropped_and_counted() {
        let routes = Arc::new(DirectRoutes::default());
        let dev = DeviceId::new("dev-1").unwrap();
        let x = Bytes::from_static(b"x");
        assert_eq!(
            routes.deliver(&dev, "t", x.clone()),
            Err(DeliverError::NotConnected)
        );
        let (_guard, _rx) = routes.open(dev.clone());
        for _ in 0..QUEUE_FRAMES {
            routes.deliver(&dev, "t", x.clone()).unwrap();
        }
        assert_eq!(
            routes.deliver(&dev, "t", x.clone()),
            Err(DeliverError::QueueFull)
        );
        assert_eq!(
            (routes.delivered(), routes.dropped()),
            (QUEUE_FRAMES as u64, 2)
        );
    }

    #[test]
    fn the_fleet_budget_refuses_frames_beyond_it_and_is_given_back_as_frames_leave() {
        let routes = Arc::new(DirectRoutes::default().with_budget(100));
        let (a, b) = (
            DeviceId::new("dev-a").unwrap(),
            DeviceId::new("dev-b").unwrap(),
        );
        let (_ga, mut qa) = routes.open(a.clone());
        let (_gb, _qb) = routes.open(b.clone());
        let body = Bytes::from(vec![0u8; 60]);
        // The first frame fits an empty budget; the second would exceed it, for any device.
        routes.deliver(&a, "t", body.clone()).unwrap();
        assert_eq!(
            routes.deliver(&b, "t", body.clone()),
            Err(DeliverError::Busy)
        );
        // Error frames are not refused for want of budget.
        routes
            .deliver_unmetered(&b, "t", Bytes::from_static(b"busy"))
            .unwrap();
        assert_eq!(routes.busy(), 1);
        assert!(routes.queued_bytes() > 60);
        // Written (here: taken and dropped), the frame gives its bytes back.
        drop(qa.chunks.try_recv().unwrap());
        assert_eq!(routes.queued_bytes(), 0);
        routes.deliver(&b, "t", body).unwrap();
    }

    #[test]
    fn a_retained_job_is_kept_for_a_device_not_connected_and_cleared_by_an_empty_one() {
        let routes = Arc::new(DirectRoutes::default());
        let dev = DeviceId::new("dev-1").unwrap();
        let job = Bytes::from_static(b"{\"job\":1}");
        routes
            .publish(&dev, DeviceBound::Job, job.clone(), true)
            .unwrap();
        assert_eq!(routes.retained_job(&dev), Some(job));
        let (_guard, queues) = routes.open(dev.clone());
        routes
            .publish(&dev, DeviceBound::Job, Bytes::new(), true)
            .unwrap();
        assert_eq!(routes.retained_job(&dev), None);
        assert_eq!(routes.retained_jobs(), 0);
        // The session was told: a permit is stored for it.
        let notified = queues.job.notified();
        tokio_test_ready(notified);
    }

    #[test]
    fn acks_beyond_the_control_queue_are_dropped_and_counted_and_need_a_connection() {
        let routes = Arc::new(DirectRoutes::default());
        let dev = DeviceId::new("dev-1").unwrap();
        let ack = Bytes::from_static(b"{}");
        assert_eq!(
            routes.publish(&dev, DeviceBound::Ack, ack.clone(), false),
            Err(DeliverError::NotConnected)
        );
        let (_guard, _queues) = routes.open(dev.clone());
        for _ in 0..CONTROL_FRAMES {
            routes
                .publish(&dev, DeviceBound::Ack, ack.clone(), false)
                .unwrap();
        }
        assert_eq!(
            routes.publish(&dev, DeviceBound::Ack, ack, false),
            Err(DeliverError::QueueFull)
        );
        assert_eq!(routes.control_dropped(), 1);
    }

    /// Asserts that a `Notified` future completes at its first poll.
    fn tokio_test_ready(f: tokio::sync::futures::Notified<'_>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), f)
                .await
                .expect("the session was notified");
        });
    }
}
