//! The operator side of the admin protocol: an mTLS MQTT connection through the front with an
//! operator certificate, and request/reply matched by id. Used by the `aloft` CLI and by tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aloft_proto::messages::{self, PROTOCOL_VERSION};
use aloft_proto::{topics, OperatorId};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, Mutex};

use super::wire::{AdminBody, AdminError, AdminReply, AdminRequest, MAX_REPLY_BYTES};

/// Files of an operator profile directory (written by `aloft pki issue-operator`).
pub const PROFILE_CA: &str = "ca.crt";
pub const PROFILE_CERT: &str = "operator.crt";
pub const PROFILE_KEY: &str = "operator.key";

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The I/O error is in the message, not a `source`: `{:#}` would print it twice.
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("operator certificate: {0}")]
    Pki(#[from] aloft_certs::PkiError),
    #[error("the profile's certificate is not an operator certificate")]
    NotOperator,
    /// `--server` is not `host:port`.
    #[error("--server {server:?} is not host:port: {fix}")]
    Address { server: String, fix: String },
    /// Connecting failed; `cause` names why (from the network, TLS or MQTT layer) and `fix`
    /// what to do about it.
    #[error("could not connect to the orchestrator at {server}: {cause}. {fix}")]
    Connect {
        server: String,
        cause: String,
        fix: String,
    },
    #[error("no reply from the orchestrator within {0:?}")]
    Timeout(Duration),
    #[error("connection to the orchestrator closed")]
    Closed,
    /// Not a `source` either, for the same reason.
    #[error("refused: {0}")]
    Refused(AdminError),
    #[error("unexpected reply: {0}")]
    BadReply(String),
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<AdminReply>>>>;

/// A connected operator.
pub struct AdminClient {
    operator: OperatorId,
    client: AsyncClient,
    pending: Pending,
    timeout: Duration,
    next_id: std::sync::atomic::AtomicU64,
    /// Random per connection: request ids never repeat across CLI runs.
    session: String,
    /// Signs every request with the profile's key (1.5, `super::auth`).
    signer: super::auth::RequestSigner,
}

/// How long connecting (TCP, TLS, MQTT session and subscription) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The port `aloft serve` listens on by default, for the hint when `--server` has none.
const DEFAULT_PORT: u16 = 8883;

/// Splits `--server` into host and port, or says how to write it.
pub fn parse_server(server: &str) -> Result<(String, u16), ClientError> {
    let address = |fix: String| ClientError::Address {
        server: server.to_owned(),
        fix,
    };
    let trimmed = server.trim();
    // `[::1]:8883`: the brackets are not part of the host.
    let (host, port) = match trimmed.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => (h, p),
        _ => {
            return Err(address(format!(
                "it has no port; write {}:{DEFAULT_PORT} (the orchestrator's mTLS listener, which `aloft serve` prints as device=HOST:PORT)",
                if trimmed.contains(':') { format!("[{trimmed}]") } else { trimmed.to_owned() }
            )))
        }
    };
    let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
        address(format!(
            "{port:?} is not a port number; write {host}:{DEFAULT_PORT} or the port `aloft serve` printed"
        ))
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_owned(), port))
}

