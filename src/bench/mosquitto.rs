//! Mosquitto 2 from the distribution's packages as a child process on a free loopback port: the
//! one launcher of the demo, the bench and the tests. [`Mosquitto::start`] writes a bare
//! configuration for the side-by-side connect storm (TLS 1.3, a client certificate from the
//! lab's fleet CA, the CN as user name); [`Mosquitto::launch`] runs a configuration written by
//! `aloft broker-config mosquitto` (`Lab::start_mosquitto`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aloft_certs::{FleetCa, Validity};
use anyhow::{bail, Context, Result};

/// A running Mosquitto, killed when dropped.
pub struct Mosquitto {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

/// Where Debian installs the broker.
const CANDIDATES: &[&str] = &["/usr/sbin/mosquitto", "/usr/bin/mosquitto"];

fn binary() -> Result<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("mosquitto is not installed (apt-get install -y mosquitto)")
}

impl Mosquitto {
    /// Writes a configuration with a server certificate from `ca` into `dir` and starts the
    /// broker; returns once its port accepts connections.
    pub async fn start(dir: &Path, ca: &FleetCa) -> Result<Mosquitto> {
        std::fs::create_dir_all(dir)?;
        let server = ca.issue_server(
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            Validity::days(1),
        )?;
        let file = |name: &str, text: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let cafile = file("ca.crt", ca.cert_pem())?;
        let certfile = file("server.crt", &server.cert_pem)?;
        let keyfile = file("server.key", &server.key_pem)?;
        // A free port: bound and released at once; Mosquitto takes it right after.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = format!(
            "per_listener_settings false\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\n\
             max_connections -1\n\
             listener {port} 127.0.0.1\n\
             tls_version tlsv1.3\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             allow_anonymous false\n",
            cafile.display(),
            certfile.display(),
            keyfile.display()
        );
        let conf_path = file("mosquitto.conf", &conf)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Mosquitto::launch(&conf_path, dir, addr).await
    }

    /// A free loopback port: bound and released at once, for a configuration to name.
    pub fn free_port() -> Result<u16> {
        Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    /// Starts Mosquitto with `conf` (its log in `dir/mosquitto.log`) and returns once `addr`
    /// accepts connections; a configuration Mosquitto refuses is an error with its log.
    pub async fn launch(conf: &Path, dir: &Path, addr: SocketAddr) -> Result<Mosquitto> {
        let exe = binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("mosquitto.log"))?;
        let child = Command::new(&exe)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let pid = child.id();
        let mut m = Mosquitto { child, addr, pid };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(m);
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
                bail!("mosquitto exited ({status}): {}", log.trim());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("mosquitto did not listen on {addr} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The broker's version line (`mosquitto -h` prints it first).
    pub fn version() -> Option<String> {
        let out = Command::new(binary().ok()?).arg("-h").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().next().map(|l| l.trim().to_owned())
    }
}

impl Mosquitto {
    /// SIGKILL: the broker gets no chance to save anything.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
