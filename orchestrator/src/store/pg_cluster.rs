//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary
//! directory, `postgres` on a free loopback port, stopped and removed on drop. Debian's
//! packages install the binaries in `/usr/lib/postgresql/<version>/bin` (not on `PATH`);
//! `ALOFT_PG_BIN` names another directory. PostgreSQL refuses to run as root, so under root
//! the cluster runs as `nobody`. Every wait has a deadline.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start or a stop may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// The superuser `initdb` creates; connections need no password (trust, loopback only).
pub const USER: &str = "aloft";

type Error = std::io::Error;

fn err(msg: impl Into<String>) -> Error {
    Error::other(msg.into())
}

/// A running (or stopped) cluster of our own.
pub struct TempCluster {
    bin: PathBuf,
    /// Removed on drop.
    root: PathBuf,
    data: PathBuf,
    port: u16,
    /// Set when running as root: the cluster runs as this uid and gid.
    run_as: Option<(u32, u32)>,
    server: Option<Child>,
}

/// The directory of `initdb`, `postgres` and `pg_isready`: `ALOFT_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else wherever `PATH` finds `initdb`.
pub fn find_bin_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("ALOFT_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            return Ok(dir);
        }
    }
    Err(err(
        "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH): \
         apt-get install postgresql",
    ))
}

/// Whether this process runs as root (PostgreSQL then needs another user).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `nobody`'s uid and gid, from /etc/passwd.
fn nobody() -> Result<(u32, u32), Error> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"nobody"))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .ok_or_else(|| err("running as root and no user `nobody` to run PostgreSQL as"))
}

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl TempCluster {
    /// Initialises and starts a cluster; returns once it accepts connections.
    pub fn start() -> Result<Self, Error> {
        Self::start_with(&[])
    }

    /// [`TempCluster::start`] with `settings` (lines of `postgresql.conf`, such as an
    /// `include` of a file in deploy/) added to the cluster's configuration.
    pub fn start_with(settings: &[String]) -> Result<Self, Error> {
        let mut cluster = Self::empty()?;
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args([
                "-U",
                USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()?;
        if !out.status.success() {
            return Err(err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.configure(settings)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), started with `settings` added,
    /// connecting as `name` (its `cluster_name`, which is the name the primary's
    /// `synchronous_standby_names` lists).
    pub fn standby_of(
        primary: &TempCluster,
        name: &str,
        settings: &[String],
    ) -> Result<Self, Error> {
        let mut cluster = Self::empty()?;
        let out = cluster
            .command("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                USER,
            ])
            .arg("-D")
            .arg(&cluster.data)
            .args(["-R", "-X", "stream", "--no-sync"])
            .output()?;
        if !out.status.success() {
            return Err(err(format!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut all = vec![format!("cluster_name = '{name}'")];
        all.extend_from_slice(settings);
        cluster.configure(&all)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// A temporary directory for a cluster not yet created, and a free port.
    fn empty() -> Result<Self, Error> {
        let bin = find_bin_dir()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let root = std::env::temp_dir().join(format!("aloft-pg-{}-{stamp:x}", std::process::id()));
        std::fs::create_dir(&root)?;
        let run_as = if running_as_root() {
            Some(nobody()?)
        } else {
            None
        };
        let cluster = TempCluster {
            bin,
            data: root.join("data"),
            root,
            port: free_port()?,
            run_as,
            server: None,
        };
        if let Some((uid, gid)) = cluster.run_as {
            chown_tree(&cluster.root, uid, gid)?;
        }
        Ok(cluster)
    }

    /// Appends `settings` to the cluster's `postgresql.conf`.
    fn configure(&self, settings: &[String]) -> Result<(), Error> {
        if settings.is_empty() {
            return Ok(());
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))?;
        for line in settings {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(self.bin.join(program));
        c.current_dir(&self.root);
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Starts the server (again, after [`TempCluster::stop`]) on the same port and waits
    /// until it accepts connections.
    pub fn start_server(&mut self) -> Result<(), Error> {
        if self.server.is_some() {
            return Ok(());
        }
        let log = std::fs::File::create(self.root.join("server.log"))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.root.join("server.log"), Some(uid), Some(gid))?;
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&self.root)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.server = Some(child);
        let started = Instant::now();
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()?;
            if ready.success() {
                return Ok(());
            }
            if let Some(child) = self.server.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.server = None;
                    return Err(err(format!(
                        "postgres exited ({status}) before it was ready: {}",
                        self.log_tail()
                    )));
                }
            }
            if started.elapsed() > DEADLINE {
                return Err(err(format!(
                    "postgres was not ready within {DEADLINE:?}: {}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Stops the server (fast shutdown: open connections are cut), waiting until it exited.
    pub fn stop(&mut self) -> Result<(), Error> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "fast", "-w", "-t", "60"])
            .output()?;
        if !out.status.success() {
            // pg_ctl could not stop it: end the child ourselves rather than leak it.
            let _ = child.kill();
        }
        let started = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err("postgres did not stop in time; killed"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, Error> {
        let out = self
            .command("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                name,
            ])
            .output()?;
        if !out.status.success() {
            return Err(err(format!(
                "createdb {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(self.url(name))
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs one SQL command with `psql` in database `name` and returns its output.
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, Error> {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["-d", name, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()?;
        if !out.status.success() {
            return Err(err(format!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the throwaway PostgreSQL cluster");
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
