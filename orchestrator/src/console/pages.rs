//! The console's pages, rendered on the server from what the board and the store hold, so a
//! page shows everything on load; `console.js` then only follows live changes. Every value
//! from a device, an operator or the store is escaped ([`esc`]). No inline script or style
//! (the CSP forbids both): bars are `<progress>` elements.

use std::fmt::Write as _;

use aloft_proto::DeviceState;

use crate::admin::wire::CampaignSummary;
use crate::cli::human;
use crate::store::{CampaignRecord, DeviceRecord, Transition};

/// HTML-escapes text for element content and double-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment (ids are restricted already; this keeps a link a link).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn page(title: &str, who: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Aloft console</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head>\
         <body><header><strong>Aloft console</strong> <nav><a href=\"/\">Overview</a> \
         <a href=\"/devices\">Devices</a></nav><span class=\"who\">read-only · {who}</span> \
         <span id=\"live\" data-state=\"off\">static</span></header><main>{body}</main></body></html>\n",
        title = esc(title),
        who = esc(who),
    )
}

/// The states shown as columns, in the order a member moves through them.
const STATES: [DeviceState; DeviceState::ALL.len()] = DeviceState::ALL;

fn counts_row(c: &CampaignSummary) -> String {
    let id = esc(c.campaign.as_str());
    let mut row = String::new();
    for s in STATES {
        let n = c.counts.get(s.as_str()).copied().unwrap_or(0);
        let _ = write!(
            row,
            "<td data-c=\"{id}\" data-k=\"n:{s}\">{n}</td>",
            s = s.as_str()
        );
    }
    row
}

fn states_header() -> String {
    STATES
        .iter()
        .map(|s| format!("<th>{}</th>", s.as_str()))
        .collect()
}

pub struct Overview<'a> {
    pub who: &'a str,
    pub now_ms: u64,
    pub registered: i64,
    pub connected: i64,
    pub campaigns: &'a [std::sync::Arc<CampaignSummary>],
    /// Campaigns in the store the board does not hold (finished before this start).
    pub older: &'a [CampaignRecord],
}

pub fn overview(o: &Overview<'_>) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Fleet</h1><p class=\"fleet\"><span>Devices registered: <b id=\"registered\">{}</b></span> \
         <span>connected now: <b id=\"connected\">{}</b></span> <span>as of {}</span></p>",
        o.registered,
        o.connected,
        esc(&human::time(o.now_ms))
    );
    b.push_str("<h2>Campaigns</h2>");
    if o.campaigns.is_empty() && o.older.is_empty() {
        b.push_str("<p>No campaigns yet.</p>");
    } else {
        let _ = write!(
            b,
            "<table class=\"campaigns\"><thead><tr><th>campaign</th><th>release</th><th>status</th>\
             <th>members</th><th>progress</th>{}</tr></thead><tbody>",
            states_header()
        );
        for c in o.campaigns {
            let id = esc(c.campaign.as_str());
            let done = c.counts.get("succeeded").copied().unwrap_or(0);
            let _ = write!(
                b,
                "<tr><td><a href=\"/campaigns/{link}\">{id}</a></td><td>{art}</td>\
                 <td class=\"status\" data-c=\"{id}\" data-k=\"status\">{status}</td><td>{total}</td>\
                 <td><progress data-c=\"{id}\" data-k=\"bar\" max=\"{max}\" value=\"{done}\"></progress></td>{counts}</tr>",
                link = seg(c.campaign.as_str()),
                art = esc(c.artifact.as_str()),
                status = c.status.as_str(),
                total = c.total,
                max = c.total.max(1),
                counts = counts_row(c),
            );
        }
        for r in o.older {
            let id = esc(r.id.as_str());
            let _ = write!(
                b,
                "<tr><td><a href=\"/campaigns/{link}\">{id}</a></td><td>{art}</td><td class=\"status\">{status}</td>\
                 <td>{total}</td><td colspan=\"11\">finished before this start of the orchestrator</td></tr>",
                link = seg(r.id.as_str()),
                art = esc(r.artifact.as_str()),
                status = r.status.as_str(),
                total = r.devices.len(),
            );
        }
        b.push_str("</tbody></table>");
    }
    page("Overview", o.who, &b)
}