/// The cause of a failed connection and what to do about it, for an operator.
fn explain(e: &rumqttc::v5::ConnectionError) -> (String, String) {
    use rumqttc::v5::ConnectionError as C;
    let io = match e {
        C::Io(io) | C::Tls(rumqttc::TlsError::Io(io)) => Some(io),
        _ => None,
    };
    let tls = io
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .or(match e {
            C::Tls(rumqttc::TlsError::TLS(t)) => Some(t),
            _ => None,
        });
    if let Some(t) = tls {
        return explain_tls(t);
    }
    if let Some(io) = io {
        use std::io::ErrorKind as K;
        let fix = match io.kind() {
            K::ConnectionRefused => "Nothing listens there: is `aloft serve` running, and is this its --listen port (it prints device=HOST:PORT at start)?",
            K::ConnectionReset | K::UnexpectedEof | K::BrokenPipe => "The orchestrator closed the connection during the handshake: is the operator certificate revoked, expired, or from another fleet CA? The orchestrator's log says which",
            K::TimedOut => "A firewall may drop the connection; check the host and port",
            _ if io.to_string().contains("lookup") || io.to_string().contains("resolve") => "The host name does not resolve: check its spelling, or use an address",
            _ => "Check --server (host:port of the orchestrator's mTLS listener) and the network",
        };
        return (io.to_string(), fix.to_owned());
    }
    match e {
        C::ConnectionRefused(rumqttc::v5::mqttbytes::v5::ConnectReturnCode::NotAuthorized) => (
            "the orchestrator refused the session (not authorized)".to_owned(),
            "It admits one connection per operator: another `aloft` command with this profile may still be running (a `--watch`?); else the operator certificate may be revoked (its log says which)".to_owned(),
        ),
        C::ConnectionRefused(code) => (
            format!("the orchestrator refused the MQTT session ({code:?})"),
            "Its log says why; the operator certificate may be revoked".to_owned(),
        ),
        C::Timeout(_) => (
            "the connection timed out".to_owned(),
            "A firewall may drop the connection; check the host and port".to_owned(),
        ),
        other => (
            other.to_string(),
            "Check --server and the orchestrator's log".to_owned(),
        ),
    }
}

/// The cause and fix of a TLS failure.
fn explain_tls(t: &rustls::Error) -> (String, String) {
    use rustls::{AlertDescription as A, CertificateError as CE, Error as E};
    let fix = match t {
        E::InvalidCertificate(CE::NotValidForName | CE::NotValidForNameContext { .. }) => {
            "Use a name the server certificate carries in --server (localhost, 127.0.0.1 and each `aloft init --hostname`)"
        }
        E::InvalidCertificate(CE::UnknownIssuer | CE::BadSignature) => {
            "The server's certificate is not from the profile's fleet CA (ca.crt): this profile belongs to another orchestrator, or --server names another service"
        }
        E::InvalidCertificate(CE::Expired | CE::ExpiredContext { .. }) => {
            "The server certificate expired: renew it on the server (or check this machine's clock)"
        }
        E::AlertReceived(A::CertificateRevoked) => {
            "The orchestrator revoked this operator certificate: ask for a new profile (`aloft pki issue-operator`)"
        }
        E::AlertReceived(A::CertificateExpired) => {
            "The operator certificate expired: ask for a new profile (`aloft pki issue-operator`)"
        }
        E::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown) => {
            "The orchestrator refused the operator certificate: it is not from this fleet's CA, or it is revoked or expired"
        }
        E::InvalidMessage(_) => {
            "The other side does not speak TLS: --server must be the orchestrator's mTLS listener, not its metrics or plain port"
        }
        _ => "Check that --server is the orchestrator's mTLS listener and the profile is this fleet's",
    };
    (format!("TLS: {t}"), fix.to_owned())
}

fn read(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|error| ClientError::Read {
        path: path.to_owned(),
        error,
    })
}

