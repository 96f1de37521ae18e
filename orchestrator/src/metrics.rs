//! Prometheus metrics and the `/metrics` HTTP endpoint. Only this module knows prometheus; the
//! rest of the orchestrator calls the typed methods of [`Metrics`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use aloft_broker::{DirectRoutes, FrontStats, FrontStatsSnapshot};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Every metric the orchestrator exports.
pub struct Metrics {
    registry: Registry,
    device_state: IntGaugeVec,
    reports: IntCounterVec,
    illegal_transitions: IntCounter,
    rejected_messages: IntCounterVec,
    failures: IntCounterVec,
    /// (1.5) Members by the artifact they first downloaded, or that fell back from a delta.
    delivery_paths: IntCounterVec,
    chunks_served: IntCounter,
    chunk_bytes_served: IntCounter,
    store_flush_seconds: Histogram,
    front: Option<Arc<FrontStats>>,
    direct: Option<Arc<DirectRoutes>>,
    front_families: FrontFamilies,
    heartbeats: IntCounterVec,
    update_seconds: Histogram,
    chunk_service_seconds: Histogram,
    chunks_resent: IntCounter,
    store_commit_seconds: Histogram,
    campaign_status: IntGaugeVec,
    campaign_self_paused: IntGaugeVec,
    admin_requests: IntCounterVec,
    admin_forbidden: IntCounterVec,
    devices_connected: IntGauge,
    devices_registered: IntGauge,
    certificates_expiring: IntGauge,
    /// Registered devices' certificate expiry times (Unix s) → how many: kept in step by the
    /// engine in O(log n) per registration or renewal, counted at scrape time, so the expiry
    /// horizon costs the engine's task nothing per message or tick.
    expiries: Mutex<BTreeMap<i64, u64>>,
    /// Every family registered, whether or not it has a series yet.
    names: Vec<String>,
    /// One scrape at a time brings the front's counters up to date (see `sync_front`).
    render_lock: Mutex<()>,
    campaign_wave: IntGaugeVec,
    renewals: IntCounterVec,
    success_without_download: IntCounter,
    /// 1 while the orchestrator's MQTT link to its broker is connected (what `/health` says).
    broker_link_up: IntGauge,
    broker_link_losses: IntCounter,
    /// 0 while the engine waits for its store to come back (a failed flush), else 1.
    store_up: IntGauge,
    store_losses: IntCounter,
    /// 1 while this process leads (holds the leader lease; always on sled), else 0.
    leader: IntGauge,
    /// The fencing token this process holds (PostgreSQL only: registered with the lease).
    lease_token: IntGauge,
    /// Reads the lease at scrape time: (leads now, token held).
    lease: Mutex<Option<LeaseView>>,
    console_requests: IntCounterVec,
    console_refused: IntCounterVec,
    /// (Replicas) Rows of the replicas' inbox, by what happened to them.
    inbox_rows: IntCounterVec,
}

/// Reads the leader lease at scrape time: whether this process leads now, and its token.
pub type LeaseView = Arc<dyn Fn() -> (bool, Option<i64>) + Send + Sync>;

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static and unique; a failure here is a programming error caught by
    // the first test that builds `Metrics`.
    match r {
        Ok(v) => v,
        Err(e) => panic!("metric definition: {e}"),
    }
}

