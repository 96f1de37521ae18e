//! `device list`, `campaign list` and `release list` as tables an operator reads, with the
//! filters each takes. Pure: the replies (as the admin protocol returns them) and `now` in, text
//! out; `--json` bypasses this module and prints the reply as it came.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::human;
use crate::admin::wire::CampaignSummary;

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One device as `device_list` returns it: the registry record, and since 1.5 the firmware it
/// runs and its latest campaign.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceRow {
    pub id: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub running_version: Option<String>,
    #[serde(default)]
    pub campaign: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
}

/// What `device list` keeps; every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub labels: Vec<(String, String)>,
    pub group: Option<String>,
    pub state: Option<String>,
    pub campaign: Option<String>,
    pub version: Option<String>,
}

impl DeviceFilter {
    fn keeps(&self, d: &DeviceRow) -> bool {
        self.labels.iter().all(|(k, v)| d.labels.get(k) == Some(v))
            && self.group.as_ref().is_none_or(|g| d.groups.contains(g))
            && self
                .state
                .as_ref()
                .is_none_or(|s| d.state.as_deref().unwrap_or("none") == s)
            && self
                .campaign
                .as_ref()
                .is_none_or(|c| d.campaign.as_ref() == Some(c))
            && self
                .version
                .as_ref()
                .is_none_or(|v| d.running_version.as_ref() == Some(v))
    }
}

/// The device table: id, state in its latest campaign, running version, labels, last seen,
/// latest campaign; then how many were shown.
pub fn devices(all: &[DeviceRow], filter: &DeviceFilter, now_ms: u64) -> String {
    let mut rows: Vec<&DeviceRow> = all.iter().filter(|d| filter.keeps(d)).collect();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let state = match (&d.state, d.revoked) {
                (_, true) => "revoked".to_owned(),
                (Some(s), false) => s.clone(),
                (None, false) => "-".to_owned(),
            };
            vec![
                d.id.clone(),
                state,
                d.running_version.clone().unwrap_or_else(|| "?".into()),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
                if d.last_seen_ms == 0 {
                    "never".into()
                } else {
                    human::relative(d.last_seen_ms, now_ms)
                },
                d.campaign.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "DEVICE",
            "STATE",
            "VERSION",
            "LABELS",
            "LAST SEEN",
            "CAMPAIGN",
        ],
        &cells,
    );
    out.push_str(&format!("{} of {} devices\n", rows.len(), all.len()));
    out
}

/// The campaign table, newest last; `status` keeps only campaigns in that status.
pub fn campaigns(all: &[CampaignSummary], status: Option<&str>, now_ms: u64) -> String {
    let cells: Vec<Vec<String>> = all
        .iter()
        .filter(|c| status.is_none_or(|s| c.status.as_str() == s))
        .map(|c| {
            let succeeded = c.count(aloft_proto::DeviceState::Succeeded);
            let opened = c.waves.iter().filter(|w| w.opened_ms.is_some()).count();
            vec![
                c.campaign.to_string(),
                c.artifact.to_string(),
                c.status.to_string(),
                format!("{succeeded}/{}", c.total),
                c.terminal().saturating_sub(succeeded).to_string(),
                format!("{opened}/{}", c.waves.len()),
                human::relative(c.created_ms, now_ms),
            ]
        })
        .collect();
    table(
        &[
            "CAMPAIGN",
            "RELEASE",
            "STATUS",
            "SUCCEEDED",
            "FAILED",
            "WAVES",
            "CREATED",
        ],
        &cells,
    )
}

/// One release as `release_list` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct ReleaseRow {
    pub artifact: String,
    pub version: String,
    pub security_version: u64,
    pub hardware_model: String,
    #[serde(default)]
    pub image_size: u64,
    #[serde(default)]
    pub complete: bool,
    #[serde(default)]
    pub uploaded_by: String,
    #[serde(default)]
    pub uploaded_ms: Option<u64>,
}