impl AdminClient {
    /// Connects to `server` (`host:port`) with the operator profile in `profile_dir`.
    pub async fn connect(profile_dir: &Path, server: &str) -> Result<Self, ClientError> {
        aloft_certs::tls::install_crypto_provider();
        let (host, port) = parse_server(server)?;
        let ca = read(&profile_dir.join(PROFILE_CA))?;
        let cert = read(&profile_dir.join(PROFILE_CERT))?;
        let key = read(&profile_dir.join(PROFILE_KEY))?;
        let der = aloft_certs::tls::parse_cert(&cert)?;
        let operator = aloft_certs::parse_identity(&der)?
            .operator_id()
            .ok_or(ClientError::NotOperator)?;
        let tls = aloft_certs::tls::client_config(&ca, &cert, &key)?;
        let signer = super::auth::RequestSigner::new(operator.clone(), &cert, &key)?;
        let mut opts = MqttOptions::new(operator.to_string(), host, port);
        // Request/response over small packets: Nagle would add delayed-ACK stalls to each one.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(MAX_REPLY_BYTES as u32))
        .set_outgoing_inflight_upper_limit(32);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let pending: Pending = Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), (String, String)>>();
        let reply_topic = topics::operator_reply(&operator);
        let sub = client.clone();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if sub
                            .subscribe(reply_topic.clone(), QoS::AtLeastOnce)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if let Ok(reply) = messages::decode::<AdminReply>(&publish.payload) {
                            if let Some(tx) = p.lock().await.remove(&reply.id) {
                                let _ = tx.send(reply);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Err(explain(&e)));
                            return;
                        }
                        // Pending calls time out; the CLI is short-lived, so no reconnect.
                        p.lock().await.clear();
                        return;
                    }
                }
            }
        });
        let connect_error = |(cause, fix): (String, String)| ClientError::Connect {
            server: server.to_owned(),
            cause,
            fix,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => return Err(connect_error(why)),
            Ok(Err(_)) => {
                return Err(connect_error((
                    "the connection ended before the orchestrator accepted the session".into(),
                    "Check the orchestrator's log for why it refused this operator".into(),
                )))
            }
            Err(_) => {
                return Err(connect_error((
                    format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                    "A firewall may drop the connection, or another service listens there: --server must be the orchestrator's mTLS listener (`aloft serve` prints it as device=HOST:PORT)".into(),
                )))
            }
        }
        Ok(Self {
            operator,
            client,
            pending,
            timeout: Duration::from_secs(30),
            next_id: std::sync::atomic::AtomicU64::new(1),
            session: {
                let mut r = [0u8; 8];
                aloft_proto::crypto::random_bytes(&mut r).map_err(|e| ClientError::Connect {
                    server: server.to_owned(),
                    cause: format!("no randomness for request ids: {e}"),
                    fix: "Check the system's random source".into(),
                })?;
                hex::encode(r)
            },
            signer,
        })
    }

    pub fn operator(&self) -> &OperatorId {
        &self.operator
    }

    /// Sends one request and waits for its reply.
    pub async fn call<T: DeserializeOwned>(&self, body: AdminBody) -> Result<T, ClientError> {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Unique across invocations, since the orchestrator answers a repeated id from its cache.
        let id = format!("{}-{n}", self.session);
        let auth = self.signer.sign(&id, &body, crate::clock::now_ms())?;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(id.clone(), tx);
        let req = AdminRequest {
            v: PROTOCOL_VERSION,
            id: id.clone(),
            body,
            auth: Some(auth),
        };
        let topic = topics::admin_request(&self.operator, super::wire::REQUEST_OP);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, messages::encode(&req))
            .await
            .map_err(|_| ClientError::Closed)?;
        let reply = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(ClientError::Closed),
            Err(_) => {
                self.pending.lock().await.remove(&id);
                return Err(ClientError::Timeout(self.timeout));
            }
        };
        if !reply.ok {
            return Err(ClientError::Refused(reply.error.unwrap_or_else(|| {
                AdminError::new("unknown", "refused without a reason")
            })));
        }
        serde_json::from_value(reply.result.unwrap_or_default())
            .map_err(|e| ClientError::BadReply(e.to_string()))
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_without_a_port_is_refused_with_the_spelling_to_use() {
        let e = parse_server("localhost").unwrap_err().to_string();
        assert!(e.contains("has no port; write localhost:8883"), "{e}");
        let e = parse_server("localhost:88x").unwrap_err().to_string();
        assert!(e.contains("\"88x\" is not a port number"), "{e}");
        let e = parse_server("::1").unwrap_err().to_string();
        assert!(e.contains("write [::1]:8883"), "{e}");
        assert_eq!(
            parse_server("localhost:8883").unwrap(),
            ("localhost".into(), 8883)
        );
        assert_eq!(parse_server("[::1]:8883").unwrap(), ("::1".into(), 8883));
    }

    #[test]
    fn tls_failures_name_their_cause_and_fix() {
        let (cause, fix) = explain_tls(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(cause.starts_with("TLS: "), "{cause}");
        assert!(fix.contains("another orchestrator"), "{fix}");
        let (_, fix) = explain_tls(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRevoked,
        ));
        assert!(fix.contains("revoked"), "{fix}");
    }
}