impl Metrics {
    pub fn new(front: Option<Arc<FrontStats>>, direct: Option<Arc<DirectRoutes>>) -> Arc<Self> {
        let registry = Registry::new();
        let device_state = must(IntGaugeVec::new(
            Opts::new("aloft_devices", "Devices per campaign and update state"),
            &["campaign", "state"],
        ));
        let reports = must(IntCounterVec::new(
            Opts::new("aloft_reports_total", "Device state reports by outcome"),
            &["outcome"],
        ));
        let illegal_transitions = must(IntCounter::new(
            "aloft_illegal_transitions_total",
            "Reports refused because the transition is not legal",
        ));
        let inbox_rows = must(IntCounterVec::new(
            Opts::new(
                "aloft_inbox_rows_total",
                "Rows of the replicas' inbox (PostgreSQL replicas): written by this replica, \
                 read by this leader, failed writes",
            ),
            &["op"],
        ));
        let rejected_messages = must(IntCounterVec::new(
            Opts::new(
                "aloft_rejected_messages_total",
                "Inbound messages refused, by topic kind and reason",
            ),
            &["kind", "reason"],
        ));
        let failures = must(IntCounterVec::new(
            Opts::new(
                "aloft_device_failures_total",
                "Failed or rolled-back devices by reason",
            ),
            &["reason"],
        ));
        let delivery_paths = must(IntCounterVec::new(
            Opts::new(
                "aloft_delivery_path_total",
                "Campaign members by how they got the image: full, delta, or delta_then_full \
                 (a fallback decided on the device)",
            ),
            &["path"],
        ));
        let chunks_served = must(IntCounter::new(
            "aloft_chunks_served_total",
            "Sealed chunks sent to devices",
        ));
        let chunk_bytes_served = must(IntCounter::new(
            "aloft_chunk_bytes_served_total",
            "Bytes of sealed chunks sent to devices",
        ));
        let store_flush_seconds = must(Histogram::with_opts(
            HistogramOpts::new("aloft_store_flush_seconds", "Time to make a batch durable")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                ]),
        ));
        let front_families = FrontFamilies::new(&registry);
        let mut vec_names: Vec<String> = Vec::new();
        let update_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "aloft_device_update_seconds",
                "Time from a member's notification to its succeeded report",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
            ]),
        ));
        let chunk_service_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "aloft_chunk_service_seconds",
                "Time to read and hand to the front the frames of one chunk request",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
            ]),
        ));
        let chunks_resent = must(IntCounter::new(
            "aloft_chunks_resent_total",
            "Chunks a device asked for again (an index below the highest it was already sent)",
        ));
        let store_commit_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "aloft_store_commit_seconds",
                "Time to write and flush one batch's state changes (the wait before its acks)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        ));
        let campaign_status = must(IntGaugeVec::new(
            Opts::new(
                "aloft_campaign_status",
                "1 for each campaign's current status, 0 for the others",
            ),
            &["campaign", "status"],
        ));
        let campaign_self_paused = must(IntGaugeVec::new(
            Opts::new(
                "aloft_campaign_paused_by_rollout",
                "1 while a campaign is paused by its own failure threshold (not by an operator)",
            ),
            &["campaign"],
        ));
        let admin_requests = must(IntCounterVec::new(
            Opts::new(
                "aloft_admin_requests_total",
                "Admin requests decoded, by operation",
            ),
            &["op"],
        ));
        let admin_forbidden = must(IntCounterVec::new(
            Opts::new(
                "aloft_admin_forbidden_total",
                "Admin requests refused because the certificate's role does not allow them",
            ),
            &["op", "role"],
        ));
        let devices_connected = must(IntGauge::new(
            "aloft_devices_connected",
            "Devices with a live session at the front",
        ));
        let devices_registered = must(IntGauge::new(
            "aloft_devices_registered",
            "Registered devices",
        ));
        let certificates_expiring = must(IntGauge::new(
            "aloft_device_certificates_expiring",
            "Registered devices whose certificate expires within 30 days (or has expired)",
        ));
        let heartbeats = must(IntCounterVec::new(
            Opts::new(
                "aloft_heartbeats_total",
                "Device health heartbeats by verdict",
            ),
            &["healthy"],
        ));
        let campaign_wave = must(IntGaugeVec::new(
            Opts::new(
                "aloft_campaign_wave",
                "The highest open wave of each campaign (0-based)",
            ),
            &["campaign"],
        ));
        let renewals = must(IntCounterVec::new(
            Opts::new(
                "aloft_certificate_renewals_total",
                "Device certificate renewal requests by outcome (issued, or the refusal code)",
            ),
            &["outcome"],
        ));
        let success_without_download = must(IntCounter::new(
            "aloft_success_without_download_total",
            "Succeeded reports from campaign members the orchestrator never sent a chunk",
        ));
        let broker_link_up = must(IntGauge::new(
            "aloft_broker_link_up",
            "1 while the orchestrator's MQTT link to its broker is connected, else 0",
        ));
        let broker_link_losses = must(IntCounter::new(
            "aloft_broker_link_losses_total",
            "Times the orchestrator's MQTT link to its broker failed (then it reconnects)",
        ));
        let store_up = must(IntGauge::new(
            "aloft_store_up",
            "0 while the engine waits for its store (a flush failed; nothing is acknowledged until it commits), else 1",
        ));
        store_up.set(1);
        let store_losses = must(IntCounter::new(
            "aloft_store_losses_total",
            "Times a flush failed and the engine began waiting for its store",
        ));
        let leader = must(IntGauge::new(
            "aloft_leader",
            "1 while this process leads: it holds the leader lease (PostgreSQL), or its store is sled, else 0",
        ));
        leader.set(1);
        let lease_token = must(IntGauge::new(
            "aloft_lease_token",
            "The fencing token of the leader lease this process holds (PostgreSQL only)",
        ));
        let console_requests = must(IntCounterVec::new(
            Opts::new(
                "aloft_console_requests_total",
                "Console requests served, by page",
            ),
            &["page"],
        ));
        let console_refused = must(IntCounterVec::new(
            Opts::new(
                "aloft_console_refused_total",
                "Console connections and requests refused, by reason",
            ),
            &["reason"],
        ));
        for c in [
            Box::new(console_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(console_refused.clone()),
            Box::new(broker_link_up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(broker_link_losses.clone()),
            Box::new(store_up.clone()),
            Box::new(store_losses.clone()),
            Box::new(leader.clone()),
            Box::new(success_without_download.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(renewals.clone()),
            Box::new(heartbeats.clone()),
            Box::new(campaign_wave.clone()),
            Box::new(device_state.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reports.clone()),
            Box::new(illegal_transitions.clone()),
            Box::new(rejected_messages.clone()),
            Box::new(failures.clone()),
            Box::new(delivery_paths.clone()),
            Box::new(chunks_served.clone()),
            Box::new(chunk_bytes_served.clone()),
            Box::new(store_flush_seconds.clone()),
            Box::new(update_seconds.clone()),
            Box::new(chunk_service_seconds.clone()),
            Box::new(chunks_resent.clone()),
            Box::new(store_commit_seconds.clone()),
            Box::new(campaign_status.clone()),
            Box::new(campaign_self_paused.clone()),
            Box::new(admin_requests.clone()),
            Box::new(admin_forbidden.clone()),
            Box::new(devices_connected.clone()),
            Box::new(devices_registered.clone()),
            Box::new(certificates_expiring.clone()),
            Box::new(inbox_rows.clone()),
        ] {
            vec_names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            must(registry.register(c));
        }
        let names = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .chain(vec_names)
            .collect();
        Arc::new(Self {
            registry,
            device_state,
            reports,
            illegal_transitions,
            rejected_messages,
            failures,
            delivery_paths,
            chunks_served,
            chunk_bytes_served,
            store_flush_seconds,
            front,
            direct,
            front_families,
            heartbeats,
            update_seconds,
            chunk_service_seconds,
            chunks_resent,
            store_commit_seconds,
            campaign_status,
            campaign_self_paused,
            admin_requests,
            admin_forbidden,
            devices_connected,
            devices_registered,
            certificates_expiring,
            names,
            expiries: Mutex::new(BTreeMap::new()),
            render_lock: Mutex::new(()),
            campaign_wave,
            renewals,
            success_without_download,
            broker_link_up,
            broker_link_losses,
            store_up,
            store_losses,
            leader,
            lease_token,
            lease: Mutex::new(None),
            console_requests,
            console_refused,
            inbox_rows,
        })
    }

    /// (Replicas) `n` rows of the replicas' inbox `op` ("written", "already_waiting": a
    /// device's message not written again, "read", "write_failed", "queue_full",
    /// "touch_dropped").
    pub fn inbox(&self, op: &str, n: u64) {
        self.inbox_rows.with_label_values(&[op]).inc_by(n);
    }

    /// A console page or stream served (`page` is one of a fixed set).
    pub fn console_request(&self, page: &str) {
        self.console_requests.with_label_values(&[page]).inc();
    }

    /// A console connection or request refused (`reason` is one of a fixed set).
    pub fn console_refused(&self, reason: &str) {
        self.console_refused.with_label_values(&[reason]).inc();
    }

    pub fn console_refused_count(&self, reason: &str) -> u64 {
        self.console_refused.with_label_values(&[reason]).get()
    }

    /// Devices registered and connected now (the console's fleet line), read as a scrape
    /// reads them: registered from the expiry table (one entry per distinct expiry second,
    /// summed under a lock the engine holds only to move one entry), connected from the
    /// front's device road (or the gauge with an external broker).
    pub fn fleet_counts(&self) -> (i64, i64) {
        let registered: u64 = self.expiries().values().sum();
        let connected = match &self.direct {
            Some(d) => d.connected() as i64,
            None => self.devices_connected.get(),
        };
        (registered as i64, connected)
    }

    /// The broker link came up (`true`) or failed (`false`).
    pub fn broker_link(&self, up: bool) {
        if !up && self.broker_link_up.get() == 1 {
            self.broker_link_losses.inc();
        }
        self.broker_link_up.set(i64::from(up));
    }

    pub fn broker_link_is_up(&self) -> bool {
        self.broker_link_up.get() == 1
    }

    /// The store took a flush again (`true`), or a flush failed and the engine waits (`false`).
    pub fn store(&self, up: bool) {
        if !up && self.store_up.get() == 1 {
            self.store_losses.inc();
        }
        self.store_up.set(i64::from(up));
    }

    /// Names this process: `aloft_replica_info{replica="..."}` 1, so a scrape (and
    /// `aloft status`) says which replica it is. Called once, at start.
    pub fn name_replica(&self, replica: &str) {
        let info = must(IntGaugeVec::new(
            Opts::new(
                "aloft_replica_info",
                "1, labelled with this process's replica id (`[lease] replica_id`, else hostname-pid)",
            ),
            &["replica"],
        ));
        info.with_label_values(&[replica]).set(1);
        // A second call's registration of the same family is the error ignored.
        let _ = self.registry.register(Box::new(info));
    }

    /// The process holds (or waits for) the leader lease: `aloft_leader` follows it from now
    /// on, and `aloft_lease_token` appears.
    pub fn watch_lease(&self, view: LeaseView) {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.is_none() {
            // Registered once; a second registration of the same family is the error ignored.
            let _ = self.registry.register(Box::new(self.lease_token.clone()));
        }
        let (leads, token) = view();
        self.leader.set(i64::from(leads));
        self.lease_token.set(token.unwrap_or(0));
        *lease = Some(view);
    }

    /// Whether this process leads now (`aloft_leader`).
    pub fn leads(&self) -> bool {
        let view = self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match view {
            Some(v) => v().0,
            None => self.leader.get() == 1,
        }
    }

    pub fn store_is_up(&self) -> bool {
        self.store_up.get() == 1
    }

    /// A member succeeded `secs` after it was notified.
    pub fn update_took(&self, secs: f64) {
        self.update_seconds.observe(secs);
    }

    pub fn chunk_request_served(&self, secs: f64) {
        self.chunk_service_seconds.observe(secs);
    }

    pub fn chunks_resent(&self, n: u64) {
        self.chunks_resent.inc_by(n);
    }

    pub fn store_committed(&self, secs: f64) {
        self.store_commit_seconds.observe(secs);
    }

    /// Sets a campaign's status gauges: 1 for `status`, 0 for each of `all`'s others.
    pub fn campaign_status(&self, campaign: &str, status: &str, all: &[&str]) {
        for s in all {
            self.campaign_status
                .with_label_values(&[campaign, s])
                .set(i64::from(*s == status));
        }
    }

    pub fn campaign_paused_by_rollout(&self, campaign: &str, paused: bool) {
        self.campaign_self_paused
            .with_label_values(&[campaign])
            .set(i64::from(paused));
    }

    pub fn admin_request(&self, op: &str) {
        self.admin_requests.with_label_values(&[op]).inc();
    }

    pub fn admin_forbidden(&self, op: &str, role: &str) {
        self.admin_forbidden.with_label_values(&[op, role]).inc();
    }

    /// Refusals of `op` to `role` so far, for tests.
    pub fn admin_forbidden_count(&self, op: &str, role: &str) -> u64 {
        self.admin_forbidden.with_label_values(&[op, role]).get()
    }

    /// A device was registered (`before` is `None`) or its record rewritten; its certificate
    /// now expires at `not_after` (Unix s). O(log n).
    pub fn device_certificate(&self, before: Option<i64>, not_after: i64) {
        let mut expiries = self.expiries();
        if let Some(old) = before {
            if let Some(n) = expiries.get_mut(&old) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    expiries.remove(&old);
                }
            }
        }
        *expiries.entry(not_after).or_insert(0) += 1;
    }

    fn expiries(&self) -> MutexGuard<'_, BTreeMap<i64, u64>> {
        // Each critical section is one map update or one range count: a panic cannot leave
        // the map half-changed.
        self.expiries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every metric family this orchestrator exports, including those without a series yet.
    pub fn family_names(&self) -> &[String] {
        &self.names
    }

    pub fn success_without_download(&self) {
        self.success_without_download.inc();
    }

    pub fn success_without_download_count(&self) -> u64 {
        self.success_without_download.get()
    }

    pub fn renewal(&self, outcome: &str) {
        self.renewals.with_label_values(&[outcome]).inc();
    }

    /// Renewals with this outcome so far, for tests.
    pub fn renewal_count(&self, outcome: &str) -> u64 {
        self.renewals.with_label_values(&[outcome]).get()
    }

    pub fn heartbeat(&self, healthy: bool) {
        let label = if healthy { "true" } else { "false" };
        self.heartbeats.with_label_values(&[label]).inc();
    }

    pub fn wave_opened(&self, campaign: &str, wave: u32) {
        self.campaign_wave
            .with_label_values(&[campaign])
            .set(i64::from(wave));
    }

    pub fn set_device_state(&self, campaign: &str, state: &str, n: i64) {
        self.device_state
            .with_label_values(&[campaign, state])
            .set(n);
    }

    pub fn report(&self, outcome: &str) {
        self.reports.with_label_values(&[outcome]).inc();
    }

    pub fn illegal_transition(&self) {
        self.illegal_transitions.inc();
    }

    pub fn rejected(&self, kind: &str, reason: &str) {
        self.rejected_messages
            .with_label_values(&[kind, reason])
            .inc();
    }

    pub fn failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    /// A member took (or switched to) a delivery path; `delta_then_full` is counted when a
    /// member that took the delta falls back, so `delta` minus it is who stayed on the delta.
    pub fn delivery_path(&self, path: &str) {
        self.delivery_paths.with_label_values(&[path]).inc();
    }

    pub fn chunk_served(&self, bytes: usize) {
        self.chunks_served.inc();
        self.chunk_bytes_served.inc_by(bytes as u64);
    }

    pub fn chunk_bytes_served(&self) -> u64 {
        self.chunk_bytes_served.get()
    }

    pub fn store_flushed(&self, secs: f64) {
        self.store_flush_seconds.observe(secs);
    }

    /// The front's counters now, if this orchestrator has a front.
    pub fn front_snapshot(&self) -> Option<FrontStatsSnapshot> {
        self.front.as_ref().map(|f| f.snapshot())
    }

    /// Packets (chunk frames) the front delivered directly, past the broker.
    pub fn direct_delivered(&self) -> u64 {
        self.direct.as_ref().map_or(0, |d| d.delivered())
    }

    /// A counter's current value, for tests and summaries.
    pub fn rejected_count(&self, kind: &str, reason: &str) -> u64 {
        self.rejected_messages
            .with_label_values(&[kind, reason])
            .get()
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        {
            let _one = self.render_lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = &self.front {
                self.front_families.sync(&f.snapshot());
            }
            if let Some(d) = &self.direct {
                self.front_families.sync_direct(d);
                self.devices_connected.set(d.connected() as i64);
            }
            let horizon = unix_now() + EXPIRY_HORIZON_SECS;
            let expiries = self.expiries();
            let soon: u64 = expiries.range(..=horizon).map(|(_, n)| n).sum();
            let all: u64 = expiries.values().sum();
            drop(expiries);
            self.certificates_expiring.set(soon as i64);
            self.devices_registered.set(all as i64);
            let view = self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(view) = view {
                let (leads, token) = view();
                self.leader.set(i64::from(leads));
                self.lease_token.set(token.unwrap_or(0));
            }
        }
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// How far ahead `aloft_device_certificates_expiring` looks.
const EXPIRY_HORIZON_SECS: i64 = 30 * 24 * 3600;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Serves `GET /metrics` and `GET /health` until the listener fails. A deliberately tiny HTTP/1.1 responder: the
/// endpoint has one reader (Prometheus) and one response.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics") {
                ("200 OK", metrics.render())
            } else if head.starts_with("GET /health") {
                // Up means the orchestrator can reach devices (its broker link is connected)
                // and make their reports durable (its store takes flushes).
                if !metrics.broker_link_is_up() {
                    (
                        "503 Service Unavailable",
                        String::from("broker unreachable\n"),
                    )
                } else if !metrics.store_is_up() {
                    (
                        "503 Service Unavailable",
                        String::from("store unreachable\n"),
                    )
                } else {
                    ("200 OK", String::from("ok\n"))
                }
            } else {
                ("404 Not Found", String::from("not found\n"))
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Reads one front counter out of a snapshot.
type ReadFront = fn(&FrontStatsSnapshot) -> u64;
/// Reads one device-road counter.
type ReadDirect = fn(&DirectRoutes) -> u64;
/// A front family: name, help, label name ("" for a plain counter), and each label value with
/// the counter it reads.
type FrontFamily = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, ReadFront)>,
);

