//! A client of the auth API, for proxies, agents and tools: JSON over HTTP/1.1 over
//! mutual TLS, on the runtime seam's network (so it also runs under turmoil).
//!
//! One connection per call (`Connection: close`): calls are rare (logins, certificate
//! renewals, announcements), and a fresh connection always presents the current
//! certificate.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use postern_pki::{CaKind, PrivateKey, TrustedCa};
use postern_rt::Net;
use rustls::time_provider::TimeProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;
use crate::api::{
    AnnounceRequest, CertResponse, DatabaseCertRequest, DbAccessRequest, DbClientRequest,
    ErrorBody, JoinRequest, KeepAliveRequest, ListedDatabaseResponse, LoginRequest, RenewRequest,
    RevisionResponse, RolesResponse, SshCertRequest, SshCertResponse, StoredResponse,
    WithdrawRequest,
};
use crate::audit::AuditEvent;
use crate::server::DatabaseServer;

/// Largest response read.
pub const RESPONSE_SIZE_MAX: usize = 1024 * 1024;
/// A call that takes longer fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Talks to one auth server.
#[derive(Clone)]
pub struct AuthClient {
    net: Net,
    addr: String,
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthClient")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl AuthClient {
    /// A client for the auth server at `addr` (`host:port`), which must present a
    /// certificate for `server_name` from one of `host_cas`. Without `credentials` only
    /// [`AuthClient::join`] is of use.
    pub fn new(
        net: Net,
        addr: &str,
        server_name: &str,
        host_cas: &[TrustedCa],
        credentials: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
        clock: Arc<dyn TimeProvider>,
    ) -> Result<Self, Error> {
        let tls = |error: rustls::Error| Error::invalid("tls configuration", error.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for ca in host_cas {
            roots.add(ca.der().clone()).map_err(tls)?;
        }
        let builder =
            rustls::ClientConfig::builder_with_details(postern_pki::tls::ring_provider(), clock)
                .with_safe_default_protocol_versions()
                .map_err(tls)?
                .with_root_certificates(roots);
        let config = match credentials {
            Some((cert, key)) => builder
                .with_client_auth_cert(vec![cert], key)
                .map_err(tls)?,
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|error| Error::invalid("server name", error.to_string()))?;
        Ok(Self {
            net,
            addr: addr.to_owned(),
            server_name,
            config: Arc::new(config),
        })
    }

    /// A client with a TLS configuration of the caller's making (a user's own roots and
    /// certificate, as `postern login` keeps them).
    pub fn from_tls_config(
        net: Net,
        addr: &str,
        server_name: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, Error> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|error| Error::invalid("server name", error.to_string()))?;
        Ok(Self {
            net,
            addr: addr.to_owned(),
            server_name,
            config,
        })
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    /// One request; the body of a 2xx answer.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, Error> {
        let exchange = async {
            let tcp = self
                .net
                .connect(&self.addr)
                .await
                .map_err(|error| self.unreachable(error))?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
            let mut tls = connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|error| self.unreachable(format!("TLS handshake: {error}")))?;
            let body = body.unwrap_or_default();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                self.server_name.to_str(),
                body.len()
            );
            let mut request = head.into_bytes();
            request.extend_from_slice(&body);
            tls.write_all(&request)
                .await
                .map_err(|error| self.unreachable(error))?;
            tls.flush().await.map_err(|error| self.unreachable(error))?;
            let mut response = Vec::new();
            let limit = u64::try_from(RESPONSE_SIZE_MAX + 1).unwrap_or(u64::MAX);
            (&mut tls)
                .take(limit)
                .read_to_end(&mut response)
                .await
                .map_err(|error| self.unreachable(error))?;
            Ok::<_, Error>(response)
        };
        let response = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                self.unreachable(format!("no answer within {} s", CALL_TIMEOUT.as_secs()))
            })??;
        if response.len() > RESPONSE_SIZE_MAX {
            return Err(self.unreachable(format!("response larger than {RESPONSE_SIZE_MAX} bytes")));
        }
        let (status, body) =
            parse_response(&response).map_err(|reason| self.unreachable(reason))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|body| body.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(Error::Remote { status, message });
        }
        Ok(body)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|error| Error::invalid("request", error.to_string()))?;
        let answer = self.call(method, path, body).await?;
        serde_json::from_slice(&answer)
            .map_err(|error| self.unreachable(format!("unexpected answer: {error}")))
    }

    async fn no_content(&self, path: &str, body: &impl Serialize) -> Result<(), Error> {
        let body = serde_json::to_vec(body)
            .map_err(|error| Error::invalid("request", error.to_string()))?;
        self.call("POST", path, Some(body)).await.map(|_| ())
    }

    /// Proxy: forwards a user's password login.
    pub async fn login(&self, request: &LoginRequest) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/login", Some(request)).await
    }

    /// A user without a certificate yet: password (and TOTP) login.
    pub async fn user_login(
        &self,
        request: &crate::api::UserLoginRequest,
    ) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/users/login", Some(request)).await
    }

    /// User: the databases the user's roles let them see.
    pub async fn databases(&self) -> Result<Vec<ListedDatabaseResponse>, Error> {
        self.json("GET", "/v1/databases", None::<&()>).await
    }

    /// User: a certificate routed to one database.
    pub async fn database_cert(
        &self,
        request: &DatabaseCertRequest,
    ) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/databases/certs", Some(request))
            .await
    }

    /// Proxy: a proxy→agent certificate for the user whose certificate it forwards.
    pub async fn db_access(&self, request: &DbAccessRequest) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/db-access", Some(request)).await
    }

    /// Agent: a certificate to present to a self-hosted database.
    pub async fn db_client(&self, request: &DbClientRequest) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/db-client", Some(request)).await
    }

    /// A new host: joins with a token, gets its host certificate.
    pub async fn join(&self, request: &JoinRequest) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/join", Some(request)).await
    }

    /// Proxy or agent: a fresh host certificate.
    pub async fn renew(&self, request: &RenewRequest) -> Result<CertResponse, Error> {
        self.json("POST", "/v1/hosts/renew", Some(request)).await
    }

    /// Proxy or agent: an SSH certificate for the reverse tunnel, for the host whose
    /// certificate this client presents.
    pub async fn ssh_cert(&self, request: &SshCertRequest) -> Result<SshCertResponse, Error> {
        self.json("POST", "/v1/hosts/ssh", Some(request)).await
    }

    /// Proxy or agent: every role, with a version that changes when any role does.
    pub async fn roles(&self) -> Result<RolesResponse, Error> {
        self.json("GET", "/v1/roles", None::<&()>).await
    }

    /// Agent: announces a database under a lease.
    pub async fn announce(&self, request: &AnnounceRequest) -> Result<RevisionResponse, Error> {
        self.json("POST", "/v1/registry/announce", Some(request))
            .await
    }

    /// Agent: extends an announcement's lease.
    pub async fn keep_alive(&self, request: &KeepAliveRequest) -> Result<(), Error> {
        self.no_content("/v1/registry/keepalive", request).await
    }

    /// Agent: withdraws an announcement.
    pub async fn withdraw(&self, request: &WithdrawRequest) -> Result<(), Error> {
        self.no_content("/v1/registry/withdraw", request).await
    }

    /// Proxy: the agents serving one database.
    pub async fn servers(&self, db_name: &str) -> Result<Vec<DatabaseServer>, Error> {
        let valid = !db_name.is_empty()
            && db_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            return Err(Error::invalid("database name", format!("{db_name:?}")));
        }
        self.json(
            "GET",
            &format!("/v1/registry/servers/{db_name}"),
            None::<&()>,
        )
        .await
    }

    /// Proxy or agent: stores audit events; returns how many were new.
    pub async fn emit_audit(&self, events: &[AuditEvent]) -> Result<usize, Error> {
        let stored: StoredResponse = self.json("POST", "/v1/audit/events", Some(&events)).await?;
        Ok(stored.stored)
    }

    /// Any cluster certificate: every trusted CA, as a PEM bundle.
    pub async fn cas(&self) -> Result<String, Error> {
        let body = self.call("GET", "/v1/cas", None).await?;
        String::from_utf8(body).map_err(|error| self.unreachable(error))
    }

    /// The user CAs the cluster trusts now: both while a rotation is in flight, the new
    /// one once it completed.
    pub async fn user_cas(&self) -> Result<Vec<TrustedCa>, String> {
        let bundle = self.cas().await.map_err(|error| error.to_string())?;
        let cas = TrustedCa::from_pem_bundle(&bundle).map_err(|error| error.to_string())?;
        Ok(cas
            .into_iter()
            .filter(|ca| ca.kind() == CaKind::User)
            .collect())
    }

    /// Polls [`AuthClient::user_cas`] every `period`, forever; when they differ from
    /// the set last applied (`known` at first), hands the new set to `apply`. A failed
    /// poll, an empty answer or a set `apply` refuses keeps the current set (and is
    /// tried again at the next poll).
    pub async fn follow_user_cas(
        &self,
        mut known: Vec<TrustedCa>,
        period: Duration,
        mut apply: impl FnMut(&[TrustedCa]) -> Result<(), String>,
    ) {
        let ders = |cas: &[TrustedCa]| -> Vec<Vec<u8>> {
            cas.iter().map(|ca| ca.der().to_vec()).collect()
        };
        loop {
            tokio::time::sleep(period).await;
            let user = match self.user_cas().await {
                Ok(user) => user,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the cluster's CAs; keeping the current ones");
                    continue;
                }
            };
            if user.is_empty() || ders(&user) == ders(&known) {
                continue;
            }
            match apply(&user) {
                Ok(()) => {
                    tracing::info!(count = user.len(), "user CAs changed; followed");
                    known = user;
                }
                Err(error) => tracing::warn!(%error, "cannot trust the new user CAs"),
            }
        }
    }

    /// Proxy: a proxy→agent certificate carrying the identity of `user_cert_der` (a user
    /// certificate the proxy verified), for a key generated here (`POST /v1/db-access`).
    pub async fn db_access_cert(
        &self,
        user_cert_der: &[u8],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let key = PrivateKey::generate().map_err(|error| error.to_string())?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let answer = self
            .db_access(&DbAccessRequest {
                user_cert: b64.encode(user_cert_der),
                public_key: b64.encode(key.public_key().der()),
            })
            .await
            .map_err(|error| error.to_string())?;
        let chain = CertificateDer::pem_slice_iter(answer.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("certificate from auth: {error}"))?;
        if chain.is_empty() {
            return Err("the auth service answered without a certificate".to_owned());
        }
        Ok((chain, key.to_rustls()))
    }
}

/// Splits an HTTP/1.1 response into status and body (plain or chunked).
fn parse_response(response: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("response without a header end")?;
    let head =
        std::str::from_utf8(&response[..split]).map_err(|_| "response header is not UTF-8")?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name == "content-length" {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad content-length {value:?}"))?,
            );
        }
    }
    if chunked {
        return Ok((status, dechunk(body)?));
    }
    match length {
        Some(length) if length <= body.len() => Ok((status, body[..length].to_vec())),
        Some(length) => Err(format!("body cut short: {} of {length} bytes", body.len())),
        None => Ok((status, body.to_vec())),
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line cut short")?;
        let size_text =
            std::str::from_utf8(&body[..line_end]).map_err(|_| "chunk size is not text")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("chunk cut short".to_owned());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Plain, chunked and truncated responses parse (or fail) as HTTP/1.1 says.
    #[test]
    fn parses_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
        assert_eq!(parse_response(plain).unwrap(), (200, b"hi".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, b"hello".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 xyz\r\n\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
