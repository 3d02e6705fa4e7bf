//! The host identity of a proxy or agent whose auth server runs in another process:
//! earned once with a join token, kept under `data_dir`, renewed at start when it nears
//! expiry.
//!
//! At start, with `DIR/host.crt` and `DIR/host.key` saved:
//! - valid for longer than [`RENEW_BEFORE`]: used as is (the token is not needed again);
//! - valid, but for less: renewed (`POST /v1/hosts/renew` authenticated by the saved
//!   certificate), and the new one saved;
//! - expired, unreadable or absent: joined with the configured token (single use), and
//!   saved.
//!
//! Until the auth server answers the first call, it is retried with backoff (it may be
//! starting too), until shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use postern_auth::api::{JoinRequest, RenewRequest};
use postern_auth::client::AuthClient;
use postern_auth::server::TokenKind;
use postern_pki::{IssuedCert, PrivateKey, TrustedCa, UnixTime};
use postern_rt::Runtime;

use super::BoxError;

/// A saved certificate with less than this left is renewed at start. Host certificates
/// live 30 days (`postern_auth::signing::HOST_CERT_TTL`): a third of that.
pub(crate) const RENEW_BEFORE: Duration = Duration::from_secs(10 * 24 * 3600);
/// Backoff while the auth server does not answer.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

const CERT_FILE: &str = "host.crt";
const KEY_FILE: &str = "host.key";

/// How to reach and trust the remote auth server, and who this host is.
pub(crate) struct Remote<'a> {
    /// The config section, for messages: `proxy` or `db`.
    pub(crate) section: &'static str,
    pub(crate) kind: TokenKind,
    pub(crate) host_id: &'a str,
    /// Names for the certificate (the proxy's public name; the agent's host id).
    pub(crate) names: Vec<String>,
    pub(crate) auth_addr: &'a str,
    pub(crate) auth_server_name: &'a str,
    pub(crate) auth_cas: &'a [TrustedCa],
    pub(crate) join_token: Option<&'a str>,
    /// Where the certificate and key are kept.
    pub(crate) dir: PathBuf,
}

/// What to do with what is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    Reuse,
    Renew,
    Join,
}

/// The plan for a saved certificate (or none) at `now`.
pub(crate) fn plan(saved: Option<&IssuedCert>, now: UnixTime) -> Plan {
    let Some(cert) = saved else {
        return Plan::Join;
    };
    let now = now.as_secs();
    let (not_before, not_after) = (cert.not_before().as_secs(), cert.not_after().as_secs());
    if now < not_before || now >= not_after {
        Plan::Join
    } else if not_after - now > RENEW_BEFORE.as_secs() {
        Plan::Reuse
    } else {
        Plan::Renew
    }
}

/// The host certificate and key: saved, renewed or joined (see the module's comment).
pub(crate) async fn obtain(
    runtime: &Runtime,
    remote: &Remote<'_>,
) -> Result<(IssuedCert, PrivateKey), BoxError> {
    let saved = read_saved(&remote.dir);
    let saved_cert = saved.as_ref().map(|(cert, _)| cert);
    let step = plan(saved_cert, runtime.clock().now());
    match (step, saved) {
        (Plan::Reuse, Some((cert, key))) => {
            tracing::info!(
                section = remote.section,
                dir = %remote.dir.display(),
                "using the saved host certificate"
            );
            Ok((cert, key))
        }
        (Plan::Renew, Some((cert, key))) => {
            tracing::info!(section = remote.section, "renewing the host certificate");
            let client = client(runtime, remote, Some((&cert, &key)))?;
            let new_key = PrivateKey::generate()?;
            let request = RenewRequest {
                public_key: public_key_b64(&new_key),
            };
            let answer = retry(runtime, remote, || client.renew(&request)).await?;
            save(remote, &answer.cert, new_key)
        }
        _ => {
            let Some(token) = remote.join_token else {
                return Err(format!(
                    "{}: no valid host certificate under {} and no {}.join_token to get one: create a token with `postern admin tokens add --type {}` and set join_token",
                    remote.section,
                    remote.dir.display(),
                    remote.section,
                    token_type(remote.kind),
                )
                .into());
            };
            tracing::info!(
                section = remote.section,
                auth = remote.auth_addr,
                "joining the cluster with the join token"
            );
            let client = client(runtime, remote, None)?;
            let key = PrivateKey::generate()?;
            let request = JoinRequest {
                token: token.to_owned(),
                kind: remote.kind,
                host_id: remote.host_id.to_owned(),
                names: remote.names.clone(),
                public_key: public_key_b64(&key),
            };
            let answer = retry(runtime, remote, || client.join(&request))
                .await
                .map_err(|error| -> BoxError {
                    format!(
                        "{}: joining {} failed: {error}; a join token works once and expires: create another with `postern admin tokens add --type {}`",
                        remote.section,
                        remote.auth_addr,
                        token_type(remote.kind)
                    )
                    .into()
                })?;
            save(remote, &answer.cert, key)
        }
    }
}

