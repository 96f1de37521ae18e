//! The read-only web console (`[console]`, `aloft serve --console-listen`): fleet overview,
//! campaigns with their waves and members per state, each device's recent transitions, and
//! live updates while a campaign runs. Off unless configured.
//!
//! Shape: HTTPS (TLS 1.3, the orchestrator's server certificate) on its own listener; each
//! connection is served by hyper's HTTP/1.1 server connection with axum's router; no HTTP
//! parsing of our own. It reads only the board (summaries the engine publishes after each batch,
//! `crate::board`) and the store, on the blocking pool, a bounded page at a time: no request
//! reaches the engine's task. It has no route that writes, and the only method it answers is
//! GET.
//!
//! Who may look: an operator whose client certificate (fleet CA, not revoked) is presented in
//! the handshake, whatever their role; or anyone with a viewer token minted by `aloft console
//! token` (`token`), handed over once at `/login?token=…` and then kept in an `HttpOnly`,
//! `Secure`, `SameSite=Strict` cookie that expires with the token. Every other certificate
//! (devices, servers) and every request without either is refused and counted.
//!
//! Bounds: connections at once, TLS handshake and request-header time, header size, page sizes,
//! history length, live streams at once and each stream's life and rate, store reads at once.

mod pages;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aloft_proto::{CampaignId, DeviceId};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info};

use crate::board::Board;
use crate::metrics::Metrics;
use crate::store::Store;
pub use token::{TokenKey, DEFAULT_TTL_SECS, MAX_TTL_SECS};

/// The cookie that carries a viewer token after `/login`.
const COOKIE: &str = "aloft_console";
/// Devices per page of the device list.
pub const DEVICE_PAGE: usize = 50;
/// Older campaigns (not on the board) listed on the overview.
const OLDER_CAMPAIGNS: usize = 50;
/// Store reads at once (each on the blocking pool).
const STORE_READS: usize = 4;
/// A live stream ends after this long; the page's `EventSource` then reconnects.
const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// At most one live update per stream this often.
const STREAM_INTERVAL: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer, which bounds a request's head.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A connection is closed after this long, whatever it does (a live stream lasts less).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// `[console]` in the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleFile {
    /// Where the console listens (HTTPS); off unless set.
    pub listen: Option<SocketAddr>,
    /// Connections at once; beyond that new ones are closed at once.
    pub max_connections: usize,
    /// Live-update streams at once (each browser tab holds one).
    pub max_streams: usize,
}

impl Default for ConsoleFile {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: 64,
            max_streams: 16,
        }
    }
}

/// Everything the console reads, and its bounds.
pub struct Console {
    pub store: Store,
    pub board: Arc<Board>,
    pub metrics: Arc<Metrics>,
    pub key: TokenKey,
    pub tls: Arc<rustls::ServerConfig>,
    pub file: ConsoleFile,
}

struct Shared {
    store: Store,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    key: TokenKey,
    reads: Semaphore,
    streams: Arc<Semaphore>,
}

/// Who is looking, once authenticated.
#[derive(Debug, Clone)]
struct Viewer(String);

/// What the TLS handshake said about the client: a verified operator, another verified
/// certificate (refused), or none.
#[derive(Debug, Clone)]
enum PeerCert {
    None,
    Operator(String),
    Other,
}

fn now_ms() -> u64 {
    crate::engine::now_ms()
}

/// Serves the console on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, console: Console, mut shutdown: watch::Receiver<bool>) {
    let Console {
        store,
        board,
        metrics,
        key,
        tls,
        file,
    } = console;
    let shared = Arc::new(Shared {
        store,
        board,
        metrics: metrics.clone(),
        key,
        reads: Semaphore::new(STORE_READS),
        streams: Arc::new(Semaphore::new(file.max_streams.max(1))),
    });
    let app = router(shared);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(file.max_connections.max(1)));
    loop {
        let (sock, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "console accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|v| *v).await; } => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.console_refused("connections_full");
            drop(sock);
            continue;
        };
        let (app, acceptor, metrics) = (app.clone(), acceptor.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                Ok(Ok(t)) => t,
                _ => {
                    metrics.console_refused("handshake");
                    return;
                }
            };
            let cert = peer_cert(tls.get_ref().1.peer_certificates());
            let svc = TowerToHyperService::new(app.layer(Extension(cert)));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(tls), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "console connection ended"),
                Err(_) => debug!(%peer, "console connection closed at the end of its lifetime"),
            }
        });
    }
    info!("console stopped");
}

