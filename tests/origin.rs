//! Untrusted download origins (protocol 1.5): a release exported with `release export`
//! (`ops::export::export_bundle`, what the CLI runs), served by a real nginx over HTTPS with a
//! certificate from the fleet CA, and by a hostile origin that lies in every way it can. The
//! devices check every chunk against the signed manifest, fetch what the origin got wrong from
//! the orchestrator, and every update succeeds with the right image.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aloft_certs::Validity;
use aloft_e2e::origin::Nginx;
use aloft_e2e::{finished, wait_campaign, ReleaseSpec};
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::ops::{self, export::export_bundle};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::Target;
use aloft_proto::{ArtifactId, CampaignId, DeviceState};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::common::{Env, LIMIT};

async fn campaign_with_origin(env: &Env, artifact: ArtifactId, origin: String) -> CampaignId {
    let v: Value = env
        .admin
        .call(AdminBody::CampaignCreate {
            artifact,
            target: Target::All,
            include: Vec::new(),
            exclude: Vec::new(),
            policy: RolloutPolicy::default(),
            dry_run: false,
            origin: Some(origin),
        })
        .await
        .unwrap();
    CampaignId::new(v["campaign"].as_str().unwrap()).unwrap()
}

/// Runs an `aloft` command line in this process, as the binary would (docs/ORIGINS.md's steps).
async fn aloft(args: &[&str]) {
    use clap::Parser;
    let argv = std::iter::once("aloft").chain(args.iter().copied());
    let cli = aloft_orchestrator::cli::Cli::try_parse_from(argv).unwrap();
    aloft_orchestrator::cli::run(cli).await.unwrap();
}

/// docs/ORIGINS.md's procedure: `release export`, nginx serving the directory over HTTPS, and
/// `campaign create --origin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_fetch_every_chunk_from_nginx_and_none_from_the_orchestrator() {
    let env = Env::new(4).await;
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 200 * 1024))
        .unwrap();
    ops::upload_bundle(&env.admin, &bundle, false)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    aloft(&[
        "release",
        "export",
        "--bundle",
        bundle.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ])
    .await;
    assert!(export.join("fw-2.0.0/manifest.json").is_file());
    assert!(export.join("fw-2.0.0/chunks/12").is_file());
    assert!(!export.join("fw-2.0.0/chunks/13").exists(), "13 chunks");
    let server = env
        .lab
        .ca
        .issue_server(&["127.0.0.1".into()], Validity::days(1))
        .unwrap();
    let nginx = Nginx::start(
        &tmp.path().join("nginx"),
        &export,
        &server.cert_pem,
        &server.key_pem,
    )
    .unwrap();
    let mut cfg = env.fleet_config();
    cfg.origin_ca_pem = Some(env.lab.ca.cert_pem().to_owned());
    let fleet = env.start_fleet(&cfg).await;
    let orchestrator = env.running.device_addr.to_string();
    // A second operator: the test's own admin session holds the first one's identity.
    let profile = tmp.path().join("operator2");
    ops::issue_operator_profile(
        &env.lab.ca,
        &aloft_proto::OperatorId::new("ops2").unwrap(),
        aloft_certs::OperatorRole::Operator,
        &profile,
        1,
    )
    .unwrap();
    let url = nginx.url();
    aloft(&[
        "campaign",
        "create",
        "--artifact",
        "fw-2.0.0",
        "--all",
        "--origin",
        &url,
        "--profile",
        profile.to_str().unwrap(),
        "--server",
        &orchestrator,
    ])
    .await;
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == "2.0.0" && v.outbox == 0)
            .await,
        "every device runs 2.0.0 with nothing left to report"
    );
    for (id, v) in fleet.views() {
        assert_eq!(v.stats.origin_chunks, 13, "{id}: every chunk from nginx");
        assert_eq!(v.stats.origin_refused + v.stats.origin_failed, 0, "{id}");
        assert_eq!(v.stats.chunks_received, 0, "{id}: no chunk over MQTT");
    }
    assert_eq!(
        env.running.metrics.chunk_bytes_served(),
        0,
        "the orchestrator sent no chunk bytes"
    );
    assert_eq!(
        env.running.metrics.success_without_download_count(),
        0,
        "a success from the origin is not flagged"
    );
    assert!(nginx.requests() >= 4 * 13, "nginx served the chunks");
    fleet.shutdown().await;
}

