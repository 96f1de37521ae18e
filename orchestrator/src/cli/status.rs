//! `aloft status --metrics ADDR...`: which replica leads and how each is, read from each
//! replica's own `/health` and `/metrics` (the listener of `aloft serve --metrics-listen`), so
//! it works with one process or several and asks nothing of the store or the broker.
//!
//! The exit code is for scripts: 0 only if every replica answered healthy and exactly one leads.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

/// How long one replica may take to answer both requests.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of one answer read (a scrape of a large fleet is a few hundred KiB).
const MAX_ANSWER: usize = 8 * 1024 * 1024;

/// What one replica said.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    pub address: String,
    /// `None`: it did not answer (the error says why).
    pub replica: Option<String>,
    pub healthy: bool,
    /// `/health`'s body, or why nothing came.
    pub health: String,
    pub leader: bool,
    pub lease_token: Option<i64>,
    pub store_up: bool,
    pub devices_connected: Option<u64>,
}

/// The whole answer, and whether it is what a fleet should look like.
#[derive(Debug, Serialize)]
pub struct Status {
    pub replicas: Vec<ReplicaStatus>,
    pub leaders: usize,
    pub ok: bool,
}

/// One value of a metric in Prometheus' text format: the first sample named `name` (with or
/// without labels).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The `replica` label of `aloft_replica_info`.
fn replica_label(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("aloft_replica_info{"))?;
    let rest = line.split_once("replica=\"")?.1;
    Some(rest.split_once('"')?.0.to_owned())
}

/// What a replica's answers say (pure: the tests feed it text).
pub fn read(
    address: &str,
    health: Result<(u16, String)>,
    metrics: Result<String>,
) -> ReplicaStatus {
    let (healthy, health) = match health {
        Ok((code, body)) => (code == 200, format!("{code} {}", body.trim())),
        Err(e) => (false, format!("no answer: {e:#}")),
    };
    let text = metrics.unwrap_or_default();
    ReplicaStatus {
        address: address.to_owned(),
        replica: replica_label(&text),
        healthy,
        health,
        leader: sample(&text, "aloft_leader") == Some(1.0),
        lease_token: sample(&text, "aloft_lease_token").map(|t| t as i64),
        store_up: sample(&text, "aloft_store_up") == Some(1.0),
        devices_connected: sample(&text, "aloft_devices_connected").map(|n| n as u64),
    }
}

/// The fleet's status from its replicas' answers.
pub fn summarise(replicas: Vec<ReplicaStatus>) -> Status {
    let leaders = replicas.iter().filter(|r| r.leader).count();
    let ok = !replicas.is_empty() && leaders == 1 && replicas.iter().all(|r| r.healthy);
    Status {
        replicas,
        leaders,
        ok,
    }
}

/// The table `aloft status` prints.
pub fn table(s: &Status) -> String {
    let rows: Vec<Vec<String>> = s
        .replicas
        .iter()
        .map(|r| {
            vec![
                r.address.clone(),
                r.replica.clone().unwrap_or_else(|| "?".into()),
                if r.leader { "yes" } else { "no" }.into(),
                r.lease_token.map_or("-".into(), |t| t.to_string()),
                if r.store_up { "up" } else { "down" }.into(),
                r.devices_connected.map_or("-".into(), |n| n.to_string()),
                r.health.clone(),
            ]
        })
        .collect();
    let mut out = super::tables::table(
        &[
            "METRICS", "REPLICA", "LEADS", "TOKEN", "STORE", "DEVICES", "HEALTH",
        ],
        &rows,
    );
    out.push_str(&match s.leaders {
        1 => "one leader\n".to_owned(),
        0 => "NO LEADER: no replica holds the lease\n".to_owned(),
        n => format!("{n} REPLICAS SAY THEY LEAD\n"),
    });
    out
}

/// `GET path` on `address` (host:port, or an `http://` URL): the status code and body, read up
/// to [`MAX_ANSWER`] bytes.
async fn get(address: &str, path: &str) -> Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty, Limited};
    let host = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    // The connection ends once `sender` is dropped (an answer read, or the caller's timeout).
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<bytes::Bytes>::new())?;
    let answer = sender.send_request(request).await?;
    let code = answer.status().as_u16();
    let body = Limited::new(answer.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow!("{host}{path}: {e}"))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Asks every replica, all at once (one hung replica delays nobody beyond its timeout).
pub async fn ask(addresses: &[String]) -> Status {
    let mut set = tokio::task::JoinSet::new();
    for (n, a) in addresses.iter().cloned().enumerate() {
        set.spawn(async move {
            let both = async {
                let health = get(&a, "/health").await;
                let metrics = get(&a, "/metrics").await.map(|(_, body)| body);
                (health, metrics)
            };
            let status = match tokio::time::timeout(ASK_TIMEOUT, both).await {
                Ok((h, m)) => read(&a, h, m),
                Err(_) => read(
                    &a,
                    Err(anyhow!("no answer within {ASK_TIMEOUT:?}")),
                    Err(anyhow!("timed out")),
                ),
            };
            (n, status)
        });
    }
    let mut answers = Vec::with_capacity(addresses.len());
    while let Some(done) = set.join_next().await {
        if let Ok(answer) = done {
            answers.push(answer);
        }
    }
    // In the order given.
    answers.sort_by_key(|(n, _)| *n);
    summarise(answers.into_iter().map(|(_, s)| s).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEADER: &str = "# HELP aloft_leader x\n# TYPE aloft_leader gauge\naloft_leader 1\n\
        aloft_lease_token 7\naloft_store_up 1\naloft_devices_connected 42\n\
        aloft_replica_info{replica=\"r-a\"} 1\n";
    const FOLLOWER: &str = "aloft_leader 0\naloft_lease_token 0\naloft_store_up 1\n\
        aloft_devices_connected 40\naloft_replica_info{replica=\"r-b\"} 1\n";

    #[test]
    fn one_leader_and_healthy_replicas_are_ok() {
        let s = summarise(vec![
            read("a:1", Ok((200, "ok".into())), Ok(LEADER.into())),
            read("b:1", Ok((200, "ok".into())), Ok(FOLLOWER.into())),
        ]);
        assert!(s.ok);
        assert_eq!(s.leaders, 1);
        let a = &s.replicas[0];
        assert_eq!(
            (
                a.replica.as_deref(),
                a.leader,
                a.lease_token,
                a.devices_connected
            ),
            (Some("r-a"), true, Some(7), Some(42))
        );
        let t = table(&s);
        assert!(t.contains("r-b") && t.contains("one leader"), "{t}");
    }

    #[test]
    fn a_replica_that_does_not_answer_or_no_leader_is_not_ok() {
        let s = summarise(vec![
            read("b:1", Ok((200, "ok".into())), Ok(FOLLOWER.into())),
            read("c:1", Err(anyhow!("refused")), Err(anyhow!("refused"))),
        ]);
        assert!(!s.ok);
        assert_eq!(s.leaders, 0);
        assert!(table(&s).contains("NO LEADER"));
        assert!(s.replicas[1].health.contains("refused"));
        let two = summarise(vec![
            read("a:1", Ok((200, "ok".into())), Ok(LEADER.into())),
            read("a:2", Ok((200, "ok".into())), Ok(LEADER.into())),
        ]);
        assert!(!two.ok && table(&two).contains("2 REPLICAS SAY THEY LEAD"));
        let sick = summarise(vec![read(
            "a:1",
            Ok((503, "store unreachable".into())),
            Ok(LEADER.into()),
        )]);
        assert!(!sick.ok);
    }
}
