//! The device's HTTPS client for untrusted download origins (protocol 1.5): the I/O shell beside
//! the agent. The agent decides which chunk to fetch from where
//! ([`UpdateAgent::take_origin_fetches`](crate::update::UpdateAgent::take_origin_fetches)); this
//! fetches each with one `GET` over HTTP/1.1 (hyper) on TLS (tokio-rustls), and hands back the
//! body or why there is none; the agent checks the bytes against the signed manifest.
//!
//! The origin's TLS is checked against the device's own origin trust anchors
//! ([`OriginClientConfig::new`]), provisioned like its fleet CA; it keeps the transfer private
//! and says nothing about integrity. Everything per device is bounded: fetches in flight
//! (`max_in_flight`, and the agent's window), kept-alive connections (as many), the body (the
//! chunk's exact length; a longer Content-Length or body is refused), and the time for each
//! fetch. Redirects are not followed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_proto::ArtifactId;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::debug;

use crate::update::{OriginFailure, OriginFetch};

/// How a device reaches origins.
#[derive(Clone)]
pub struct OriginClientConfig {
    /// Trust anchors for the origin's TLS certificate (not the fleet's mTLS).
    pub tls: Arc<rustls::ClientConfig>,
    /// Longest time one fetch (connect, TLS, request, whole body) may take.
    pub timeout: Duration,
    /// Fetches in flight at once, and connections kept open, at most.
    pub max_in_flight: usize,
}

impl OriginClientConfig {
    /// A client trusting the CA certificates in `anchors_pem` for origins' TLS.
    pub fn new(anchors_pem: &str) -> Result<Self, aloft_certs::PkiError> {
        let tls = aloft_certs::tls::origin_client_config(anchors_pem)?;
        Ok(OriginClientConfig {
            tls: Arc::new(tls),
            timeout: Duration::from_secs(20),
            max_in_flight: 4,
        })
    }
}

/// One fetch's outcome.
#[derive(Debug)]
pub struct Fetched {
    pub artifact: ArtifactId,
    pub index: u32,
    pub body: Result<Bytes, OriginFailure>,
}

/// An open HTTP/1.1 connection to one origin; its driver task ends when this is dropped.
struct Conn {
    authority: String,
    sender: SendRequest<Empty<Bytes>>,
    driver: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Fetches chunks from origins for one device. Dropping it stops every fetch and connection.
pub struct OriginFetcher {
    cfg: OriginClientConfig,
    idle: Arc<Mutex<Vec<Conn>>>,
    permits: Arc<Semaphore>,
    tasks: JoinSet<()>,
    tx: mpsc::Sender<Fetched>,
}

impl OriginFetcher {
    /// A fetcher and the receiver of its outcomes (one for every fetch started).
    pub fn new(cfg: OriginClientConfig) -> (Self, mpsc::Receiver<Fetched>) {
        let n = cfg.max_in_flight.max(1);
        let (tx, rx) = mpsc::channel(n);
        let f = OriginFetcher {
            permits: Arc::new(Semaphore::new(n)),
            cfg,
            idle: Arc::new(Mutex::new(Vec::new())),
            tasks: JoinSet::new(),
            tx,
        };
        (f, rx)
    }

    /// Starts fetching `order`; its outcome arrives on the receiver.
    pub fn start(&mut self, order: OriginFetch) {
        // Finished tasks are reaped here, so the set holds only those still running.
        while self.tasks.try_join_next().is_some() {}
        let cfg = self.cfg.clone();
        let idle = self.idle.clone();
        let permits = self.permits.clone();
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let body = match tokio::time::timeout(cfg.timeout, fetch(&cfg, &idle, &order)).await {
                Ok(r) => r,
                Err(_) => Err(OriginFailure::Timeout),
            };
            if let Err(why) = &body {
                debug!(url = %order.url, ?why, "origin fetch failed");
            }
            let _ = tx
                .send(Fetched {
                    artifact: order.artifact,
                    index: order.index,
                    body,
                })
                .await;
        });
    }
}

/// Waits for the next outcome of `rx`, or forever if there is no fetcher.
pub async fn next(rx: &mut Option<mpsc::Receiver<Fetched>>) -> Option<Fetched> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// One `GET` of `order.url`, on a kept-alive connection when one is idle.
async fn fetch(
    cfg: &OriginClientConfig,
    idle: &Mutex<Vec<Conn>>,
    order: &OriginFetch,
) -> Result<Bytes, OriginFailure> {
    let uri: hyper::Uri = order.url.parse().map_err(|_| OriginFailure::Connect)?;
    if uri.scheme_str() != Some("https") {
        return Err(OriginFailure::Connect);
    }
    let host = uri.host().ok_or(OriginFailure::Connect)?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let authority = format!("{host}:{port}");
    let reused = {
        let mut pool = idle.lock().map_err(|_| OriginFailure::Connect)?;
        let at = pool
            .iter()
            .position(|c| c.authority == authority && !c.sender.is_closed());
        at.map(|i| pool.swap_remove(i))
    };
    let mut conn = match reused {
        Some(c) => c,
        None => connect(cfg, &host, port, authority).await?,
    };
    conn.sender
        .ready()
        .await
        .map_err(|_| OriginFailure::Connect)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::get(path)
        .header(
            hyper::header::HOST,
            uri.authority().map_or("", |a| a.as_str()),
        )
        .header(hyper::header::USER_AGENT, "aloft-device")
        .body(Empty::<Bytes>::new())
        .map_err(|_| OriginFailure::Connect)?;
    let resp = conn
        .sender
        .send_request(req)
        .await
        .map_err(|_| OriginFailure::Connect)?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(OriginFailure::Redirect);
    }
    if status != hyper::StatusCode::OK {
        return Err(OriginFailure::Status);
    }
    let declared = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > order.len as u64) {
        return Err(OriginFailure::Oversize);
    }
    let body = Limited::new(resp.into_body(), order.len)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                OriginFailure::Oversize
            } else {
                OriginFailure::Connect
            }
        })?
        .to_bytes();
    // The whole response was read: the connection may carry the next request.
    if let Ok(mut pool) = idle.lock() {
        if pool.len() < cfg.max_in_flight.max(1) {
            pool.push(conn);
        }
    }
    Ok(body)
}

/// A new TLS connection to `host:port`, checked against the origin trust anchors.
async fn connect(
    cfg: &OriginClientConfig,
    host: &str,
    port: u16,
    authority: String,
) -> Result<Conn, OriginFailure> {
    // A bracketed IPv6 literal in a URL names the address without its brackets.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
        .map_err(|_| OriginFailure::Connect)?;
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|_| OriginFailure::Connect)?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(cfg.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|_| OriginFailure::Connect)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|_| OriginFailure::Connect)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    })
    .abort_handle();
    Ok(Conn {
        authority,
        sender,
        driver,
    })
}
