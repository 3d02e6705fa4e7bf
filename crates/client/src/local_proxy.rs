//! `postern proxy db`: a listener on the user's machine that takes plain PostgreSQL
//! connections (no TLS) and carries each to the proxy over TLS with the user's
//! database certificate. For GUI clients that cannot present a client certificate, and
//! for load balancers that break PostgreSQL's SSLRequest negotiation.
//!
//! Per connection: answer SSLRequest and GSSENCRequest with `N` (the client then
//! speaks plaintext to us), dial the proxy, start TLS, forward the rest both ways.
//! A CancelRequest takes the same path, so Ctrl+C in psql reaches the proxy, which
//! routes it to the session that owns the key.

use std::sync::Arc;
use std::time::Duration;

use postern_rt::{Connection, Listener, Net};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// PostgreSQL's SSLRequest code.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// PostgreSQL's GSSENCRequest code.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// How many `N` answers a client gets before it must start: SSLRequest and
/// GSSENCRequest once each is all a real client sends.
pub const NEGOTIATIONS_MAX: usize = 2;
/// Dialing the proxy and finishing TLS.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// How the local proxy reaches the proxy.
#[derive(Clone)]
pub struct Upstream {
    pub net: Net,
    /// `HOST:PORT` of the proxy's port for PostgreSQL.
    pub addr: String,
    pub server_name: ServerName<'static>,
    /// Trusts the cluster's host CA, presents the database certificate; its ALPN says
    /// which protocol this is on the TLS-routing port.
    pub tls: Arc<rustls::ClientConfig>,
    /// `true`: the port speaks PostgreSQL's negotiation (SSLRequest, then TLS);
    /// `false`: TLS first, protocol by ALPN (the TLS-routing web port).
    pub ssl_request: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("ssl_request", &self.ssl_request)
            .finish_non_exhaustive()
    }
}

/// Serves `listener` until it fails; one task per client connection.
pub async fn serve(listener: Listener, upstream: Upstream) -> Result<(), Error> {
    loop {
        let client = listener.accept().await.map_err(|source| Error::File {
            path: "local proxy listener".into(),
            source,
        })?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_one(client, &upstream).await {
                tracing::warn!(%error, "local proxy: connection ended");
            }
        });
    }
}

/// One client connection, from its first byte to the end of the relay.
pub async fn serve_one(mut client: Connection, upstream: &Upstream) -> std::io::Result<()> {
    let mut first = [0u8; 8];
    let mut negotiations = 0;
    loop {
        client.read_exact(&mut first).await?;
        let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
        let length = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
        let negotiation = length == 8 && matches!(code, SSL_REQUEST_CODE | GSSENC_REQUEST_CODE);
        if !negotiation {
            break;
        }
        negotiations += 1;
        if negotiations > NEGOTIATIONS_MAX {
            return Err(std::io::Error::other("client keeps negotiating encryption"));
        }
        // No encryption between the client and us: we add TLS on the way out.
        client.write_all(b"N").await?;
    }
    let mut server = match tokio::time::timeout(DIAL_TIMEOUT, dial(upstream)).await {
        Ok(Ok(server)) => server,
        Ok(Err(error)) => {
            let message = format!(
                "postern proxy db: cannot reach the proxy at {}: {error}",
                upstream.addr
            );
            send_error(&mut client, &message).await;
            return Err(error);
        }
        Err(_) => {
            let message = format!(
                "postern proxy db: the proxy at {} did not answer within {} s",
                upstream.addr,
                DIAL_TIMEOUT.as_secs()
            );
            send_error(&mut client, &message).await;
            return Err(std::io::Error::other(message));
        }
    };
    server.write_all(&first).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// A TLS connection to the proxy, ready for the client's StartupMessage.
async fn dial(upstream: &Upstream) -> std::io::Result<tokio_rustls::client::TlsStream<Connection>> {
    let mut tcp = upstream.net.connect(&upstream.addr).await?;
    if upstream.ssl_request {
        let mut request = Vec::with_capacity(8);
        request.extend_from_slice(&8u32.to_be_bytes());
        request.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&request).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(std::io::Error::other(
                "the proxy does not offer TLS on this port",
            ));
        }
    }
    tokio_rustls::TlsConnector::from(Arc::clone(&upstream.tls))
        .connect(upstream.server_name.clone(), tcp)
        .await
}

/// A FATAL ErrorResponse, so the client shows `message` instead of "connection closed".
async fn send_error<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, message: &str) {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "08001"),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut frame = vec![b'E'];
    let length = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&body);
    let _ = stream.write_all(&frame).await;
    let _ = stream.flush().await;
}
