//! A proxy's configuration from the auth server, once it holds its host certificate:
//! every CA the cluster trusts, sorted by kind, and an SSH certificate for the tunnel
//! port. `postern start` and the simulator both build their proxies with
//! [`configure_from_auth`]; how the host certificate was earned (a join token, a saved
//! or renewed certificate, the auth server in the same process) stays theirs.
//!
//! ```text
//! host cert + key ─► AuthClient ─► GET /v1/cas ─► user CAs, host CAs
//!                               ─► new SSH key ─► POST /v1/ssh-cert ─► SSH cert, host CA SSH keys
//!                 ─► ProxyServiceConfig (with the caller's listeners and limits)
//! ```

use std::sync::Arc;

use postern_auth::api::SshCertRequest;
use postern_auth::client::AuthClient;
use postern_pki::ssh::ssh_key;
use postern_pki::{CaKind, IssuedCert, PrivateKey, TrustedCa};
use postern_rt::Runtime;

use crate::service::{Listen, ProxyError, ProxyLimits, ProxyServiceConfig};

/// Where the auth API is, and how to trust it.
#[derive(Clone, Copy, Debug)]
pub struct AuthApi<'a> {
    /// `host:port`.
    pub addr: &'a str,
    /// The name on the auth server's certificate.
    pub server_name: &'a str,
    /// The host CAs the auth server's certificate must chain to.
    pub cas: &'a [TrustedCa],
}

/// What the caller of [`configure_from_auth`] decides; the rest of the
/// [`ProxyServiceConfig`] comes from the auth server.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub cluster: String,
    pub listen: Listen,
    pub auth_api_addr: Option<String>,
    pub limits: ProxyLimits,
}

/// A proxy ready to be made a [`crate::ProxyService`]: its configuration, and its client
/// of the auth API (authenticated by its host certificate), to sign proxy→agent
/// certificates with and to follow CA rotations by
/// ([`AuthClient::follow_user_cas`], from `config.user_cas`).
#[derive(Debug)]
pub struct FromAuth {
    pub config: ProxyServiceConfig,
    pub auth: AuthClient,
}

/// Connects to the auth API `api` with the host certificate `host_cert` and its key,
/// reads every CA the cluster trusts now (both of a kind while one rotates) and gets an
/// SSH certificate for a new key: the proxy's configuration from those and `settings`.
pub async fn configure_from_auth(
    runtime: &Runtime,
    api: AuthApi<'_>,
    host_cert: IssuedCert,
    host_key: PrivateKey,
    settings: ProxySettings,
) -> Result<FromAuth, ProxyError> {
    let auth = AuthClient::new(
        *runtime.net(),
        api.addr,
        api.server_name,
        api.cas,
        Some((host_cert.der().clone(), host_key.to_rustls())),
        Arc::new(runtime.clock().clone()),
    )
    .map_err(failed("a client of its API"))?;
    let cas = auth.cas().await.map_err(failed("the cluster's CAs"))?;
    let trusted = TrustedCa::from_pem_bundle(&cas).map_err(failed("the cluster's CAs"))?;
    let ssh_key = postern_pki::ssh::generate_ssh_key().map_err(failed("an SSH key"))?;
    let public_key = ssh_key
        .public_key()
        .to_openssh()
        .map_err(failed("an SSH key"))?;
    let ssh = auth
        .ssh_cert(&SshCertRequest { public_key })
        .await
        .map_err(failed("an SSH certificate"))?;
    let ssh_cert =
        ssh_key::Certificate::from_openssh(&ssh.cert).map_err(failed("an SSH certificate"))?;
    let host_ca_ssh_keys = ssh
        .host_ca_keys
        .iter()
        .map(|key| ssh_key::PublicKey::from_openssh(key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed("the host CAs' SSH keys"))?;
    let of_kind = |kind: CaKind| -> Vec<TrustedCa> {
        trusted
            .iter()
            .filter(|ca| ca.kind() == kind)
            .cloned()
            .collect()
    };
    let ProxySettings {
        cluster,
        listen,
        auth_api_addr,
        limits,
    } = settings;
    let config = ProxyServiceConfig {
        cluster,
        listen,
        auth_api_addr,
        host_cert,
        host_key,
        ssh_key,
        ssh_cert,
        user_cas: of_kind(CaKind::User),
        host_cas: of_kind(CaKind::Host),
        host_ca_ssh_keys,
        limits,
    };
    Ok(FromAuth { config, auth })
}

/// Maps an error of the step that gets `what` to [`ProxyError::Auth`].
fn failed<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> ProxyError {
    move |error| ProxyError::Auth {
        what,
        reason: error.to_string(),
    }
}
