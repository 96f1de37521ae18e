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
    #[error("could not connect to the orchestrator at {0}")]
    Connect(String),
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
        let ca = read(&profile_dir.join(PROFILE_CA))?;
        let cert = read(&profile_dir.join(PROFILE_CERT))?;
        let key = read(&profile_dir.join(PROFILE_KEY))?;
        let der = aloft_certs::tls::parse_cert(&cert)?;
        let operator = aloft_certs::parse_identity(&der)?
            .operator_id()
            .ok_or(ClientError::NotOperator)?;
        let tls = aloft_certs::tls::client_config(&ca, &cert, &key)?;
        let (host, port) = server
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| ClientError::Connect(server.to_owned()))?;
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
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
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
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                        // Pending calls time out; the CLI is short-lived, so no reconnect.
                        p.lock().await.clear();
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(15), ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(ClientError::Connect(format!("{server}: {e}"))),
            _ => return Err(ClientError::Connect(server.to_owned())),
        }
        Ok(Self {
            operator,
            client,
            pending,
            timeout: Duration::from_secs(30),
            next_id: std::sync::atomic::AtomicU64::new(1),
            session: {
                let mut r = [0u8; 8];
                aloft_proto::crypto::random_bytes(&mut r)
                    .map_err(|e| ClientError::Connect(format!("randomness: {e}")))?;
                hex::encode(r)
            },
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
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(id.clone(), tx);
        let req = AdminRequest {
            v: PROTOCOL_VERSION,
            id: id.clone(),
            body,
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
