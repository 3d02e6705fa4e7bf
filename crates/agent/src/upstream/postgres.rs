//! Connecting to PostgreSQL as the database user of a session.
//!
//! ```text
//! TCP ─► SSLRequest ─► 'S' ─► TLS (verify-full, client cert CN = db user)
//!     ─► StartupMessage ─► Authentication{Ok | CleartextPassword ─► token}
//!     ─► ParameterStatus*, BackendKeyData ─► ReadyForQuery
//! ```
//!
//! The messages from AuthenticationOk to ReadyForQuery are kept as raw bytes for the
//! agent to hand to the client, which then sees the database's real parameters and key.

use std::io;
use std::time::Duration;

use postern_pg::backend::{Authentication, BackendMessage, Fields};
use postern_pg::frontend::{FrontendMessage, ProtocolVersion, StartupMessage, StartupRequest};
use postern_pg::{Limits, StartupParams};
use postern_rt::{Connection, Net};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{TlsConfigError, UpstreamTls};

/// How long connecting and authenticating to the database may take.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);

/// Most bytes of start-up messages (parameters, key, notices) kept for the client.
pub const GREETING_LEN_MAX: usize = 64 * 1024;

/// How the agent proves who it is to the database.
#[non_exhaustive]
pub enum Credential {
    /// A client certificate whose CN is the database user (self-hosted databases).
    ClientCert {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
    /// A password sent in cleartext over TLS when asked: an RDS/Aurora IAM auth token.
    Password(String),
}

impl Clone for Credential {
    fn clone(&self) -> Self {
        match self {
            Credential::ClientCert { chain, key } => Credential::ClientCert {
                chain: chain.clone(),
                key: key.clone_key(),
            },
            Credential::Password(password) => Credential::Password(password.clone()),
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::ClientCert { .. } => f.write_str("ClientCert"),
            Credential::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

/// A database session the agent opened, authenticated and ready for queries.
#[derive(Debug)]
pub struct Upstream {
    /// The TLS stream to the database.
    pub stream: TlsStream<Connection>,
    /// ParameterStatus, BackendKeyData, NoticeResponse and the ReadyForQuery that ended
    /// start-up, as the database sent them (AuthenticationOk first), to pass to the client.
    pub greeting: Vec<u8>,
    /// The database's key for CancelRequests of this session.
    pub backend_key: Option<(i32, Vec<u8>)>,
    /// Bytes the database sent after ReadyForQuery, already read.
    pub pending: Vec<u8>,
}

/// Why the agent could not open a session on the database. Each says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    #[error("cannot reach the database at {addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("the database at {addr} did not finish connecting within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error(
        "the database at {addr} does not offer TLS; Postern never connects in plaintext: set \
         `ssl = on` with the certificate from `postern admin auth sign --format db`"
    )]
    NoTls { addr: String },
    #[error("{0}")]
    TlsConfig(#[from] TlsConfigError),
    #[error("TLS with the database at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("the database refused the session: {message} (SQLSTATE {code})")]
    Refused {
        code: String,
        message: String,
        hint: Option<String>,
    },
    #[error(
        "the database at {addr} asked for a password, but Postern authenticates to \
         self-hosted databases with a client certificate: add `hostssl all all 0.0.0.0/0 \
         cert` (and `::/0`) to pg_hba.conf"
    )]
    PasswordRequested { addr: String },
    #[error(
        "the database at {addr} asked for {method} authentication, which Postern does not use; configure `cert` (self-hosted) or IAM (RDS) for this user"
    )]
    UnsupportedAuth { addr: String, method: &'static str },
    #[error("the database at {addr} broke the protocol: {source}")]
    Protocol {
        addr: String,
        source: postern_pg::Error,
    },
    #[error("the database at {addr} closed the connection during start-up")]
    Closed { addr: String },
    #[error("the database at {addr} sent more than {GREETING_LEN_MAX} bytes before it was ready")]
    GreetingTooLarge { addr: String },
}

/// Where a PostgreSQL database is and how to reach it.
#[derive(Clone, Debug)]
pub struct PostgresTarget {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
}

