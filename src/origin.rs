//! A real nginx (Debian's package) serving a release export over HTTPS, as an untrusted download
//! origin (protocol 1.5) for the demo (`aloft-demo --origin nginx`) and the end-to-end tests.
//! Its configuration, logs and temporary files live in a directory of its own; it listens on
//! loopback on a port chosen at run time, and is stopped when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running nginx serving `root` over HTTPS on loopback.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in `dir` (created) serving the directory `root`, presenting `cert_pem` and
    /// `key_pem`; returns once it accepts connections.
    pub fn start(dir: &Path, root: &Path, cert_pem: &str, key_pem: &str) -> Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let root = root.canonicalize()?;
        std::fs::write(dir.join("cert.pem"), cert_pem)?;
        std::fs::write(dir.join("key.pem"), key_pem)?;
        // A free port now; nginx binds it a moment later (loopback, so nothing else races us
        // but another test, whose bind would fail loudly).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // Run as root (as in CI), nginx would hand its workers to `nobody`, who cannot read a
        // temporary directory; one process that keeps its user avoids that.
        let user = if is_root() { "user root;\n" } else { "" };
        let d = dir.display();
        let conf = format!(
            "{user}daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  default_type application/octet-stream;\n  access_log {d}/access.log;\n\
             client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n\
             fastcgi_temp_path {d}/tmp-fastcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n\
             scgi_temp_path {d}/tmp-scgi;\n  keepalive_requests 100000;\n\
             server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {d}/cert.pem;\n\
             ssl_certificate_key {d}/key.pem;\n    root {root};\n    location / {{ }}\n  }}\n}}\n",
            root = root.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nginx (apt-get install nginx)")?;
        let mut nginx = Nginx { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                let err = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}): {err}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {addr} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// The origin URL for a campaign: `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Requests nginx logged (one line each).
    pub fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.join("access.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // One process (no master): killing it leaves nothing behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian puts nginx in /usr/sbin, which a non-root PATH may lack.
fn nginx_binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/nginx");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("nginx")
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}