pub fn campaign(who: &str, now_ms: u64, c: &CampaignSummary) -> String {
    let id = esc(c.campaign.as_str());
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Campaign {id}</h1><dl class=\"facts\"><dt>release</dt><dd>{art}</dd>\
         <dt>status</dt><dd class=\"status\" data-title=\"1\" data-c=\"{id}\" data-k=\"status\">{status}</dd>\
         <dt>why</dt><dd data-c=\"{id}\" data-k=\"reason\">{reason}</dd>\
         <dt>members</dt><dd>{total}</dd><dt>created</dt><dd>{created}</dd>\
         <dt>finished</dt><dd>{finished}</dd></dl>",
        art = esc(c.artifact.as_str()),
        status = c.status.as_str(),
        reason = esc(c.reason.as_deref().unwrap_or("-")),
        total = c.total,
        created = esc(&human::time_and_relative(c.created_ms, now_ms)),
        finished = esc(&c.finished_ms.map_or("-".into(), human::time)),
    );
    let _ = write!(
        b,
        "<h2>Members per state</h2><table><thead><tr>{}</tr></thead><tbody><tr>{}</tr></tbody></table>",
        states_header(),
        counts_row(c)
    );
    b.push_str(
        "<h2>Waves</h2><table class=\"waves\"><thead><tr><th>wave</th><th>size</th><th>progress</th>\
         <th>notified</th><th>downloading</th><th>installing</th><th>succeeded</th>\
         <th>unhealthy</th><th>failed</th><th>opened</th><th>soak from</th></tr></thead><tbody>",
    );
    for w in &c.waves {
        let n = w.wave;
        let k = &w.counts;
        let cell = |f: &str, v: u32| format!("<td data-c=\"{id}\" data-k=\"w:{n}:{f}\">{v}</td>");
        let _ = write!(
            b,
            "<tr><td>{wave}</td>{size}<td><progress data-c=\"{id}\" data-k=\"w:{n}:bar\" max=\"{max}\" \
             value=\"{done}\"></progress></td>{a}{d}{i}{s}{u}{f}<td data-c=\"{id}\" data-k=\"w:{n}:opened\">{opened}</td>\
             <td>{soak}</td></tr>",
            wave = n + 1,
            size = cell("size", k.size),
            max = k.size.max(1),
            done = k.succeeded,
            a = cell("notified", k.notified),
            d = cell("downloading", k.downloading),
            i = cell("installing", k.installing),
            s = cell("succeeded", k.succeeded),
            u = cell("unhealthy", k.unhealthy),
            f = cell("failed", k.failed),
            opened = esc(&w.opened_ms.map_or("not yet".into(), human::time)),
            soak = esc(&w.finished_ms.map_or("-".into(), human::time)),
        );
    }
    b.push_str("</tbody></table>");
    page(&format!("Campaign {}", c.campaign), who, &b)
}

/// A campaign that finished before this start of the orchestrator: what its record says.
pub fn campaign_record(who: &str, r: &CampaignRecord) -> String {
    let b = format!(
        "<h1>Campaign {id}</h1><dl class=\"facts\"><dt>release</dt><dd>{art}</dd>\
         <dt>status</dt><dd class=\"status\">{status}</dd><dt>why</dt><dd>{reason}</dd>\
         <dt>members</dt><dd>{total}</dd><dt>created</dt><dd>{created}</dd>\
         <dt>finished</dt><dd>{finished}</dd></dl>\
         <p>This campaign ended before the orchestrator last started; per-state counts are \
         shown for campaigns it has loaded since.</p>",
        id = esc(r.id.as_str()),
        art = esc(r.artifact.as_str()),
        status = r.status.as_str(),
        reason = esc(r.rollout.reason.as_deref().unwrap_or("-")),
        total = r.devices.len(),
        created = esc(&human::time(r.created_ms)),
        finished = esc(&r.finished_ms.map_or("-".into(), human::time)),
    );
    page(&format!("Campaign {}", r.id), who, &b)
}