fn token_type(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Proxy => "proxy",
        TokenKind::Db => "db",
    }
}

fn public_key_b64(key: &PrivateKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.public_key().der())
}

fn client(
    runtime: &Runtime,
    remote: &Remote<'_>,
    credentials: Option<(&IssuedCert, &PrivateKey)>,
) -> Result<AuthClient, BoxError> {
    Ok(AuthClient::new(
        *runtime.net(),
        remote.auth_addr,
        remote.auth_server_name,
        remote.auth_cas,
        credentials.map(|(cert, key)| (cert.der().clone(), key.to_rustls())),
        Arc::new(runtime.clock().clone()),
    )?)
}

/// Calls `call` until the auth server answers (an answer that is an error ends it too).
async fn retry<T, F, Fut>(
    runtime: &Runtime,
    remote: &Remote<'_>,
    mut call: F,
) -> Result<T, postern_auth::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, postern_auth::Error>>,
{
    let mut delay = RETRY_MIN;
    loop {
        match call().await {
            Err(postern_auth::Error::Unreachable { addr, reason }) => {
                tracing::warn!(
                    section = remote.section,
                    %addr,
                    %reason,
                    retry_in = ?delay,
                    "auth service unreachable"
                );
            }
            result => return result,
        }
        tokio::time::sleep(runtime.rng().jitter(delay, 200)).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// The saved certificate and key, if both read and parse.
fn read_saved(dir: &Path) -> Option<(IssuedCert, PrivateKey)> {
    let cert = std::fs::read_to_string(dir.join(CERT_FILE)).ok()?;
    let key = std::fs::read_to_string(dir.join(KEY_FILE)).ok()?;
    let cert = IssuedCert::from_pem(&cert)
        .inspect_err(|error| tracing::warn!(%error, dir = %dir.display(), "saved host certificate unreadable; joining again"))
        .ok()?;
    let key = PrivateKey::from_pem(&key)
        .inspect_err(|error| tracing::warn!(%error, dir = %dir.display(), "saved host key unreadable; joining again"))
        .ok()?;
    Some((cert, key))
}

/// Saves the certificate auth returned with its key (key first, owner-only; each file
/// written aside and renamed into place, so a crash leaves the old pair or the new).
fn save(
    remote: &Remote<'_>,
    cert_pem: &str,
    key: PrivateKey,
) -> Result<(IssuedCert, PrivateKey), BoxError> {
    let cert = IssuedCert::from_pem(cert_pem)
        .map_err(|error| format!("{}: the auth service returned {error}", remote.section))?;
    let dir = &remote.dir;
    let storage = |error: std::io::Error| {
        format!(
            "{}: cannot save under {}: {error}",
            remote.section,
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(storage)?;
    write_atomic(&dir.join(KEY_FILE), key.to_pem().as_bytes(), 0o600).map_err(storage)?;
    write_atomic(&dir.join(CERT_FILE), cert.to_pem().as_bytes(), 0o644).map_err(storage)?;
    tracing::info!(
        section = remote.section,
        dir = %dir.display(),
        "host certificate saved"
    );
    Ok((cert, key))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let aside = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&aside)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_pki::{CertAuthority, HostIdentity, HostRole};

    const DAY: u64 = 24 * 3600;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    fn cert(issued: u64, ttl_days: u64) -> IssuedCert {
        let ca = CertAuthority::generate(
            postern_pki::CaKind::Host,
            "c",
            at(issued - DAY),
            Duration::from_secs(3650 * DAY),
        )
        .unwrap();
        let key = PrivateKey::generate().unwrap();
        let host = HostIdentity {
            host_id: "proxy-1".to_owned(),
            role: HostRole::Proxy,
            cluster: "c".to_owned(),
            names: vec!["localhost".to_owned()],
            expires: at(issued + ttl_days * DAY),
        };
        ca.issue_host(&host, &key.public_key(), at(issued)).unwrap()
    }

    // Goal: a fresh certificate is reused, one near expiry renewed, an expired or absent
    // one (or one from the future) joined again.
    #[test]
    fn plan_follows_the_time_left() {
        const T0: u64 = 1_795_478_400;
        let saved = cert(T0, 30);
        assert_eq!(plan(None, at(T0)), Plan::Join);
        assert_eq!(plan(Some(&saved), at(T0)), Plan::Reuse);
        assert_eq!(plan(Some(&saved), at(T0 + 19 * DAY)), Plan::Reuse);
        assert_eq!(plan(Some(&saved), at(T0 + 21 * DAY)), Plan::Renew);
        assert_eq!(plan(Some(&saved), at(T0 + 30 * DAY - 1)), Plan::Renew);
        assert_eq!(plan(Some(&saved), at(T0 + 30 * DAY)), Plan::Join);
        assert_eq!(plan(Some(&saved), at(T0 - 3600)), Plan::Join);
    }
}