fn peer_cert(chain: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> PeerCert {
    let Some(leaf) = chain.and_then(|c| c.first()) else {
        return PeerCert::None;
    };
    // rustls verified the chain against the fleet CA and its CRLs; the role decides.
    match aloft_certs::parse_identity(leaf) {
        Ok(id) if id.role == aloft_certs::Role::Operator => PeerCert::Operator(id.id),
        _ => PeerCert::Other,
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let viewer = Router::new()
        .route("/", get(overview))
        .route("/campaigns/:id", get(campaign))
        .route("/devices", get(devices))
        .route("/devices/:id", get(device))
        .route("/events", get(events))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    Router::new()
        .merge(viewer)
        .route("/login", get(login))
        .route("/static/console.js", get(script))
        .route("/static/console.css", get(style))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), no_body))
        .layer(middleware::map_response(secure_headers))
        .with_state(shared)
}

/// The console takes no request bodies: one announced is refused before any handler runs, and
/// the connection closes (nothing is read of it).
async fn no_body(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let announced = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if announced {
        return refuse(
            &shared,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            "The console takes no request bodies.",
        );
    }
    next.run(req).await
}

/// Headers on every response: a CSP that allows only this origin's script, style and
/// connections (no inline code, no frames, no forms), and no caching, sniffing or referrers.
async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A refusal, counted; the connection closes after it (a refused client keeps no idle
/// connection open).
fn refuse(shared: &Shared, status: StatusCode, reason: &'static str, text: &str) -> Response {
    shared.metrics.console_refused(reason);
    let mut r = html(status, pages::message(status.as_str(), text));
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The token in the `aloft_console` cookie, or an `Authorization: Bearer` header.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(b) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(b.trim());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

async fn authenticate(
    State(shared): State<Arc<Shared>>,
    Extension(cert): Extension<PeerCert>,
    mut req: Request,
    next: Next,
) -> Response {
    let viewer = match cert {
        PeerCert::Operator(id) => Viewer(format!("operator {id}")),
        PeerCert::Other => {
            return refuse(
                &shared,
                StatusCode::FORBIDDEN,
                "certificate_role",
                "Only operator certificates may open the console.",
            )
        }
        PeerCert::None => match presented_token(req.headers()) {
            None => {
                return refuse(
                    &shared,
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "Present an operator certificate, or open the link `aloft console token` prints.",
                )
            }
            Some(t) => match shared.key.check(t, now_ms() / 1000) {
                Ok(_) => Viewer("viewer token".into()),
                Err(e) => {
                    return refuse(
                        &shared,
                        StatusCode::UNAUTHORIZED,
                        e.as_str(),
                        "This console token is not valid (expired, or not from this orchestrator): mint a new one with `aloft console token`.",
                    )
                }
            },
        },
    };
    req.extensions_mut().insert(viewer);
    next.run(req).await
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// Trades a token in the URL for a cookie, then sends the browser to the overview (so the
/// token leaves the address bar and the history).
async fn login(State(shared): State<Arc<Shared>>, Query(q): Query<LoginQuery>) -> Response {
    let now = now_ms() / 1000;
    let Some(token) = q.token else {
        return refuse(
            &shared,
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "No token: open the link `aloft console token` prints.",
        );
    };
    match shared.key.check(&token, now) {
        Ok(expires) => {
            shared.metrics.console_request("login");
            let cookie = format!(
                "{COOKIE}={token}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
                expires.saturating_sub(now)
            );
            let mut r = Redirect::to("/").into_response();
            match HeaderValue::from_str(&cookie) {
                Ok(v) => {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                    r
                }
                Err(_) => refuse(&shared, StatusCode::UNAUTHORIZED, "token_malformed", "Bad token."),
            }
        }
        Err(e) => refuse(
            &shared,
            StatusCode::UNAUTHORIZED,
            e.as_str(),
            "This console token is not valid (expired, or not from this orchestrator): mint a new one with `aloft console token`.",
        ),
    }
}

async fn not_found(State(shared): State<Arc<Shared>>) -> Response {
    refuse(&shared, StatusCode::NOT_FOUND, "not_found", "No such page.")
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

/// Runs a store read on the blocking pool, at most [`STORE_READS`] at once.
async fn read_store<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let _permit = shared.reads.acquire().await.map_err(|_| {
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message("Unavailable", "The console is stopping."),
        )
    })?;
    let store = shared.store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "console store read");
            Err(html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::message(
                    "Store error",
                    "The store could not be read; see the orchestrator's log.",
                ),
            ))
        }
        Err(_) => Err(html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::message("Error", "The read failed."),
        )),
    }
}

