//! The `aloft` binary against a running orchestrator, as an operator uses it every day:
//! `campaign status --watch` on campaigns that fail or pause, and `device list`'s table.

use std::process::Stdio;

use aloft_e2e::{wait_campaign, ReleaseSpec};
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::CampaignStatus;
use aloft_proto::{CampaignId, OperatorId};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common::{Env, LIMIT};

/// A profile of its own for the CLI's operator, `cli`: the front admits one connection per
/// identity, and the test's own admin client holds `ops`'s.
fn cli_profile(env: &Env) -> std::path::PathBuf {
    let dir = env.lab.root.join("operator-cli");
    if !dir.exists() {
        aloft_orchestrator::ops::issue_operator_profile(
            &env.lab.ca,
            &OperatorId::new("cli").unwrap(),
            aloft_certs::OperatorRole::Operator,
            &dir,
            30,
        )
        .unwrap();
    }
    dir
}

/// `aloft <args> --profile <operator cli's> --server <the orchestrator>`.
fn aloft(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(crate::readme::binary_dir().join("aloft"));
    cmd.args(args)
        .arg("--profile")
        .arg(cli_profile(env))
        .arg("--server")
        .arg(env.running.device_addr.to_string())
        .env_remove("ALOFT_SERVER")
        .env_remove("ALOFT_PROFILE")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_a_campaign_that_failed_everywhere_shows_why_and_exits_non_zero() {
    let env = Env::new(3).await;
    let mut cfg = env.fleet_config();
    cfg.faults.health_check_failure_probability = 1.0;
    let _fleet = env.start_fleet(&cfg).await;
    let campaign = env
        .roll_out(
            &ReleaseSpec::new("2.0.0", 2, 32 * 1024),
            RolloutPolicy::default(),
        )
        .await;
    wait_campaign(&env.admin, &campaign, LIMIT, |s| s.status.is_final())
        .await
        .unwrap();
    let out = tokio::time::timeout(
        LIMIT,
        aloft(&env, &["campaign", "status", campaign.as_str(), "--watch"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("3 more failed: health_check_failed (3 so far)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("finished, 0 of 3 succeeded, 3 failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("wave  0 {}", "x".repeat(30))),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: campaign {campaign} ended finished with 0 of 3 devices succeeded"
        )),
        "{stderr}"
    );
    assert!(stdout.contains("3 devices: rolled_back=3"), "{stdout}");

    // The device table: each device rolled back and runs its old version again.
    let out = aloft(&env, &["device", "list", "--state", "rolled_back"])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("DEVICE") && lines[0].contains("VERSION"),
        "{table}"
    );
    for line in &lines[1..4] {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[1], "rolled_back", "{table}");
        assert_eq!(cells[2], "1.0.0", "{table}");
        assert_eq!(cells.last(), Some(&campaign.as_str()), "{table}");
    }
    assert_eq!(lines[4], "3 of 3 devices", "{table}");
    // `--json` is the reply, for scripts.
    let out = aloft(&env, &["device", "list", "--json"])
        .output()
        .await
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(3));
    assert_eq!(json[0]["running_version"], "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_does_not_end_the_watch_and_says_the_campaign_can_be_resumed() {
    let env = Env::new(2).await;
    let _fleet = env.start_fleet(&env.fleet_config()).await;
    // Starts tomorrow: nothing moves before the pause, or after it.
    let policy = RolloutPolicy {
        start_at: Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 86_400,
        ),
        ..RolloutPolicy::default()
    };
    let campaign = env
        .roll_out(&ReleaseSpec::new("2.0.0", 2, 32 * 1024), policy)
        .await;
    let _: Value = env
        .admin
        .call(AdminBody::CampaignPause {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    let mut child = aloft(&env, &["campaign", "status", campaign.as_str(), "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let paused = line.contains("waiting: paused") && line.contains("campaign resume");
            seen.push(line);
            if paused {
                return;
            }
        }
        panic!("the watch ended on a pause: {seen:#?}");
    })
    .await
    .unwrap();
    // Still watching; an abort ends the campaign, and the watch with it.
    abort(&env, &campaign).await;
    let rest = tokio::time::timeout(LIMIT, async {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push(line);
        }
        rest
    })
    .await
    .unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    assert!(
        rest.iter()
            .any(|l| l.contains(&format!("campaign {campaign} ended aborted"))),
        "{rest:#?}"
    );
}

async fn abort(env: &Env, campaign: &CampaignId) {
    let _: Value = env
        .admin
        .call(AdminBody::CampaignAbort {
            campaign: campaign.clone(),
        })
        .await
        .unwrap();
    wait_campaign(&env.admin, campaign, LIMIT, |s| {
        s.status == CampaignStatus::Aborted
    })
    .await
    .unwrap();
}

/// `aloft status` reads each replica's `/health` and `/metrics`: one healthy leader is exit 0;
/// a replica that does not answer makes it exit 1 and says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_leading_replica_and_fails_on_one_that_does_not_answer() {
    let env = Env::new(1).await;
    let metrics = env.running.metrics_addr.expect("the lab serves metrics");
    let bin = crate::readme::binary_dir().join("aloft");
    let out = Command::new(&bin)
        .args(["status", "--metrics", &metrics.to_string()])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("one leader"), "{table}");
    let row = table
        .lines()
        .find(|l| l.contains(&metrics.to_string()))
        .unwrap_or_default();
    assert!(
        row.contains("yes") && row.contains("up") && row.contains("200"),
        "{table}"
    );
    // A port nothing listens on: taken and closed again.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(&bin)
        .args([
            "status",
            "--json",
            "--metrics",
            &metrics.to_string(),
            "--metrics",
            &dead.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["leaders"], 1);
    assert_eq!(v["replicas"][1]["healthy"], false);
    assert!(
        v["replicas"][0]["replica"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{v}"
    );
}
