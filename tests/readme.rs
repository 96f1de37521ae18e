//! README.md's "Using it for real", run as written: every command line of the section's `sh`
//! block, in order, with the real `aloft` and `device-sim` binaries of this workspace, so the
//! README cannot drift from them. The block is read from README.md (compiled in), and each line
//! is changed only the way a reader on this machine would change it:
//! - `/var/lib/aloft` and `~` (HOME) are in a temporary directory, which is also the working
//!   directory; the binaries are on PATH; every line runs through `sh -c`;
//! - `<X-pub>` is the public key `keygen --out X.key` printed, `<campaign-id>` the id the last
//!   `campaign create` or `campaign rollback` printed;
//! - the fleet has 5 devices instead of 100, and each `--image` is a small generated file;
//! - `aloft serve` gets free ports (`--listen`, `--metrics-listen` on port 0), which later lines
//!   reach through `ALOFT_SERVER` and in place of `:8883`;
//! - the passphrase is in `ALOFT_UNLOCK`, and `backup restore` gets the recovery key `backup
//!   create` printed instead;
//! - `aloft serve` and `device-sim run` run in the background (each until the next `serve` or the
//!   end), after `device-sim run` the test waits until every device registered, and the
//!   orchestrator is stopped with SIGTERM before a backup ("orchestrator stopped").
//!
//! A command that exits non-zero, or times out, fails the test; so do campaigns followed with
//! `--watch` that end with any device not `succeeded`, and any ERROR line `aloft serve` logs
//! (every start, connect, disconnect and stop of the walkthrough is a normal one).
//!
//! The binaries are the ones `cargo nextest run --workspace` builds beside this test (the
//! orchestrator's and device-sim's own integration tests make cargo build them). Run alone
//! (`-p aloft-e2e`), this test refuses binaries older than their sources.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::SystemTime;

use aloft_orchestrator::admin::client::AdminClient;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::LIMIT;

const README: &str = include_str!("../README.md");

/// The section whose `sh` blocks are run.
const SECTION: &str = "## Using it for real";

/// The section run against a PostgreSQL cluster of the test's own.
const POSTGRES_SECTION: &str = "## The store in PostgreSQL";

/// What the PostgreSQL section calls its database server, replaced by the test's cluster.
const PG_HOST: &str = "db.example.com";
const PG_PORT: &str = "5432";

/// Devices enrolled in place of the README's 100: enough for every command, few enough for CI.
const DEVICES: usize = 5;

/// Bytes of each generated firmware image (four 16 KiB chunks).
const IMAGE_BYTES: usize = 64 * 1024;

/// What the reader types at every passphrase prompt (data directory and key files).
const PASSPHRASE: &str = "readme walkthrough passphrase";

/// The command lines of `section`'s `sh` blocks: `\`-continued lines joined, comments and blank
/// lines dropped.
fn command_lines(readme: &str, section: &str) -> Vec<String> {
    let start = readme
        .find(section)
        .unwrap_or_else(|| panic!("README.md has no {section:?} section"));
    let body = &readme[start + section.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut lines = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for raw in body.lines() {
        let trimmed = raw.trim();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = strip_comment(raw).trim();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head.trim());
            pending.push(' ');
            continue;
        }
        pending.push_str(code);
        let line = std::mem::take(&mut pending);
        if !line.trim().is_empty() {
            lines.push(line.trim().to_owned());
        }
    }
    assert!(pending.is_empty(), "a `\\` continuation ends the block");
    lines
}

/// The line without a shell comment (a `#` that starts a word).
fn strip_comment(line: &str) -> &str {
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_blank {
            return &line[..i];
        }
        prev_blank = c.is_whitespace();
    }
    line
}