pub fn devices(who: &str, now_ms: u64, list: &[DeviceRecord], next: Option<&str>) -> String {
    let mut b = String::from(
        "<h1>Devices</h1><table class=\"devices\"><thead><tr><th>device</th><th>running</th>\
         <th>labels</th><th>groups</th><th>last seen</th><th>certificate until</th></tr></thead><tbody>",
    );
    for d in list {
        let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(
            b,
            "<tr><td><a href=\"/devices/{link}\">{id}</a>{revoked}</td><td>{running}</td><td>{labels}</td>\
             <td>{groups}</td><td>{seen}</td><td>{cert}</td></tr>",
            link = seg(d.id.as_str()),
            id = esc(d.id.as_str()),
            revoked = if d.revoked { " <em>revoked</em>" } else { "" },
            running = esc(d.running_version.as_deref().unwrap_or("-")),
            labels = esc(&labels.join(", ")),
            groups = esc(&d.groups.join(", ")),
            seen = esc(&if d.last_seen_ms == 0 {
                "never".to_owned()
            } else {
                human::relative(d.last_seen_ms, now_ms)
            }),
            cert = esc(&human::time(
                u64::try_from(d.cert_not_after).unwrap_or(0).saturating_mul(1000)
            )),
        );
    }
    b.push_str("</tbody></table>");
    if let Some(after) = next {
        let _ = write!(
            b,
            "<p><a class=\"next\" href=\"/devices?after={}\">next page</a></p>",
            seg(after)
        );
    }
    page("Devices", who, &b)
}

pub fn device(who: &str, now_ms: u64, d: &DeviceRecord, history: &[Transition]) -> String {
    let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut b = format!(
        "<h1>Device {id}</h1><dl class=\"facts\"><dt>running</dt><dd>{running}</dd>\
         <dt>labels</dt><dd>{labels}</dd><dt>groups</dt><dd>{groups}</dd>\
         <dt>registered</dt><dd>{registered}</dd><dt>last seen</dt><dd>{seen}</dd>\
         <dt>certificate</dt><dd>serial {serial}, until {cert}{revoked}</dd>\
         <dt>security floor</dt><dd>{floor}</dd></dl>\
         <h2>History</h2>",
        id = esc(d.id.as_str()),
        running = esc(d.running_version.as_deref().unwrap_or("-")),
        labels = esc(&labels.join(", ")),
        groups = esc(&d.groups.join(", ")),
        registered = esc(&human::time(d.registered_ms)),
        seen = esc(&if d.last_seen_ms == 0 {
            "never".to_owned()
        } else {
            human::time_and_relative(d.last_seen_ms, now_ms)
        }),
        serial = esc(&d.cert_serial),
        cert = esc(&human::time(
            u64::try_from(d.cert_not_after)
                .unwrap_or(0)
                .saturating_mul(1000)
        )),
        revoked = if d.revoked { " (revoked)" } else { "" },
        floor = d.floor.map_or("-".to_owned(), |f| f.0.to_string()),
    );
    if history.is_empty() {
        b.push_str("<p>No transitions recorded.</p>");
    } else {
        b.push_str(
            "<table class=\"history\"><thead><tr><th>time</th><th>campaign</th><th>from</th>\
             <th>to</th><th>reason</th></tr></thead><tbody>",
        );
        for t in history {
            let _ = write!(
                b,
                "<tr><td>{at}</td><td><a href=\"/campaigns/{link}\">{c}</a></td><td>{from}</td>\
                 <td class=\"state-{to}\">{to}</td><td>{reason}</td></tr>",
                at = esc(&human::time(t.at_ms)),
                link = seg(t.campaign.as_str()),
                c = esc(t.campaign.as_str()),
                from = if t.from == t.to && t.to == DeviceState::Idle {
                    "(joined)"
                } else {
                    t.from.as_str()
                },
                to = t.to.as_str(),
                reason = t.reason.map_or("", |r| r.as_str()),
            );
        }
        let _ = write!(
            b,
            "</tbody></table><p class=\"note\">Newest first; the last {} transitions are kept.</p>",
            crate::store::HISTORY_PER_DEVICE
        );
    }
    page(&format!("Device {}", d.id), who, &b)
}

/// A page for an error a person can read (no detail beyond the status).
pub fn message(title: &str, text: &str) -> String {
    page(
        title,
        "-",
        &format!("<h1>{}</h1><p>{}</p>", esc(title), esc(text)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }
}
