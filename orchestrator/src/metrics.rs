//! Prometheus metrics and the `/metrics` HTTP endpoint. Only this module knows prometheus; the
//! rest of the orchestrator calls the typed methods of [`Metrics`].

use std::net::SocketAddr;
use std::sync::Arc;

use aloft_broker::{DirectRoutes, FrontStats, FrontStatsSnapshot};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    front_gauges: IntGaugeVec,
    heartbeats: IntCounterVec,
    campaign_wave: IntGaugeVec,
    renewals: IntCounterVec,
    success_without_download: IntCounter,
}

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
        let front_gauges = must(IntGaugeVec::new(
            Opts::new(
                "aloft_front",
                "mTLS front counters (cumulative unless noted)",
            ),
            &["counter"],
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
        for c in [
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
            Box::new(front_gauges.clone()),
        ] {
            must(registry.register(c));
        }
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
            front_gauges,
            heartbeats,
            campaign_wave,
            renewals,
            success_without_download,
        })
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
        if let Some(f) = &self.front {
            for (name, v) in front_counters(&f.snapshot()) {
                self.front_gauges.with_label_values(&[name]).set(v as i64);
            }
        }
        if let Some(d) = &self.direct {
            for (name, v) in [
                ("direct_delivered", d.delivered()),
                ("direct_dropped", d.dropped()),
                ("direct_busy", d.busy()),
                ("direct_queued_bytes", d.queued_bytes()),
                ("direct_control_dropped", d.control_dropped()),
                ("retained_jobs", d.retained_jobs() as u64),
            ] {
                self.front_gauges.with_label_values(&[name]).set(v as i64);
            }
        }
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `GET /metrics` until the listener fails. A deliberately tiny HTTP/1.1 responder: the
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

fn front_counters(s: &FrontStatsSnapshot) -> [(&'static str, u64); 26] {
    [
        ("connections_active", s.connections_active),
        ("connections_over_limit", s.connections_over_limit),
        ("handshakes_ok", s.handshakes_ok),
        ("handshakes_failed", s.handshakes_failed),
        ("handshakes_timed_out", s.handshakes_timed_out),
        (
            "handshakes_refused_per_source",
            s.handshakes_refused_per_source,
        ),
        ("handshakes_evicted", s.handshakes_evicted),
        ("certificates_refused", s.certificates_refused),
        ("connects_timed_out", s.connects_timed_out),
        ("refused_bad_client_id", s.refused_bad_client_id),
        ("refused_duplicate_identity", s.refused_duplicate_identity),
        ("refused_protocol", s.refused_protocol),
        ("refused_malformed", s.refused_malformed),
        ("refused_not_authorized", s.refused_not_authorized),
        ("refused_backend", s.refused_backend),
        ("sessions_established", s.sessions_established),
        ("acl_denied_publish", s.acl_denied_publish),
        ("acl_denied_subscribe", s.acl_denied_subscribe),
        ("subscriptions_over_quota", s.subscriptions_over_quota),
        ("oversized_packets", s.oversized_packets),
        ("malformed_packets", s.malformed_packets),
        ("keep_alive_timeouts", s.keep_alive_timeouts),
        ("sessions_revoked", s.sessions_revoked),
        ("crl_reloads", s.crl_reloads),
        ("bytes_in", s.bytes_in),
        ("bytes_out", s.bytes_out),
    ]
}