/// The release table.
pub fn releases(all: &[ReleaseRow], now_ms: u64) -> String {
    let cells: Vec<Vec<String>> = all
        .iter()
        .map(|r| {
            vec![
                r.artifact.clone(),
                r.version.clone(),
                r.security_version.to_string(),
                r.hardware_model.clone(),
                format!("{} KiB", r.image_size.div_ceil(1024)),
                if r.complete { "yes" } else { "uploading" }.to_owned(),
                r.uploaded_by.clone(),
                r.uploaded_ms
                    .map_or("-".into(), |t| human::relative(t, now_ms)),
            ]
        })
        .collect();
    table(
        &[
            "RELEASE", "VERSION", "SECURITY", "HARDWARE", "SIZE", "COMPLETE", "BY", "UPLOADED",
        ],
        &cells,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<DeviceRow> {
        serde_json::from_value(serde_json::json!([
            {"id": "dev-2", "x25519_public": "00", "cert_not_after": 0, "groups": ["lab"],
             "labels": {"region": "eu"}, "registered_ms": 1, "last_seen_ms": 50_000,
             "running_version": "2.0.0", "campaign": "c-1", "state": "succeeded"},
            {"id": "dev-1", "x25519_public": "00", "cert_not_after": 0, "groups": [],
             "registered_ms": 1, "last_seen_ms": 0},
            {"id": "dev-3", "groups": [], "labels": {"region": "us"}, "last_seen_ms": 100_000,
             "running_version": "1.0.0", "campaign": "c-1", "state": "failed", "revoked": true}
        ]))
        .unwrap()
    }

    #[test]
    fn the_device_table_shows_state_version_labels_last_seen_and_campaign() {
        let text = devices(&rows(), &DeviceFilter::default(), 110_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "DEVICE  STATE      VERSION  LABELS     LAST SEEN  CAMPAIGN"
        );
        assert_eq!(
            lines[1],
            "dev-1   -          ?        -          never      -"
        );
        assert_eq!(
            lines[2],
            "dev-2   succeeded  2.0.0    region=eu  1m ago     c-1"
        );
        assert_eq!(
            lines[3],
            "dev-3   revoked    1.0.0    region=us  10s ago    c-1"
        );
        assert_eq!(lines[4], "3 of 3 devices");
    }

    #[test]
    fn device_filters_keep_only_what_matches_every_one() {
        let only = |f: DeviceFilter| -> Vec<String> {
            devices(&rows(), &f, 0)
                .lines()
                .skip(1)
                .filter_map(|l| l.strip_prefix("dev-").map(|r| r[..1].to_owned()))
                .collect()
        };
        let eu = DeviceFilter {
            labels: vec![("region".into(), "eu".into())],
            ..DeviceFilter::default()
        };
        assert_eq!(only(eu), vec!["2"]);
        let failed = DeviceFilter {
            state: Some("failed".into()),
            ..DeviceFilter::default()
        };
        assert_eq!(only(failed), vec!["3"]);
        let untargeted = DeviceFilter {
            state: Some("none".into()),
            ..DeviceFilter::default()
        };
        assert_eq!(only(untargeted), vec!["1"]);
        let v1 = DeviceFilter {
            version: Some("1.0.0".into()),
            campaign: Some("c-1".into()),
            ..DeviceFilter::default()
        };
        assert_eq!(only(v1), vec!["3"]);
        let lab = DeviceFilter {
            group: Some("lab".into()),
            ..DeviceFilter::default()
        };
        assert_eq!(only(lab), vec!["2"]);
    }

    #[test]
    fn the_release_table_reads_the_release_list_reply() {
        let rows: Vec<ReleaseRow> = serde_json::from_value(serde_json::json!([
            {"artifact": "fw-2.0.0", "version": "2.0.0", "security_version": 2, "sequence": 7,
             "hardware_model": "sim-v1", "image_size": 65_536, "chunk_count": 4,
             "complete": true, "uploaded_by": "alice", "uploaded_ms": 1_000}
        ]))
        .unwrap();
        let text = releases(&rows, 61_000);
        assert!(
            text.starts_with("RELEASE   VERSION  SECURITY  HARDWARE"),
            "{text}"
        );
        assert!(
            text.contains("fw-2.0.0  2.0.0    2         sim-v1    64 KiB  yes       alice  1m ago"),
            "{text}"
        );
    }
}
