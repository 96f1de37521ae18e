//! Metrics, dashboard and alerts against the real thing: a running orchestrator whose campaign
//! pauses itself at a failing canary, scraped by a real Prometheus (Debian's `prometheus`
//! package, started here on a port chosen at run time, config in a temp dir, stopped at the
//! end). `promtool` checks the scrape, the shipped alert rules and scrape config; the shipped
//! Grafana dashboard may name only metrics the orchestrator exports.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aloft_e2e::{wait_campaign, ReleaseSpec};
use aloft_orchestrator::rollout::policy::{Size, Threshold};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::CampaignStatus;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{waves, Env, LIMIT};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// One HTTP/1.0 GET; the body.
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// The metric family names of a scrape (its `# TYPE` lines).
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Every `aloft_…` metric name an expression uses, with histogram suffixes taken off.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("aloft_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The dashboard's structure: the panels a fleet operator needs, each query naming exported
/// metrics only, every panel on the provisioned datasource.
fn check_dashboard(exported: &BTreeSet<String>) {
    let text = std::fs::read_to_string(deploy().join("grafana/dashboards/aloft.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 30);
    let panels = dash["panels"].as_array().unwrap();
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for needed in [
        "Fleet overview",
        "Campaign",
        "Failures",
        "Delivery throughput",
        "Orchestrator health",
    ] {
        assert!(rows.contains(&needed), "no {needed} row");
    }
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let grid = &p["gridPos"];
        assert!(grid["w"].as_u64().unwrap() <= 24 && grid["h"].as_u64().unwrap() > 0);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "aloft-prometheus");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} names no aloft metric");
            for n in names {
                assert!(exported.contains(&n), "{}: {n} is not exported", p["title"]);
            }
        }
    }
    let alerts = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    for n in metric_names(&alerts) {
        assert!(exported.contains(&n), "alerts.yml: {n} is not exported");
    }
}

/// A real Prometheus, killed when dropped.
struct Prometheus {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        // A free port now; Prometheus binds it a moment later.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: aloft\n    static_configs:\n      - targets: [\"{target}\"]\n",
            deploy().join("prometheus/alerts.yml").display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus (Debian package prometheus; .ci/run installs it)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Queries the HTTP API until `done` holds of the `data` it returns, or the deadline.
    async fn until(&mut self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited: {status}");
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                let body = get(self.addr, path).await;
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    if done(&v["data"]) {
                        return v["data"].clone();
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus never answered {path} as expected"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[test]
fn the_shipped_alert_rules_and_scrape_config_pass_promtool() {
    let rules = deploy().join("prometheus/alerts.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let config = deploy().join("prometheus/prometheus.yml");
    let out = promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_campaign_and_fires_the_paused_by_itself_alert() {
    let env = Env::new(8).await;
    let mut cfg = env.fleet_config();
    cfg.faults.health_check_failure_probability = 1.0;
    let _fleet = env.start_fleet(&cfg).await;
    let policy = RolloutPolicy {
        waves: waves(Size::Count(2), &[100.0]),
        pause_at: Some(Threshold {
            ratio: 0.5,
            min_sample: 1,
        }),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 32 * 1024), policy)
        .await;
    wait_campaign(&env.admin, &campaign, LIMIT, |s| {
        s.status == CampaignStatus::Paused
    })
    .await
    .unwrap();
    let metrics_addr = env.running.metrics_addr.unwrap();

    // The scrape follows the conventions promtool checks (names, units, _total counters).
    let scrape = get(metrics_addr, "/metrics").await;
    let out = promtool(&["check", "metrics"], Some(&scrape));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!scrape.contains("aloft_front{"), "the old catch-all family");
    // No device id is a label value anywhere.
    for d in &env.devices {
        assert!(
            !scrape.contains(&format!("\"{}\"", d.id)),
            "{} in a label",
            d.id
        );
    }
    let mut exported = families(&scrape);
    exported.extend(env.running.metrics.family_names().iter().cloned());
    check_dashboard(&exported);

    let mut prom = Prometheus::start(metrics_addr);
    for series in [
        "aloft_devices_connected",
        "aloft_campaign_paused_by_rollout",
        "aloft_device_failures_total",
        "aloft_store_commit_seconds_bucket",
        "aloft_front_handshakes_total",
        "aloft_broker_link_up",
    ] {
        prom.until(&format!("/api/v1/series?match[]={series}"), |d| {
            d.as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    }
    let alerts = prom
        .until("/api/v1/alerts", |d| {
            d["alerts"].as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["labels"]["alertname"] == "AloftCampaignPausedByItself"
                        && x["state"] == "firing"
                })
            })
        })
        .await;
    let fired = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["labels"]["alertname"] == "AloftCampaignPausedByItself")
        .unwrap();
    assert_eq!(fired["labels"]["campaign"], campaign.as_str());
}
