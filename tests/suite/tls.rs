//! TLS on both listeners with certificates made by the test (rcgen): agents
//! over wss:// and https://, clients that do not trust the CA, a renewed
//! certificate served to new connections while old ones stay up, and mTLS.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::certs::{Ca, server_files};
use common::{DEADLINE, TestServer, hello, uid16};
use futures_util::{SinkExt, StreamExt};
use opamp_gitops::app::ServeConfig;
use opamp_gitops::opamp::codec;
use opamp_gitops::proto::ServerToAgent;
use opamp_gitops::tls::TlsFiles;
use prost::Message as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A client trusting `ca`, presenting `client` (cert PEM, key PEM) when given.
fn connector(ca: &Ca, client: Option<&(String, String)>) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    TlsConnector::from(Arc::new(config))
}

async fn tls(connector: &TlsConnector, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = tokio::time::timeout(DEADLINE, connector.connect(name, tcp)).await??;
    // A refused client certificate shows in TLS 1.3 at the first read, not
    // in the handshake: make sure the server has taken the connection.
    stream.flush().await?;
    Ok(stream)
}

/// `GET path` over https; the status code, or the error.
async fn https_get(connector: &TlsConnector, addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = tls(connector, addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))
}

/// An agent over wss:// that says hello; the connection stays open.
struct WssAgent(tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>);

impl WssAgent {
    async fn connect(connector: &TlsConnector, addr: SocketAddr) -> std::io::Result<WssAgent> {
        let stream = tls(connector, addr).await?;
        let (ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/opamp", stream)
            .await
            .map_err(std::io::Error::other)?;
        Ok(WssAgent(ws))
    }

    async fn exchange(&mut self, uid: &[u8], seq: u64) -> ServerToAgent {
        let msg = hello(uid, seq);
        self.0
            .send(Message::Binary(codec::encode_ws(&msg).into()))
            .await
            .unwrap();
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.0.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Message::Binary(b) = frame {
                return ServerToAgent::decode(&b[1..]).unwrap();
            }
        }
    }
}

async fn server(files: TlsFiles) -> TestServer {
    TestServer::start_with(ServeConfig {
        tls: Some(files),
        ..ServeConfig::local()
    })
    .await
}

#[tokio::test]
async fn agents_and_operators_connect_over_tls_to_a_server_they_trust() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let server = server(server_files(dir.path(), &ca, None)).await;
    let trusting = connector(&ca, None);

    let mut agent = WssAgent::connect(&trusting, server.opamp_addr()).await.unwrap();
    assert_eq!(agent.exchange(&uid16(1), 0).await.instance_uid, uid16(1));
    assert_eq!(https_get(&trusting, server.api_addr(), "/healthz").await.unwrap(), 200);

    // A client that does not trust the CA fails its handshake.
    let stranger = connector(&Ca::new("another CA"), None);
    assert!(WssAgent::connect(&stranger, server.opamp_addr()).await.is_err());
    assert!(https_get(&stranger, server.api_addr(), "/healthz").await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn a_socket_that_never_starts_its_handshake_is_closed_for_a_new_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let server = TestServer::start_with(ServeConfig {
        tls: Some(server_files(dir.path(), &ca, None)),
        max_connections: Some(2),
        max_connections_per_source: Some(0),
        first_request_timeout: std::time::Duration::from_secs(3600),
        ..ServeConfig::local()
    })
    .await;
    // Two sockets that never send a ClientHello fill the listener, accepted
    // in the order they connected.
    let mut silent = TcpStream::connect(server.opamp_addr()).await.unwrap();
    let _second = TcpStream::connect(server.opamp_addr()).await.unwrap();

    let mut agent = WssAgent::connect(&connector(&ca, None), server.opamp_addr())
        .await
        .unwrap();
    assert_eq!(agent.exchange(&uid16(3), 0).await.instance_uid, uid16(3));
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the oldest, mid-handshake, is closed for the agent: {read:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections_while_old_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = server_files(dir.path(), &old_ca, None);
    let server = server(files.clone()).await;
    let mut agent = WssAgent::connect(&connector(&old_ca, None), server.opamp_addr())
        .await
        .unwrap();
    agent.exchange(&uid16(2), 0).await;

    // Renewal as tools do it: write new files next to the old, then rename.
    let (cert, key) = new_ca.issue("localhost");
    std::fs::write(dir.path().join("new.key"), key).unwrap();
    std::fs::write(dir.path().join("new.pem"), cert).unwrap();
    std::fs::rename(dir.path().join("new.key"), &files.key).unwrap();
    std::fs::rename(dir.path().join("new.pem"), &files.cert).unwrap();

    let renewed = connector(&new_ca, None);
    common::eventually("the renewed certificate to be served", async || {
        https_get(&renewed, server.api_addr(), "/healthz")
            .await
            .ok()
            .filter(|s| *s == 200)
    })
    .await;
    assert!(WssAgent::connect(&renewed, server.opamp_addr()).await.is_ok());
    assert!(
        WssAgent::connect(&connector(&old_ca, None), server.opamp_addr())
            .await
            .is_err(),
        "new connections get the new certificate"
    );
    assert_eq!(
        agent.exchange(&uid16(2), 1).await.instance_uid,
        uid16(2),
        "the connection made before the renewal stays up"
    );
    server.stop().await;
}

#[tokio::test]
async fn with_a_client_ca_agents_must_present_a_certificate_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, clients) = (Ca::new("server CA"), Ca::new("agents CA"));
    let server = server(server_files(dir.path(), &ca, Some(&clients))).await;

    let anonymous = connector(&ca, None);
    assert!(
        WssAgent::connect(&anonymous, server.opamp_addr()).await.is_err(),
        "an agent without a certificate is refused"
    );
    let other = Ca::new("someone else").issue("edge-1");
    assert!(
        WssAgent::connect(&connector(&ca, Some(&other)), server.opamp_addr())
            .await
            .is_err(),
        "a certificate from another CA is refused"
    );

    let edge = clients.issue("edge-1");
    let mut agent = WssAgent::connect(&connector(&ca, Some(&edge)), server.opamp_addr())
        .await
        .unwrap();
    assert_eq!(agent.exchange(&uid16(4), 0).await.instance_uid, uid16(4));
    // Operators are not asked for a certificate.
    assert_eq!(https_get(&anonymous, server.api_addr(), "/healthz").await.unwrap(), 200);
    server.stop().await;
}