/// The front's counters as proper Prometheus families: totals as `_total` counters (grouped
/// under a bounded label where they count one thing for several reasons), the open sockets and
/// queued bytes as gauges. The front keeps plain atomics (it knows no metrics library); each
/// scrape raises these counters to the atomics' values.
struct FrontFamilies {
    connections: IntGauge,
    counters: Vec<(IntCounter, ReadFront)>,
    direct_counters: Vec<(IntCounter, ReadDirect)>,
    direct_queued_bytes: IntGauge,
    retained_jobs: IntGauge,
}

impl FrontFamilies {
    fn new(registry: &Registry) -> Self {
        // (family, help, label, [(label value, field)]); an empty label means a plain counter.
        let table: [FrontFamily; 14] = [
            (
                "aloft_front_connections_over_limit_total",
                "Sockets closed at once because max_connections were open",
                "",
                vec![("", |s| s.connections_over_limit)],
            ),
            (
                "aloft_front_handshakes_total",
                "TLS handshakes by outcome",
                "outcome",
                vec![
                    ("ok", |s| s.handshakes_ok),
                    ("failed", |s| s.handshakes_failed),
                    ("timed_out", |s| s.handshakes_timed_out),
                    ("refused_per_source", |s| s.handshakes_refused_per_source),
                    ("evicted", |s| s.handshakes_evicted),
                ],
            ),
            (
                "aloft_front_certificates_refused_total",
                "Verified certificates whose identity is refused (server role, bad subject)",
                "",
                vec![("", |s| s.certificates_refused)],
            ),
            (
                "aloft_front_connects_refused_total",
                "CONNECTs refused (or never sent), by reason",
                "reason",
                vec![
                    ("timed_out", |s| s.connects_timed_out),
                    ("bad_client_id", |s| s.refused_bad_client_id),
                    ("duplicate_identity", |s| s.refused_duplicate_identity),
                    ("protocol", |s| s.refused_protocol),
                    ("malformed", |s| s.refused_malformed),
                    ("not_authorized", |s| s.refused_not_authorized),
                    ("backend", |s| s.refused_backend),
                ],
            ),
            (
                "aloft_front_sessions_established_total",
                "Sessions established (devices served by the front, operators relayed)",
                "",
                vec![("", |s| s.sessions_established)],
            ),
            (
                "aloft_front_acl_denied_total",
                "Packets refused by the ACL (the connection is closed), by packet",
                "packet",
                vec![
                    ("publish", |s| s.acl_denied_publish),
                    ("subscribe", |s| s.acl_denied_subscribe),
                ],
            ),
            (
                "aloft_front_subscriptions_over_quota_total",
                "Topic filters refused with SUBACK 0x97",
                "",
                vec![("", |s| s.subscriptions_over_quota)],
            ),
            (
                "aloft_front_packets_refused_total",
                "Packets refused or not sent, by reason",
                "reason",
                vec![
                    ("oversized", |s| s.oversized_packets),
                    ("malformed", |s| s.malformed_packets),
                    ("over_client_maximum", |s| s.device_packets_over_client_max),
                ],
            ),
            (
                "aloft_front_keep_alive_timeouts_total",
                "Sessions closed for silence beyond 1.5 times their keep-alive",
                "",
                vec![("", |s| s.keep_alive_timeouts)],
            ),
            (
                "aloft_front_sessions_revoked_total",
                "Live sessions ended because a new CRL revoked their certificate",
                "",
                vec![("", |s| s.sessions_revoked)],
            ),
            (
                "aloft_front_crl_reloads_total",
                "CRLs applied while running",
                "",
                vec![("", |s| s.crl_reloads)],
            ),
            (
                "aloft_front_device_messages_total",
                "PUBLISHes devices sent on their own topics, handed to the orchestrator",
                "",
                vec![("", |s| s.device_messages)],
            ),
            (
                "aloft_front_device_inbox_full_total",
                "Device QoS 0 PUBLISHes and Wills dropped because the inbox was full",
                "",
                vec![("", |s| s.device_inbox_full)],
            ),
            (
                "aloft_front_bytes_total",
                "Bytes of MQTT traffic, by direction",
                "direction",
                vec![("in", |s| s.bytes_in), ("out", |s| s.bytes_out)],
            ),
        ];
        let mut counters = Vec::new();
        for (name, help, label, fields) in table {
            if label.is_empty() {
                let c = must(IntCounter::new(name, help));
                must(registry.register(Box::new(c.clone())));
                counters.extend(fields.into_iter().map(|(_, read)| (c.clone(), read)));
            } else {
                let v = must(IntCounterVec::new(Opts::new(name, help), &[label]));
                must(registry.register(Box::new(v.clone())));
                for (value, read) in fields {
                    counters.push((v.with_label_values(&[value]), read));
                }
            }
        }
        let direct = must(IntCounterVec::new(
            Opts::new(
                "aloft_front_direct_packets_total",
                "Packets on the device road (past the broker), by outcome",
            ),
            &["outcome"],
        ));
        must(registry.register(Box::new(direct.clone())));
        let direct_fields: [(&str, ReadDirect); 4] = [
            ("delivered", |d| d.delivered()),
            ("dropped", |d| d.dropped()),
            ("busy", |d| d.busy()),
            ("control_dropped", |d| d.control_dropped()),
        ];
        let direct_counters = direct_fields
            .into_iter()
            .map(|(value, read)| (direct.with_label_values(&[value]), read))
            .collect();
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        Self {
            connections: gauge(
                "aloft_front_connections",
                "Sockets the front holds open (handshaking ones included)",
            ),
            counters,
            direct_counters,
            direct_queued_bytes: gauge(
                "aloft_front_direct_queued_bytes",
                "Bytes of chunk frames queued for devices (the fleet budget's use)",
            ),
            retained_jobs: gauge(
                "aloft_front_retained_jobs",
                "Devices' retained jobs the front holds",
            ),
        }
    }

