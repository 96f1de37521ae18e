//! The stream against tokio-rustls at the other end, its refusals, and how it packs records.

use super::*;

use crate::tls::{client_config, install_crypto_provider, server_config};
use crate::{device_csr, FleetCa, Validity};
use aloft_proto::DeviceId;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

/// A fleet CA's server config, and a client config for device `dev-1` whose certificate
/// the fleet CA issued, or (`stranger`) another CA.
fn configs(stranger: bool) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
    install_crypto_provider();
    let ca = FleetCa::create("Aloft TLS Test CA", 1).expect("ca");
    let hosts = ["localhost".to_owned()];
    let server = ca.issue_server(&hosts, Validity::days(1)).expect("server");
    let tls = server_config(ca.cert_pem(), &server.cert_pem, &server.key_pem, vec![])
        .expect("server config");
    let other = FleetCa::create("Another CA", 1).expect("other ca");
    let issuer = if stranger { &other } else { &ca };
    let csr = device_csr(&DeviceId::new("dev-1").expect("id"), &[7; 32]).expect("csr");
    let cert = issuer
        .issue_device(&csr.csr_pem, Validity::days(1))
        .expect("cert");
    // The client trusts the fleet CA's server either way.
    let client = client_config(ca.cert_pem(), &cert, &csr.key_pem).expect("client config");
    (Arc::new(tls), Arc::new(client))
}