/// What the hostile origin does with chunk `index`: even chunks are served right; odd ones get
/// one lie each, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    None,
    WrongBytes,
    Truncated,
    OtherRelease,
    VerySlow,
    NotFound,
    RedirectElsewhere,
    Oversize,
}

fn lie(index: u32) -> Lie {
    if index.is_multiple_of(2) {
        return Lie::None;
    }
    match (index / 2) % 7 {
        0 => Lie::WrongBytes,
        1 => Lie::Truncated,
        2 => Lie::OtherRelease,
        3 => Lie::VerySlow,
        4 => Lie::NotFound,
        5 => Lie::RedirectElsewhere,
        _ => Lie::Oversize,
    }
}

/// An HTTPS origin (tokio-rustls + hyper) that serves `export`'s chunks with the lie of
/// [`lie`], taking "another release's chunk" from `other` (an export of another artifact).
async fn hostile_origin(
    cert_pem: &str,
    key_pem: &str,
    export: PathBuf,
    other: (PathBuf, ArtifactId),
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new((export, other));
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&state.0, &state.1, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, task)
}

async fn answer(
    export: &Path,
    other: &(PathBuf, ArtifactId),
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    let Some(index) = path
        .rsplit_once("/chunks/")
        .and_then(|(_, i)| i.parse::<u32>().ok())
    else {
        return reply(StatusCode::NOT_FOUND, Vec::new());
    };
    let Ok(good) = std::fs::read(export.join(&path)) else {
        return reply(StatusCode::NOT_FOUND, Vec::new());
    };
    match lie(index) {
        Lie::None => reply(StatusCode::OK, good),
        Lie::WrongBytes => {
            let mut bad = good;
            bad[10] ^= 0x40;
            reply(StatusCode::OK, bad)
        }
        Lie::Truncated => reply(StatusCode::OK, good[..good.len() / 2].to_vec()),
        Lie::OtherRelease => {
            let theirs = other.0.join(format!("{}/chunks/{index}", other.1));
            reply(StatusCode::OK, std::fs::read(theirs).unwrap_or_default())
        }
        Lie::VerySlow => {
            // Far past the devices' fetch time limit; the connection is dropped with the test.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            reply(StatusCode::OK, good)
        }
        Lie::NotFound => reply(StatusCode::NOT_FOUND, b"no such chunk".to_vec()),
        Lie::RedirectElsewhere => {
            let mut r = reply(StatusCode::FOUND, Vec::new());
            r.headers_mut().insert(
                hyper::header::LOCATION,
                hyper::header::HeaderValue::from_static("https://elsewhere.example/evil"),
            );
            r
        }
        Lie::Oversize => {
            let mut big = good;
            big.extend(vec![0u8; 64 * 1024]);
            reply(StatusCode::OK, big)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_origin_is_refused_by_hash_and_the_update_still_succeeds() {
    let env = Env::new(3).await;
    // 16 chunks: 8 served right, 8 lies (each kind at least once).
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 256 * 1024))
        .unwrap();
    let artifact = ops::upload_bundle(&env.admin, &bundle, false)
        .await
        .unwrap();
    let other_bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.1", 2, 256 * 1024))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let other = tmp.path().join("other");
    assert_eq!(export_bundle(&bundle, &export).unwrap().chunks, 16);
    let other_artifact = export_bundle(&other_bundle, &other).unwrap().artifact;
    let lies: Vec<Lie> = (0..16).map(lie).collect();
    for kind in [
        Lie::WrongBytes,
        Lie::Truncated,
        Lie::OtherRelease,
        Lie::VerySlow,
        Lie::NotFound,
        Lie::RedirectElsewhere,
        Lie::Oversize,
    ] {
        assert!(lies.contains(&kind), "{kind:?} is exercised");
    }
    let server = env
        .lab
        .ca
        .issue_server(&["127.0.0.1".into()], Validity::days(1))
        .unwrap();
    let (addr, origin) = hostile_origin(
        &server.cert_pem,
        &server.key_pem,
        export,
        (other, other_artifact),
    )
    .await;
    let mut cfg = env.fleet_config();
    cfg.origin_ca_pem = Some(env.lab.ca.cert_pem().to_owned());
    // Every lie is met (none gives the origin up), and "very slow" ends in 2 s, not 20.
    cfg.origin_max_failures = 1000;
    cfg.origin_fetch_timeout = Duration::from_secs(2);
    let fleet = env.start_fleet(&cfg).await;
    let campaign = campaign_with_origin(&env, artifact, format!("https://{addr}/")).await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 3, "{:?}", s.counts);
    for (id, v) in fleet.views() {
        // Succeeded means the slot's SHA-256 matched the signed image digest before install.
        assert_eq!(v.running_version, "2.0.0", "{id}");
        let st = v.stats;
        assert_eq!(st.origin_chunks, 8, "{id}: the honest answers were used");
        assert_eq!(
            st.origin_refused, 4,
            "{id}: wrong bytes (twice), truncated, another release's chunk refused by hash"
        );
        assert_eq!(
            st.origin_failed, 4,
            "{id}: slow, 404, redirect, oversize failed"
        );
        assert_eq!(st.chunks_received, 8, "{id}: each lie re-fetched over MQTT");
        assert_eq!(
            st.chunks_rejected, 0,
            "{id}: nothing bad reached the cipher"
        );
    }
    // Only the chunks the origin lied about came from the orchestrator (a re-request of a
    // slow one may add a duplicate, never a whole image).
    let sealed = 16 * 1024 + 16;
    let served = env.running.metrics.chunk_bytes_served();
    assert!(
        served >= 3 * 8 * sealed && served < 3 * 16 * sealed,
        "{served} chunk bytes from the orchestrator"
    );
    origin.abort();
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_with_a_certificate_outside_the_devices_anchors_is_not_used() {
    let env = Env::new(2).await;
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("2.0.0", 2, 64 * 1024))
        .unwrap();
    let artifact = ops::upload_bundle(&env.admin, &bundle, false)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    export_bundle(&bundle, &export).unwrap();
    // A certificate from another CA: the devices' origin anchors are the fleet CA only.
    let stranger = aloft_certs::FleetCa::create("stranger", 1).unwrap();
    let server = stranger
        .issue_server(&["127.0.0.1".into()], Validity::days(1))
        .unwrap();
    let nginx = Nginx::start(
        &tmp.path().join("nginx"),
        &export,
        &server.cert_pem,
        &server.key_pem,
    )
    .unwrap();
    let mut cfg = env.fleet_config();
    cfg.origin_ca_pem = Some(env.lab.ca.cert_pem().to_owned());
    let fleet = env.start_fleet(&cfg).await;
    let campaign = campaign_with_origin(&env, artifact, nginx.url()).await;
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), 2, "{:?}", s.counts);
    for (id, v) in fleet.views() {
        assert_eq!(v.stats.origin_chunks, 0, "{id}");
        assert_eq!(
            v.stats.origin_abandoned, 1,
            "{id}: TLS refused, origin given up"
        );
        assert_eq!(v.stats.chunks_received, 4, "{id}: everything over MQTT");
    }
    assert_eq!(nginx.requests(), 0, "no request passed a refused handshake");
    fleet.shutdown().await;
}