    /// Raises each counter to the front's value (they only grow; callers hold the render lock,
    /// so two scrapes never add the same difference twice).
    fn sync(&self, s: &FrontStatsSnapshot) {
        self.connections.set(s.connections_active as i64);
        for (counter, read) in &self.counters {
            counter.inc_by(read(s).saturating_sub(counter.get()));
        }
    }

    fn sync_direct(&self, d: &DirectRoutes) {
        for (counter, read) in &self.direct_counters {
            counter.inc_by(read(d).saturating_sub(counter.get()));
        }
        self.direct_queued_bytes.set(d.queued_bytes() as i64);
        self.retained_jobs.set(d.retained_jobs() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn the_fronts_counters_are_proper_families_that_follow_the_atomics() {
        let front = Arc::new(FrontStats::default());
        let m = Metrics::new(Some(front.clone()), None);
        front.handshakes_ok.fetch_add(3, Ordering::Relaxed);
        front.connections_active.fetch_add(2, Ordering::Relaxed);
        front.bytes_in.fetch_add(100, Ordering::Relaxed);
        let text = m.render();
        assert!(!text.contains("aloft_front{"));
        assert_eq!(
            value(&text, "aloft_front_handshakes_total{outcome=\"ok\"}"),
            Some(3.0)
        );
        assert_eq!(value(&text, "aloft_front_connections"), Some(2.0));
        assert_eq!(
            value(&text, "aloft_front_bytes_total{direction=\"in\"}"),
            Some(100.0)
        );
        // A second scrape adds only what happened in between.
        front.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        front.connections_active.fetch_sub(2, Ordering::Relaxed);
        let text = m.render();
        assert_eq!(
            value(&text, "aloft_front_handshakes_total{outcome=\"ok\"}"),
            Some(4.0)
        );
        assert_eq!(value(&text, "aloft_front_connections"), Some(0.0));
    }

    #[test]
    fn the_leader_gauge_is_one_on_sled_and_follows_the_lease_at_scrape_time() {
        let m = Metrics::new(None, None);
        let text = m.render();
        assert_eq!(value(&text, "aloft_leader"), Some(1.0));
        assert_eq!(value(&text, "aloft_lease_token"), None, "PostgreSQL only");
        let leads = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let l = leads.clone();
        m.watch_lease(Arc::new(move || (l.load(Ordering::Relaxed), Some(7))));
        let text = m.render();
        assert_eq!(value(&text, "aloft_leader"), Some(1.0));
        assert_eq!(value(&text, "aloft_lease_token"), Some(7.0));
        leads.store(false, Ordering::Relaxed);
        assert_eq!(value(&m.render(), "aloft_leader"), Some(0.0));
        assert!(!m.leads());
    }

    #[test]
    fn certificates_expiring_within_thirty_days_are_counted_at_scrape_time() {
        let m = Metrics::new(None, None);
        let now = unix_now();
        let day = 24 * 3600;
        m.device_certificate(None, now + 10 * day);
        m.device_certificate(None, now + 10 * day);
        m.device_certificate(None, now - day);
        m.device_certificate(None, now + 400 * day);
        let text = m.render();
        assert_eq!(
            value(&text, "aloft_device_certificates_expiring"),
            Some(3.0)
        );
        assert_eq!(value(&text, "aloft_devices_registered"), Some(4.0));
        // One device renews: its old expiry leaves the count.
        m.device_certificate(Some(now + 10 * day), now + 365 * day);
        let text = m.render();
        assert_eq!(
            value(&text, "aloft_device_certificates_expiring"),
            Some(2.0)
        );
        assert_eq!(value(&text, "aloft_devices_registered"), Some(4.0));
    }

    #[test]
    fn every_family_is_listed_even_before_its_first_series() {
        let m = Metrics::new(None, None);
        let names = m.family_names();
        for n in [
            "aloft_rejected_messages_total",
            "aloft_device_failures_total",
            "aloft_campaign_paused_by_rollout",
            "aloft_store_commit_seconds",
            "aloft_front_handshakes_total",
        ] {
            assert!(names.iter().any(|x| x == n), "{n}");
        }
    }
}