impl PostgresTarget {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Opens a session as `params.user` on `params.database`, forwarding the client's
    /// other start-up parameters (application_name, options, client_encoding, ...).
    pub async fn connect(
        &self,
        net: &Net,
        credential: Credential,
        params: &StartupParams,
        limits: &Limits,
        timeout: Duration,
    ) -> Result<Upstream, UpstreamError> {
        let addr = self.addr();
        match tokio::time::timeout(timeout, self.connect_inner(net, credential, params, limits))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout { addr, timeout }),
        }
    }

    async fn connect_inner(
        &self,
        net: &Net,
        credential: Credential,
        params: &StartupParams,
        limits: &Limits,
    ) -> Result<Upstream, UpstreamError> {
        let addr = self.addr();
        let mut conn = net
            .connect(&addr)
            .await
            .map_err(|source| UpstreamError::Unreachable {
                addr: addr.clone(),
                source,
            })?;
        let io_err = |source: io::Error| UpstreamError::Unreachable {
            addr: addr.clone(),
            source,
        };

        let mut request = Vec::new();
        encode_startup(&StartupRequest::Ssl, &mut request, &addr)?;
        conn.write_all(&request).await.map_err(io_err)?;
        let mut answer = [0u8; 1];
        conn.read_exact(&mut answer).await.map_err(io_err)?;
        if answer[0] != b'S' {
            return Err(UpstreamError::NoTls { addr });
        }

        let (client_cert, password) = match credential {
            Credential::ClientCert { chain, key } => (Some((chain, key)), None),
            Credential::Password(password) => (None, Some(password)),
        };
        let config = self.tls.client_config(client_cert)?;
        let server_name = self.tls.server_name(&self.host)?;
        let mut tls = TlsConnector::from(config)
            .connect(server_name, conn)
            .await
            .map_err(|e| UpstreamError::Tls {
                addr: addr.clone(),
                reason: explain_tls(&e),
            })?;

        let mut parameters = vec![
            (b"user".to_vec(), params.user.as_bytes().to_vec()),
            (b"database".to_vec(), params.database.as_bytes().to_vec()),
        ];
        for (name, value) in [
            ("application_name", &params.application_name),
            ("options", &params.options),
        ] {
            if let Some(value) = value {
                parameters.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
            }
        }
        for (name, value) in &params.other {
            parameters.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        let startup = StartupRequest::Startup(StartupMessage {
            version: ProtocolVersion::V3_0,
            parameters,
        });
        let mut out = Vec::new();
        encode_startup(&startup, &mut out, &addr)?;
        tls.write_all(&out)
            .await
            .map_err(|source| UpstreamError::Unreachable {
                addr: addr.clone(),
                source,
            })?;
        tls.flush()
            .await
            .map_err(|source| UpstreamError::Unreachable {
                addr: addr.clone(),
                source,
            })?;

        let mut buf = Vec::new();
        let mut greeting = Vec::new();
        let mut backend_key = None;
        let mut password = password;
        loop {
            let Some((message, used)) =
                BackendMessage::decode_from(&buf, limits).map_err(|source| {
                    UpstreamError::Protocol {
                        addr: addr.clone(),
                        source,
                    }
                })?
            else {
                if buf.len() > GREETING_LEN_MAX {
                    return Err(UpstreamError::GreetingTooLarge { addr });
                }
                let n =
                    tls.read_buf(&mut buf)
                        .await
                        .map_err(|source| UpstreamError::Unreachable {
                            addr: addr.clone(),
                            source,
                        })?;
                if n == 0 {
                    return Err(UpstreamError::Closed { addr });
                }
                continue;
            };
            let raw = buf[..used].to_vec();
            buf.drain(..used);
            match message {
                BackendMessage::Authentication(Authentication::Ok) => {
                    greeting.extend_from_slice(&raw)
                }
                BackendMessage::Authentication(Authentication::CleartextPassword) => {
                    let Some(token) = password.take() else {
                        return Err(UpstreamError::PasswordRequested { addr });
                    };
                    let mut body = token.into_bytes();
                    body.push(0);
                    let mut out = Vec::new();
                    FrontendMessage::AuthenticationResponse(body)
                        .encode(&mut out)
                        .map_err(|source| UpstreamError::Protocol {
                            addr: addr.clone(),
                            source,
                        })?;
                    tls.write_all(&out)
                        .await
                        .map_err(|source| UpstreamError::Unreachable {
                            addr: addr.clone(),
                            source,
                        })?;
                    tls.flush()
                        .await
                        .map_err(|source| UpstreamError::Unreachable {
                            addr: addr.clone(),
                            source,
                        })?;
                }
                BackendMessage::Authentication(other) => {
                    let method = match other {
                        Authentication::Md5Password { .. } => "MD5 password",
                        Authentication::Sasl { .. } | Authentication::SaslContinue(_) => {
                            "SCRAM (SASL) password"
                        }
                        Authentication::Gss | Authentication::GssContinue(_) => "GSSAPI",
                        Authentication::Sspi => "SSPI",
                        Authentication::KerberosV5 => "Kerberos V5",
                        _ => "an unknown",
                    };
                    return Err(UpstreamError::UnsupportedAuth { addr, method });
                }
                BackendMessage::ErrorResponse(fields) => return Err(refused(&fields)),
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                } => {
                    backend_key = Some((process_id, secret_key));
                    greeting.extend_from_slice(&raw);
                }
                BackendMessage::ReadyForQuery(_) => {
                    greeting.extend_from_slice(&raw);
                    return Ok(Upstream {
                        stream: tls,
                        greeting,
                        backend_key,
                        pending: buf,
                    });
                }
                // ParameterStatus, NoticeResponse, NegotiateProtocolVersion: for the client.
                _ => greeting.extend_from_slice(&raw),
            }
            if greeting.len() > GREETING_LEN_MAX {
                return Err(UpstreamError::GreetingTooLarge { addr });
            }
        }
    }
}