#[test]
fn the_walkthrough_is_read_with_continuations_joined_and_comments_dropped() {
    let readme = "# x\n## Using it for real\n\n```sh\n# a comment\naloft a --b c \\\n    --d e   # why\n\naloft f\n```\n\n```text\nnot run\n```\n## Next\n```sh\nnot run\n```\n";
    assert_eq!(
        command_lines(readme, SECTION),
        vec!["aloft a --b c --d e", "aloft f"]
    );
}

/// Where cargo put this workspace's binaries: this test runs as `target/<profile>/deps/e2e-*`.
/// Each binary must be newer than every source it is built from, else it may not be what the
/// sources say (a run of this package alone rebuilds the libraries, not the binaries).
pub(crate) fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = ["proto/src", "certs/src", "vault/src", "Cargo.lock"];
    let aloft = [
        "orchestrator/src",
        "orchestrator/broker/src",
        "orchestrator/aloft.example.toml",
    ];
    for (bin, own) in [
        ("aloft", &aloft[..]),
        ("device-sim", &["device-sim/src"][..]),
    ] {
        let path = dir.join(bin);
        let built = mtime(&path).unwrap_or_else(|| {
            panic!(
                "{} is missing: run the whole suite (`cargo nextest run --workspace`), or \
                 `cargo build --workspace --bins` first",
                path.display()
            )
        });
        for source in shared.iter().chain(own) {
            let newest = newest_mtime(&workspace.join(source));
            assert!(
                newest <= built,
                "{} is older than {source}: run the whole suite (`cargo nextest run \
                 --workspace`), or `cargo build --workspace --bins` first",
                path.display()
            );
        }
    }
    dir
}

fn mtime(path: &Path) -> Option<SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file, or of any file under a directory.
fn newest_mtime(path: &Path) -> SystemTime {
    let own = mtime(path).unwrap_or(SystemTime::UNIX_EPOCH);
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| newest_mtime(&e.path()))
            .fold(own, SystemTime::max),
        Err(_) => own,
    }
}

/// A command running in the background: `aloft serve` or `device-sim run`.
struct Background {
    line: String,
    child: Child,
    log: PathBuf,
}

impl Background {
    /// Sends `signal` (`TERM`, `INT`) and waits for the process to end.
    async fn stop(mut self, signal: &str) -> ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} failed for `{}`", self.line);
        tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("`{}` did not stop on SIG{signal}", self.line))
            .unwrap()
    }
}

/// The walkthrough's state: the reader's directories and what the commands printed so far.
struct Reader {
    _tmp: TempDir,
    /// The working directory, and where `/var/lib/aloft` and HOME are.
    work: PathBuf,
    path_var: String,
    /// Placeholder (without `<>`) → value.
    vars: HashMap<String, String>,
    /// The orchestrator's mTLS port once `aloft serve` printed it.
    port: Option<u16>,
    /// The recovery key `aloft backup create` printed.
    backup_key: Option<String>,
    serve: Option<Background>,
    sim: Option<Background>,
    /// Every command run so far and its outcome, shown when one fails.
    transcript: String,
    /// The test's PostgreSQL server's port, in place of the README's `db.example.com:5432`.
    pg_port: Option<u16>,
}

impl Reader {
    fn new() -> Reader {
        Reader::with_postgres(None)
    }