async fn overview(
    State(shared): State<Arc<Shared>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    shared.metrics.console_request("overview");
    let campaigns = shared.board.campaigns();
    let on_board: std::collections::HashSet<CampaignId> =
        campaigns.iter().map(|c| c.campaign.clone()).collect();
    // The engine puts every campaign it loads on the board; only a full board (it dropped
    // finished ones) leaves campaigns to list from the store. A record carries its membership,
    // so the store is not read otherwise.
    let older = if campaigns.len() < crate::board::MAX_BOARD_CAMPAIGNS {
        Vec::new()
    } else {
        let want = OLDER_CAMPAIGNS + crate::board::MAX_BOARD_CAMPAIGNS;
        match read_store(&shared, move |s| s.campaigns_page(want)).await {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
    let older: Vec<_> = older
        .into_iter()
        .filter(|r| !on_board.contains(&r.id))
        .take(OLDER_CAMPAIGNS)
        .collect();
    let (registered, connected) = shared.metrics.fleet_counts();
    html(
        StatusCode::OK,
        pages::overview(&pages::Overview {
            who: &viewer.0,
            now_ms: now_ms(),
            registered,
            connected,
            campaigns: &campaigns,
            older: &older,
        }),
    )
}

async fn campaign(
    State(shared): State<Arc<Shared>>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    shared.metrics.console_request("campaign");
    let Ok(id) = CampaignId::new(id.as_str()) else {
        return not_found(State(shared)).await;
    };
    if let Some(c) = shared.board.campaign(&id) {
        return html(StatusCode::OK, pages::campaign(&viewer.0, now_ms(), &c));
    }
    match read_store(&shared, move |s| s.campaign(&id)).await {
        Ok(Some(r)) => html(StatusCode::OK, pages::campaign_record(&viewer.0, &r)),
        Ok(None) => not_found(State(shared)).await,
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct PageQuery {
    after: Option<String>,
}

async fn devices(
    State(shared): State<Arc<Shared>>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<PageQuery>,
) -> Response {
    shared.metrics.console_request("devices");
    let after = match q.after.as_deref().map(DeviceId::new) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => return not_found(State(shared)).await,
    };
    // One more than a page tells whether there is a next one.
    let list = match read_store(&shared, move |s| {
        s.devices_page(after.as_ref(), DEVICE_PAGE + 1)
    })
    .await
    {
        Ok(v) => v,
        Err(r) => return r,
    };
    let more = list.len() > DEVICE_PAGE;
    let list = &list[..list.len().min(DEVICE_PAGE)];
    let next = if more {
        list.last().map(|d| d.id.as_str())
    } else {
        None
    };
    html(
        StatusCode::OK,
        pages::devices(&viewer.0, now_ms(), list, next),
    )
}

async fn device(
    State(shared): State<Arc<Shared>>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    shared.metrics.console_request("device");
    let Ok(id) = DeviceId::new(id.as_str()) else {
        return not_found(State(shared)).await;
    };
    let found = read_store(&shared, move |s| {
        let Some(d) = s.device(&id)? else {
            return Ok(None);
        };
        let h = s.device_history(&id, crate::store::HISTORY_PER_DEVICE as usize)?;
        Ok(Some((d, h)))
    })
    .await;
    match found {
        Ok(Some((d, h))) => html(StatusCode::OK, pages::device(&viewer.0, now_ms(), &d, &h)),
        Ok(None) => not_found(State(shared)).await,
        Err(r) => r,
    }
}

/// What a live update carries: the board and the fleet line.
#[derive(Serialize)]
struct Update<'a> {
    at_ms: u64,
    registered: i64,
    connected: i64,
    campaigns: Vec<&'a crate::admin::wire::CampaignSummary>,
}

fn update(shared: &Shared) -> Event {
    let (registered, connected) = shared.metrics.fleet_counts();
    let campaigns = shared.board.campaigns();
    let u = Update {
        at_ms: now_ms(),
        registered,
        connected,
        campaigns: campaigns.iter().map(|c| c.as_ref()).collect(),
    };
    Event::default()
        .json_data(&u)
        .unwrap_or_else(|_| Event::default().comment("unencodable"))
}

/// Server-sent events: the board now, then again after each change (at most once a second),
/// for at most [`STREAM_LIFETIME`]; at most `max_streams` at once.
async fn events(State(shared): State<Arc<Shared>>) -> Response {
    let Ok(permit) = shared.streams.clone().try_acquire_owned() else {
        return refuse(
            &shared,
            StatusCode::SERVICE_UNAVAILABLE,
            "streams_full",
            "Too many live views are open; close one.",
        );
    };
    shared.metrics.console_request("events");
    let changes = shared.board.subscribe();
    let until = tokio::time::Instant::now() + STREAM_LIFETIME;
    let state = (shared, changes, permit, true);
    let stream = futures_util::stream::unfold(
        state,
        move |(shared, mut changes, permit, first)| async move {
            if !first {
                tokio::time::sleep(STREAM_INTERVAL).await;
                match tokio::time::timeout_at(until, changes.changed()).await {
                    Ok(Ok(())) => {}
                    // The board is gone (shutdown) or the stream's life is over.
                    _ => return None,
                }
            } else {
                changes.mark_unchanged();
            }
            let ev = update(&shared);
            Some((
                Ok::<_, std::convert::Infallible>(ev),
                (shared, changes, permit, false),
            ))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