impl PostgresTarget {
    /// Sends a CancelRequest for one of this database's sessions, the way sessions
    /// connect: SSLRequest, TLS checked as configured (no client certificate: PostgreSQL
    /// checks only the key), then the 16-byte request inside TLS. Never in plaintext.
    /// Returns once the database closed the connection (it answers nothing) or after
    /// `timeout`.
    pub async fn cancel(
        &self,
        net: &Net,
        request: &postern_pg::frontend::CancelRequest,
        timeout: Duration,
    ) -> Result<(), UpstreamError> {
        let addr = self.addr();
        match tokio::time::timeout(timeout, self.cancel_inner(net, request)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout { addr, timeout }),
        }
    }

    async fn cancel_inner(
        &self,
        net: &Net,
        request: &postern_pg::frontend::CancelRequest,
    ) -> Result<(), UpstreamError> {
        let addr = self.addr();
        let io_err = |source: io::Error| UpstreamError::Unreachable {
            addr: addr.clone(),
            source,
        };
        let mut conn = net.connect(&addr).await.map_err(io_err)?;
        let mut out = Vec::new();
        encode_startup(&StartupRequest::Ssl, &mut out, &addr)?;
        conn.write_all(&out).await.map_err(io_err)?;
        let mut answer = [0u8; 1];
        conn.read_exact(&mut answer).await.map_err(io_err)?;
        if answer[0] != b'S' {
            return Err(UpstreamError::NoTls { addr });
        }
        let config = self.tls.client_config(None)?;
        let server_name = self.tls.server_name(&self.host)?;
        let mut tls = TlsConnector::from(config)
            .connect(server_name, conn)
            .await
            .map_err(|e| UpstreamError::Tls {
                addr: addr.clone(),
                reason: explain_tls(&e),
            })?;
        out.clear();
        encode_startup(&StartupRequest::Cancel(request.clone()), &mut out, &addr)?;
        tls.write_all(&out).await.map_err(io_err)?;
        tls.flush().await.map_err(io_err)?;
        // PostgreSQL answers nothing and closes; wait for that so the request is read
        // before this side goes away. A reset after the request is as good as a close.
        let mut sink = [0u8; 64];
        while let Ok(n) = tls.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        Ok(())
    }
}

fn encode_startup(
    request: &StartupRequest,
    out: &mut Vec<u8>,
    addr: &str,
) -> Result<(), UpstreamError> {
    request
        .encode(out)
        .map_err(|source| UpstreamError::Protocol {
            addr: addr.to_owned(),
            source,
        })
}

fn refused(fields: &Fields) -> UpstreamError {
    let text = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
    UpstreamError::Refused {
        code: text(fields.code()).unwrap_or_default(),
        message: text(fields.message()).unwrap_or_else(|| "no message".to_owned()),
        hint: text(fields.get(postern_pg::backend::field::HINT)),
    }
}

/// A TLS failure in words an operator can act on.
fn explain_tls(error: &io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(rustls_error) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return error.to_string();
    };
    match rustls_error {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the database's certificate is not signed by the configured CA (`ca_cert_file`); for a self-hosted database use the files from `postern admin auth sign --format db`".to_owned()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the database's certificate does not name the host the agent connects to; re-issue it with `postern admin auth sign --format db --host <that name>` or set `tls.server_name`".to_owned()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the database's certificate has expired; re-issue it with `postern admin auth sign --format db`".to_owned()
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the database refused the TLS handshake ({alert:?}); check that its `ssl_ca_file` trusts Postern's database CA")
        }
        other => other.to_string(),
    }
}