    /// A reader whose `db.example.com:5432` is the cluster on `pg_port`, with PostgreSQL's
    /// programs (`createdb`) on PATH.
    fn with_postgres(pg_port: Option<u16>) -> Reader {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().to_owned();
        std::fs::create_dir_all(work.join("home")).unwrap();
        let mut path_var = format!(
            "{}:{}",
            binary_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        if pg_port.is_some() {
            let bin = aloft_orchestrator::store::pg_cluster::find_bin_dir().unwrap();
            path_var = format!("{}:{path_var}", bin.display());
        }
        Reader {
            _tmp: tmp,
            work,
            path_var,
            vars: HashMap::new(),
            port: None,
            backup_key: None,
            serve: None,
            sim: None,
            transcript: String::new(),
            pg_port,
        }
    }

    fn profile(&self) -> PathBuf {
        self.work.join("home/.aloft/alice")
    }

    /// The line as the reader types it here.
    fn substitute(&self, line: &str) -> String {
        let mut out = line
            .replace(
                "/var/lib/aloft",
                &self.work.join("var/lib/aloft").display().to_string(),
            )
            .replace("--count 100", &format!("--count {DEVICES}"));
        if let Some(port) = self.pg_port {
            out = out
                .replace(PG_HOST, "127.0.0.1")
                .replace(PG_PORT, &port.to_string());
        }
        if let Some(port) = self.port {
            for host in ["localhost", "127.0.0.1"] {
                out = out.replace(&format!("{host}:8883"), &format!("{host}:{port}"));
            }
        }
        while let Some(open) = out.find('<') {
            let close = open
                + out[open..]
                    .find('>')
                    .unwrap_or_else(|| panic!("unclosed placeholder in `{line}`"));
            let name = &out[open + 1..close];
            let value = self.vars.get(name).unwrap_or_else(|| {
                panic!("`{line}`: no earlier command printed a value for <{name}>")
            });
            out = format!("{}{value}{}", &out[..open], &out[close + 1..]);
        }
        out
    }

    fn command(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(line)
            .current_dir(&self.work)
            .env("PATH", &self.path_var)
            .env("HOME", self.work.join("home"))
            .env("ALOFT_UNLOCK", PASSPHRASE)
            .env_remove("ALOFT_SERVER")
            .env_remove("ALOFT_PROFILE")
            .env_remove("ALOFT_DATA_DIR")
            .env_remove("ALOFT_STORE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(port) = self.port {
            cmd.env("ALOFT_SERVER", format!("127.0.0.1:{port}"));
        }
        cmd
    }

    /// Fails the test with everything run so far and the background processes' logs.
    fn fail(&self, what: &str) -> ! {
        let mut logs = String::new();
        for bg in self.serve.iter().chain(&self.sim) {
            let text = std::fs::read_to_string(&bg.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            logs.push_str(&format!("\n--- last lines of `{}` ---\n", bg.line));
            for l in tail.iter().rev() {
                logs.push_str(l);
                logs.push('\n');
            }
        }
        panic!(
            "{what}\n\n--- commands so far ---\n{}{logs}",
            self.transcript
        );
    }

    async fn run(&mut self, readme_line: &str) {
        let line = self.substitute(readme_line);
        self.transcript.push_str(&format!("$ {line}\n"));
        let words: Vec<&str> = readme_line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "--image") {
            self.write_image(words.get(i + 1).copied().unwrap_or("fw.bin"));
        }
        match words.as_slice() {
            ["aloft", "serve", ..] => return self.start_serve(&line).await,
            ["device-sim", "run", ..] => return self.start_fleet(&line).await,
            ["aloft", "backup", ..] => {
                if let Some(serve) = self.serve.take() {
                    let status = serve.stop("TERM").await;
                    if !status.success() {
                        self.fail(&format!("`aloft serve` ended {status} on SIGTERM"));
                    }
                }
            }
            _ => {}
        }
        let mut cmd = self.command(&line);
        if let ["aloft", "backup", "restore", ..] = words.as_slice() {
            let Some(key) = &self.backup_key else {
                self.fail("`backup restore` before `backup create` printed a recovery key");
            };
            cmd.env("ALOFT_UNLOCK", key);
        }
        let output = match tokio::time::timeout(LIMIT, cmd.output()).await {
            Ok(out) => out.unwrap(),
            Err(_) => self.fail(&format!("`{line}` did not finish within {LIMIT:?}")),
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        self.transcript.push_str(&stdout);
        if !output.status.success() {
            self.fail(&format!(
                "`{line}` failed ({}):\n{stdout}\n{stderr}",
                output.status
            ));
        }
        self.learn(&words, &line, &stdout, &stderr);
    }

    /// Keeps what later lines need from a command's output, and checks what it reports.
    fn learn(&mut self, words: &[&str], line: &str, stdout: &str, stderr: &str) {
        let dry_run = words.contains(&"--dry-run");
        match words {
            ["aloft", "trust" | "release", "keygen", ..] => {
                let out = flag(words, "--out");
                let name = out.strip_suffix(".key").unwrap_or(out);
                let public = stdout.trim();
                if public.len() != 64 || !public.bytes().all(|b| b.is_ascii_hexdigit()) {
                    self.fail(&format!("`{line}` printed {stdout:?}, not one public key"));
                }
                self.vars.insert(format!("{name}-pub"), public.to_owned());
            }
            ["aloft", "campaign", "create" | "rollback", ..] if !dry_run => {
                let reply: serde_json::Value = serde_json::from_str(stdout)
                    .unwrap_or_else(|e| self.fail(&format!("`{line}` printed no JSON: {e}")));
                let Some(id) = reply["campaign"].as_str() else {
                    self.fail(&format!("`{line}` printed no campaign id"));
                };
                self.vars.insert("campaign-id".into(), id.to_owned());
            }
            ["aloft", "campaign", "status", ..] if words.contains(&"--watch") => {
                // "  N devices: succeeded=N", and nothing else counted.
                let counts = stdout
                    .lines()
                    .map(str::trim)
                    .find(|l| l.contains(" devices: "))
                    .unwrap_or_else(|| self.fail(&format!("`{line}` printed no counts")));
                let total = counts.split(' ').next().unwrap_or_default();
                if counts != format!("{total} devices: succeeded={total}") {
                    self.fail(&format!("`{line}`: not every device succeeded: {counts}"));
                }
            }
            ["aloft", "pki", "crl-push", ..] => {
                let reply: serde_json::Value = serde_json::from_str(stdout)
                    .unwrap_or_else(|e| self.fail(&format!("`{line}` printed no JSON: {e}")));
                if reply["devices_revoked"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
                {
                    self.fail(&format!("`{line}` revoked no device"));
                }
            }
            ["aloft", "backup", "create", ..] => {
                let key = stderr
                    .lines()
                    .find_map(|l| l.strip_prefix("recovery key: "))
                    .unwrap_or_else(|| self.fail(&format!("`{line}` showed no recovery key")));
                self.backup_key = Some(key.trim().to_owned());
            }
            _ => {}
        }
    }

    /// A firmware image for `--image name`, unless the reader already has one.
    fn write_image(&self, name: &str) {
        let path = self.work.join(name);
        if path.exists() {
            return;
        }
        let seed = name
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31) ^ u32::from(b));
        let image: Vec<u8> = (0..IMAGE_BYTES as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).to_le_bytes()[1])
            .collect();
        std::fs::write(path, image).unwrap();
    }

