//! The read-only web console against the real thing: an orchestrator with its console on a port
//! chosen at run time, a running campaign, and Debian's Chromium (headless) loading the pages as
//! a person would, trusting only the orchestrator's own server key (its SPKI pinned). curl (the
//! fleet CA as its only trust anchor) plays the other clients: live updates as a stream of
//! events, and everyone the console must refuse.
//!
//! docs/console.png is this test's screenshot of a campaign page:
//! `ALOFT_CONSOLE_SCREENSHOT=$PWD/docs/console.png cargo nextest run --test e2e console`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use aloft_e2e::{status, wait_campaign, Lab, ReleaseSpec};
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::rollout::policy::Size;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::Running;
use aloft_proto::{CampaignId, DeviceState};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::{waves, LIMIT};

/// An orchestrator with its console, an operator, and a running, registered fleet.
struct Setup {
    tmp: TempDir,
    lab: Lab,
    running: Running,
    admin: aloft_orchestrator::admin::client::AdminClient,
    devices: Vec<aloft_device::DeviceIdentity>,
    _fleet: aloft_device::Fleet,
}

impl Setup {
    async fn new(n: usize, max_streams: usize) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let lab = Lab::create(tmp.path()).unwrap();
        let mut cfg = lab.serve_config();
        cfg.file.console.listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.file.console.max_streams = max_streams;
        let running = aloft_orchestrator::start(cfg).await.unwrap();
        let admin = lab.operator(running.device_addr).await.unwrap();
        let devices = lab.enroll_fleet("dev", n).unwrap();
        let fleet =
            aloft_device::Fleet::start(&lab.fleet_config(running.device_addr), devices.clone())
                .unwrap();
        aloft_e2e::wait_registered(&admin, n, LIMIT).await.unwrap();
        Setup {
            tmp,
            lab,
            running,
            admin,
            devices,
            _fleet: fleet,
        }
    }

    fn base(&self) -> String {
        format!("https://{}", self.running.console_addr.unwrap())
    }

    fn server_cert(&self) -> PathBuf {
        self.lab.data_dir.join("pki").join("server.crt")
    }

    fn ca(&self) -> PathBuf {
        self.lab.data_dir.join("pki").join("ca.crt")
    }
}

/// The base64 SHA-256 of the server certificate's public key, for Chromium's
/// `--ignore-certificate-errors-spki-list`: Chromium then accepts this key and no other.
fn spki_pin(cert: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
            cert.display()
        ))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A headless Chromium with its own profile (cookies persist between loads in one browser).
struct Browser {
    profile: PathBuf,
    pin: String,
}

impl Browser {
    fn args(&self) -> Vec<String> {
        vec![
            "--headless".into(),
            "--disable-gpu".into(),
            "--no-sandbox".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", self.profile.display()),
            format!("--ignore-certificate-errors-spki-list={}", self.pin),
            "--window-size=1400,800".into(),
        ]
    }