/// Accepts one connection with `server` and connects `client` to it.
async fn pair(
    server: Arc<ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (
    io::Result<TlsStream<Server>>,
    io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        accept(tcp, server).await
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let client = TlsConnector::from(client).connect(name, tcp).await;
    (accepted.await.expect("join"), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_each_way_arrives_whole_and_an_idle_connection_holds_no_buffer() {
    let (server, client) = configs(false);
    let (server, client) = pair(server, client).await;
    let (mut server, mut client) = (server.expect("server side"), client.expect("client"));
    let cert = server.peer_certificates().and_then(|c| c.first()).cloned();
    let identity = crate::parse_identity(cert.expect("client certificate").as_ref());
    assert_eq!(identity.expect("identity").id, "dev-1");

    let up: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
    let send_up = {
        let up = up.clone();
        async move {
            client.write_all(&up).await.expect("client writes");
            let mut got = vec![0u8; 1 << 20];
            client.read_exact(&mut got).await.expect("client reads");
            (client, got)
        }
    };
    let serve = async {
        let mut got = vec![0u8; up.len()];
        server.read_exact(&mut got).await.expect("server reads");
        // Written in pieces of every size, vectored, as the sessions write.
        let mut at = 0;
        let mut size = 1;
        while at < down.len() {
            let end = (at + size).min(down.len());
            let (a, b) = down[at..end].split_at((end - at) / 2);
            let n = server
                .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                .await
                .expect("server writes");
            at += n;
            size = size * 3 + 1;
        }
        server.flush().await.expect("server flushes");
        got
    };
    let ((mut client, client_got), server_got) = tokio::join!(send_up, serve);
    assert!(server_got == up, "the server read what the client wrote");
    assert!(client_got == down, "the client read what the server wrote");
    assert_eq!(server.held(), 0, "an idle connection holds no buffer");

    // A close_notify is the end of the stream for the server's reader, and the server's
    // own goes back as a clean end for the client.
    client.shutdown().await.expect("client closes");
    let mut rest = Vec::new();
    assert_eq!(
        server
            .read_to_end(&mut rest)
            .await
            .expect("server reads the end"),
        0
    );
    server.shutdown().await.expect("server closes");
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .await
        .expect("a clean end for the client");
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_end_against_another_servers_tls_reads_and_writes_and_then_holds_nothing() {
    let (server, client) = configs(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The server is tokio-rustls (rustls' buffered connection): another implementation.
    let echo = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .expect("server handshake");
        let mut got = vec![0u8; 1 << 20];
        tls.read_exact(&mut got).await.expect("server reads");
        tls.write_all(&got).await.expect("server echoes");
        tls.flush().await.expect("server flushes");
        tls.shutdown().await.expect("server closes");
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connect(tcp, client, name).await.expect("client handshake");
    assert!(tls.peer_certificates().is_some_and(|c| !c.is_empty()));
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 239) as u8).collect();
    tls.write_all(&data).await.expect("client writes");
    tls.flush().await.expect("client flushes");
    let mut back = Vec::new();
    // Read in odd sizes, as a device reads what its next packet needs.
    let mut buf = vec![0u8; 16_411];
    loop {
        let n = tls.read(&mut buf).await.expect("client reads");
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back == data, "the echo is what was sent");
    assert_eq!(tls.held(), 0, "a drained connection holds no buffer");
    echo.await.expect("server task");
}

#[test]
fn slices_are_packed_into_whole_records_but_the_last() {
    // A chunk frame as the front writes it: a small header, then the body; twice.
    let (head, body) = (vec![1u8; 40], vec![2u8; 16_420]);
    let bufs = [
        IoSlice::new(&head),
        IoSlice::new(&body),
        IoSlice::new(&head),
        IoSlice::new(&body),
    ];
    let mut pieces = Vec::new();
    let mut joint = Vec::new();
    let taken = pack(&bufs, MAX_WRITE, 4091, &mut joint, |p| {
        pieces.push(p.to_vec());
        Ok(())
    })
    .expect("packed");
    assert_eq!(taken, 2 * (40 + 16_420));
    let (last, whole) = pieces.split_last().expect("pieces");
    assert!(whole.iter().all(|p| p.len() % 4091 == 0), "whole records");
    assert!(last.len() <= 4091 || last.len() % 4091 == 0);
    let records: usize = pieces.iter().map(|p| p.len().div_ceil(4091)).sum();
    assert_eq!(
        records,
        (2 * (40 + 16_420usize)).div_ceil(4091),
        "no record short of full"
    );
    let all: Vec<u8> = pieces.concat();
    assert!(
        all == [&head[..], &body, &head, &body].concat(),
        "every byte, in order"
    );

    // A limit takes a prefix, and a slice is cut where the limit falls.
    let mut pieces = Vec::new();
    let taken = pack(&bufs, 10_000, 4091, &mut joint, |p| {
        pieces.push(p.len());
        Ok(())
    })
    .expect("packed");
    assert_eq!((taken, pieces.iter().sum::<usize>()), (10_000, 10_000));
}

#[test]
fn a_record_carries_the_fragment_size_less_its_header() {
    assert_eq!(record_plaintext(Some(4096)), 4091);
    assert_eq!(record_plaintext(None), 16 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_ca_is_refused_with_an_alert() {
    let (server, client) = configs(true);
    let (server, client) = pair(server, client).await;
    assert!(server.is_err(), "the handshake fails on the server");
    // In TLS 1.3 the client's handshake is over before the server has checked its
    // certificate: it learns why on its first read, from the server's alert.
    let mut client = client.expect("the client's side of the handshake completes");
    let mut b = [0u8; 1];
    let err = client.read(&mut b).await.expect_err("refused");
    assert!(
        err.to_string().contains("received fatal alert"),
        "an alert, not a closed socket: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_tls_records_end_the_read_with_an_error() {
    let (server, client) = configs(false);
    let (server, client) = pair(server, client).await;
    let (mut server, client) = (server.expect("server side"), client.expect("client"));
    let (mut tcp, _) = client.into_inner();
    // A record header with an unknown content type and a length past any record's.
    tcp.write_all(&[0x42, 0x03, 0x03, 0xff, 0xff, 0, 0, 0])
        .await
        .expect("garbage");
    let mut buf = [0u8; 16];
    let err = server.read(&mut buf).await.expect_err("refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}