    /// Starts `aloft serve` on free ports and waits for the line naming them.
    async fn start_serve(&mut self, line: &str) {
        let line = format!("exec {line} --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0");
        // One log per start: the walkthrough serves again after its restore.
        let starts = std::fs::read_dir(&self.work)
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0);
        let log = self.work.join(format!("serve-{starts}.log"));
        let mut cmd = self.command(&line);
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(LIMIT, async {
            while let Ok(Some(l)) = stdout.next_line().await {
                if let Some(rest) = l.strip_prefix("aloft listening device=") {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await;
        let background = Background {
            line: line.clone(),
            child,
            log,
        };
        self.serve = Some(background);
        let Ok(Some(addr)) = ready else {
            self.fail(&format!("`{line}` never said where it listens"));
        };
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        self.port = Some(addr.port());
        // Nothing reads the rest; keep the pipe drained so the orchestrator never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    }

    /// Starts the simulated fleet and waits until the orchestrator registered every device.
    async fn start_fleet(&mut self, line: &str) {
        let log = self.work.join("device-sim.log");
        let mut cmd = self.command(&format!("exec {line}"));
        cmd.stdout(std::fs::File::create(self.work.join("device-sim.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        self.sim = Some(Background {
            line: line.to_owned(),
            child: cmd.spawn().unwrap(),
            log,
        });
        let Some(port) = self.port else {
            self.fail("`device-sim run` before `aloft serve`");
        };
        let server = format!("127.0.0.1:{port}");
        let admin = AdminClient::connect(&self.profile(), &server)
            .await
            .unwrap();
        if let Err(e) = aloft_e2e::wait_registered(&admin, DEVICES, LIMIT).await {
            self.fail(&format!("after `{line}`: {e}"));
        }
        admin.disconnect().await;
    }
}

/// The value after `name` in a command's words.
fn flag<'a>(words: &[&'a str], name: &str) -> &'a str {
    let i = words.iter().position(|w| *w == name);
    i.and_then(|i| words.get(i + 1))
        .copied()
        .unwrap_or_else(|| panic!("{words:?} has no {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_readme_walkthrough_runs_as_written() {
    let lines = command_lines(README, SECTION);
    assert!(lines.len() > 30, "only {} commands found", lines.len());
    let mut reader = Reader::new();
    for line in &lines {
        let started = std::time::Instant::now();
        reader.run(line).await;
        eprintln!("{:>6} ms  {line}", started.elapsed().as_millis());
    }
    if let Some(sim) = reader.sim.take() {
        sim.stop("INT").await;
    }
    if let Some(serve) = reader.serve.take() {
        let status = serve.stop("TERM").await;
        assert!(status.success(), "`aloft serve` ended {status} on SIGTERM");
    }
    // Clean starts, operators and devices coming and going, a revoked device's session ended and
    // clean stops are all normal: none of it is an ERROR in `aloft serve`'s log.
    let mut logs = 0;
    for entry in std::fs::read_dir(&reader.work).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("serve-") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("INFO"), "{name} holds no log at all");
        logs += 1;
        let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(
            errors.is_empty(),
            "{name} has ERROR lines:\n{}",
            errors.join("\n")
        );
    }
    assert_eq!(
        logs, 2,
        "the walkthrough serves twice, before and after its restore"
    );
}

/// The PostgreSQL section, run as written against a throwaway cluster: init into a database,
/// serve from it, back it up and restore it, serve again; no ERROR in either serve's log, and
/// no sled store in the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgresql_walkthrough_runs_as_written() {
    use aloft_orchestrator::store::pg_cluster::TempCluster;
    let lines = command_lines(README, POSTGRES_SECTION);
    assert!(lines.len() > 10, "only {} commands found", lines.len());
    let cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .unwrap()
        .unwrap();
    let mut reader = Reader::with_postgres(Some(cluster.port()));
    for line in &lines {
        reader.run(line).await;
    }
    if let Some(serve) = reader.serve.take() {
        let status = serve.stop("TERM").await;
        assert!(status.success(), "`aloft serve` ended {status} on SIGTERM");
    }
    assert!(!reader.work.join("var/lib/aloft/store").exists());
    let mut logs = 0;
    for entry in std::fs::read_dir(&reader.work).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("serve-") && name.ends_with(".log") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("ERROR"), "{name} has ERROR lines:\n{text}");
            logs += 1;
        }
    }
    assert_eq!(
        logs, 2,
        "the section serves twice, before and after its restore"
    );
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// The block stays runnable: each line is one command (no `a|b` alternatives to choose from).
#[test]
fn every_line_of_the_walkthrough_is_one_command() {
    for line in command_lines(README, SECTION) {
        assert!(
            !line.contains('|') && !line.contains(';'),
            "`{line}` is not one command a reader can paste"
        );
        assert!(
            line.starts_with("aloft ")
                || line.starts_with("device-sim ")
                || line.starts_with("cp "),
            "`{line}` runs something this test does not build"
        );
    }
}