    async fn run(&self, extra: &[String]) -> String {
        let mut cmd = tokio::process::Command::new("chromium");
        cmd.args(self.args())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(LIMIT, cmd.output())
            .await
            .expect("chromium finished")
            .expect("chromium (Debian package chromium; .ci/run installs it)");
        assert!(out.status.success(), "chromium: {:?}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The DOM after the page loaded: what a person sees.
    async fn dom(&self, url: &str) -> String {
        self.run(&["--dump-dom".into(), url.into()]).await
    }

    /// Keeps `url` open in a browser that stays up (killed when the child drops), and returns
    /// its DevTools port, whose `/json/list` says each page's current title.
    async fn open(&self, url: &str) -> (tokio::process::Child, u16) {
        let port_file = self.profile.join("DevToolsActivePort");
        let _ = std::fs::remove_file(&port_file);
        let child = tokio::process::Command::new("chromium")
            .args(self.args())
            .args(["--remote-debugging-port=0", url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium");
        let port = tokio::time::timeout(LIMIT, async {
            loop {
                if let Some(p) = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|t| t.lines().next()?.parse().ok())
                {
                    return p;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("chromium wrote its DevTools port");
        (child, port)
    }

    /// Waits until the open page whose URL contains `url_part` has a title `done` accepts.
    async fn wait_title(&self, port: u16, url_part: &str, done: impl Fn(&str) -> bool) -> String {
        let list = format!("http://127.0.0.1:{port}/json/list");
        tokio::time::timeout(LIMIT, async {
            loop {
                let r = curl(std::slice::from_ref(&list)).await;
                let pages: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
                let title = pages.as_array().and_then(|ps| {
                    ps.iter()
                        .find(|p| {
                            p["type"] == "page"
                                && p["url"].as_str().is_some_and(|u| u.contains(url_part))
                        })
                        .and_then(|p| p["title"].as_str().map(str::to_owned))
                });
                if let Some(t) = title.filter(|t| done(t)) {
                    return t;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the page's title")
    }

    async fn screenshot(&self, url: &str, file: &Path) {
        self.run(&[format!("--screenshot={}", file.display()), url.into()])
            .await;
    }
}

/// What curl saw: status, headers (lower-case names), body.
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

async fn curl(args: &[String]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let out = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "30", "-D"])
            .arg(&head)
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Reply {
        status: code.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn tls_args(s: &Setup) -> Vec<String> {
    vec!["--cacert".into(), s.ca().display().to_string()]
}

fn bearer(token: &str) -> Vec<String> {
    vec!["-H".into(), format!("Authorization: Bearer {token}")]
}

/// The next `data:` of a server-sent event stream, as JSON.
async fn next_update(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> Value {
    loop {
        let l = tokio::time::timeout(LIMIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("the stream ended");
        if let Some(data) = l.strip_prefix("data:") {
            return serde_json::from_str(data.trim()).unwrap();
        }
    }
}

/// A canary of one, then everyone after an hour's soak: after the canary the campaign stays
/// active, wave 2 not open, for as long as the test needs.
fn canary_then_soak() -> RolloutPolicy {
    RolloutPolicy {
        waves: waves(Size::Count(1), &[100.0]),
        soak_secs: 3600,
        ..RolloutPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_sees_the_fleet_a_running_campaign_and_a_devices_history() {
    let s = Setup::new(4, 16).await;
    let artifact = s
        .lab
        .upload(&s.admin, &ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .await
        .unwrap();
    let campaign = aloft_e2e::create_rollout(
        &s.admin,
        artifact,
        aloft_orchestrator::store::Target::All,
        canary_then_soak(),
    )
    .await
    .unwrap();
    let summary = wait_campaign(&s.admin, &campaign, LIMIT, |c| {
        c.waves.first().is_some_and(|w| w.counts.succeeded == 1)
    })
    .await
    .unwrap();
    let canary = status(&s.admin, &campaign, true)
        .await
        .unwrap()
        .devices
        .into_iter()
        .find(|d| d.state == DeviceState::Succeeded)
        .unwrap()
        .device;
    let id = campaign.as_str();
    let cell = |k: &str, v: &str| format!("data-c=\"{id}\" data-k=\"{k}\">{v}<");

    let browser = Browser {
        profile: s.tmp.path().join("chromium"),
        pin: spki_pin(&s.server_cert()),
    };
    // The link `aloft console token --url` prints: the token becomes a cookie and the browser
    // lands on the overview.
    let token = s.running.console_token(600).unwrap();
    // (Its script may already have marked the tab live, `● Overview · …`, when the DOM is read.)
    let overview = browser
        .dom(&format!("{}/login?token={token}", s.base()))
        .await;
    assert!(
        overview.contains("Overview · Aloft console</title>"),
        "{overview}"
    );
    assert!(overview.contains("read-only · viewer token"), "{overview}");
    assert!(
        overview.contains("Devices registered: <b id=\"registered\">4</b>"),
        "{overview}"
    );
    assert!(
        overview.contains(&format!("<a href=\"/campaigns/{id}\">{id}</a>")),
        "{overview}"
    );
    assert!(overview.contains(&cell("status", "active")), "{overview}");
    assert!(overview.contains(&cell("n:succeeded", "1")), "{overview}");
    assert!(overview.contains(&cell("n:idle", "3")), "{overview}");
    assert!(!overview.contains(&token), "the page shows the token");

    // The campaign: each wave's counts; the second wave waits for the canary's soak.
    let page = browser.dom(&format!("{}/campaigns/{id}", s.base())).await;
    assert_eq!(summary.waves.len(), 2);
    assert!(page.contains(&cell("w:0:size", "1")), "{page}");
    assert!(page.contains(&cell("w:0:succeeded", "1")), "{page}");
    assert!(page.contains(&cell("w:1:size", "3")), "{page}");
    assert!(page.contains(&cell("w:1:opened", "not yet")), "{page}");
    let shot = s.tmp.path().join("campaign.png");
    browser
        .screenshot(&format!("{}/campaigns/{id}", s.base()), &shot)
        .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    if let Some(keep) = std::env::var_os("ALOFT_CONSOLE_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }

    // The canary's history, from the store: every transition, newest first.
    let page = browser
        .dom(&format!("{}/devices/{}", s.base(), canary.as_str()))
        .await;
    let rows: Vec<&str> = page.split("<tr>").skip(2).collect();
    let to: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.split("class=\"state-").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        to,
        [
            "succeeded",
            "verifying",
            "rebooting",
            "installing",
            "downloaded",
            "downloading",
            "notified",
            "idle"
        ],
        "{page}"
    );
    assert!(page.contains("(joined)"), "{page}");
    assert!(page.contains("<dt>running</dt><dd>2.0.0</dd>"), "{page}");
    // The device list links every device.
    let list = browser.dom(&format!("{}/devices", s.base())).await;
    for d in &s.devices {
        assert!(
            list.contains(&format!("href=\"/devices/{}\"", d.id)),
            "{list}"
        );
    }

    // Live, in the browser: the campaign's page stays open; its script marks the tab live with
    // the campaign's status from the event stream, and follows the pause below without a reload.
    let page_url = format!("{}/campaigns/{id}", s.base());
    let (open, port) = browser.open(&page_url).await;
    let live_title =
        |status: &str| format!("\u{25cf} {status} \u{b7} Campaign {id} \u{b7} Aloft console");
    browser
        .wait_title(port, &page_url, |t| t == live_title("active"))
        .await;

    // Live, on the wire: the stream starts with the board as it is, then follows a change (an
    // operator pauses the campaign).
    let mut child = tokio::process::Command::new("curl")
        .args(["-sSN", "--cacert"])
        .arg(s.ca())
        .args(bearer(&token))
        .arg(format!("{}/events", s.base()))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let campaign_in = |u: &Value| -> Value {
        u["campaigns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["campaign"] == id)
            .cloned()
            .unwrap()
    };
    let first = next_update(&mut lines).await;
    assert_eq!(campaign_in(&first)["status"], "active");
    assert_eq!(campaign_in(&first)["counts"]["succeeded"], 1);
    assert_eq!(first["registered"], 4);
    let _: Value = s
        .admin
        .call(AdminBody::CampaignPause {
            campaign: CampaignId::new(id).unwrap(),
        })
        .await
        .unwrap();
    loop {
        let u = next_update(&mut lines).await;
        if campaign_in(&u)["status"] == "paused" {
            break;
        }
    }
    drop(child);
    browser
        .wait_title(port, &page_url, |t| t == live_title("paused"))
        .await;
    drop(open);
    // And a reload shows it.
    let overview = browser.dom(&format!("{}/", s.base())).await;
    assert!(overview.contains(&cell("status", "paused")), "{overview}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_admits_operators_and_viewer_tokens_only_and_writes_nothing() {
    let s = Setup::new(1, 1).await;
    let base = s.base();
    let token = s.running.console_token(600).unwrap();
    let tls = tls_args(&s);
    let with = |extra: Vec<String>, path: &str| {
        let mut a = tls.clone();
        a.extend(extra);
        a.push(format!("{base}{path}"));
        a
    };

    // Nobody: refused, and told how to get in; the headers hold on refusals too.
    let r = curl(&with(vec![], "/")).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("aloft console token"), "{}", r.body);
    assert!(r
        .headers
        .contains("content-security-policy: default-src 'none'; script-src 'self'"));
    // A token from another orchestrator (another master key), a forged one, an altered one.
    let foreign =
        aloft_orchestrator::console::TokenKey::derive(&aloft_vault::MasterKey::generate().unwrap())
            .mint(aloft_e2e::now_secs(), 600)
            .unwrap();
    let altered = {
        let mut t = token.clone().into_bytes();
        let last = t.len() - 1;
        t[last] = if t[last] == b'0' { b'1' } else { b'0' };
        String::from_utf8(t).unwrap()
    };
    for bad in [foreign.as_str(), "v1.99999999999.0.0", altered.as_str()] {
        let r = curl(&with(bearer(bad), "/")).await;
        assert_eq!(r.status, 401, "{bad}");
        let r = curl(&with(vec![], &format!("/login?token={bad}"))).await;
        assert_eq!(r.status, 401, "{bad}");
        assert!(!r.headers.contains("set-cookie"), "{bad}");
    }
    // The token: the page, with the security headers.
    let r = curl(&with(bearer(&token), "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for h in [
        "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'",
        "frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "cache-control: no-store",
    ] {
        assert!(r.headers.contains(h), "{h} missing: {}", r.headers);
    }
    // `/login` trades it for a cookie the page's scripts cannot read, sent only over HTTPS to
    // this site, gone when the token expires.
    let r = curl(&with(vec![], &format!("/login?token={token}"))).await;
    assert_eq!(r.status, 303);
    let cookie = r
        .headers
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap()
        .to_owned();
    for flag in [
        "httponly",
        "secure",
        "samesite=strict",
        "path=/",
        "max-age=",
    ] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let r = curl(&with(
        vec!["-H".into(), format!("Cookie: aloft_console={token}")],
        "/devices",
    ))
    .await;
    assert_eq!(r.status, 200);

    // An operator's certificate opens it without a token, whatever the operator's role.
    let profile = &s.lab.profile_dir;
    let operator = vec![
        "--cert".into(),
        profile.join("operator.crt").display().to_string(),
        "--key".into(),
        profile.join("operator.key").display().to_string(),
    ];
    let r = curl(&with(operator.clone(), "/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("read-only · operator "), "{}", r.body);
    // A device's certificate (valid, from the fleet CA) is not an operator's: refused, even
    // with a token beside it.
    let dir = s.tmp.path().join("device-cert");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("d.crt"), &s.devices[0].cert_pem).unwrap();
    std::fs::write(dir.join("d.key"), &s.devices[0].key_pem).unwrap();
    let mut device = vec![
        "--cert".into(),
        dir.join("d.crt").display().to_string(),
        "--key".into(),
        dir.join("d.key").display().to_string(),
    ];
    device.extend(bearer(&token));
    let r = curl(&with(device, "/")).await;
    assert_eq!(r.status, 403);

    // Read-only: no method but GET does anything, anywhere.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/events", "/devices/dev-00000", "/login"] {
            let mut a = bearer(&token);
            a.extend(["-X".to_owned(), method.to_owned()]);
            let r = curl(&with(a, path)).await;
            assert_eq!(r.status, 405, "{method} {path}");
        }
    }
    let r = curl(&with(bearer(&token), "/admin")).await;
    assert_eq!(r.status, 404);
    // No request bodies, not even on a GET.
    let mut a = bearer(&token);
    a.extend([
        "-X".to_owned(),
        "GET".to_owned(),
        "--data".to_owned(),
        "x".repeat(100),
    ]);
    let r = curl(&with(a, "/")).await;
    assert_eq!(r.status, 413);
    assert!(r.headers.contains("connection: close"), "{}", r.headers);

    // Live streams are bounded (this console allows one at a time).
    let mut first = tokio::process::Command::new("curl")
        .args(["-sSN", "--cacert"])
        .arg(s.ca())
        .args(bearer(&token))
        .arg(format!("{base}/events"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    tokio::time::timeout(LIMIT, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with("data:") {
                return;
            }
        }
        panic!("the stream ended");
    })
    .await
    .unwrap();
    let r = curl(&with(bearer(&token), "/events")).await;
    assert_eq!(r.status, 503);
    drop(first);

    let m = &s.running.metrics;
    assert!(m.console_refused_count("unauthenticated") >= 1);
    assert!(m.console_refused_count("token_bad_signature") >= 2);
    assert!(m.console_refused_count("certificate_role") >= 1);
    assert!(m.console_refused_count("streams_full") >= 1);
    assert!(m.console_refused_count("body") >= 1);
}
