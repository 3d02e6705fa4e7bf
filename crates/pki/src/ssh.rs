//! SSH certificates for the reverse tunnel, issued by the host CA.
//!
//! The types are `ssh-key`'s, the exact version russh 0.65 re-exports as
//! `russh::keys::ssh_key`, so a certificate made here goes straight into russh.
//!
//! - A **proxy** is the SSH server of the tunnel: it presents an SSH *host* certificate.
//! - An **agent** dials out and authenticates with an SSH *user* certificate.
//!
//! Both carry the host id as key id and principal, plus two extensions:
//! `role@postern` (`proxy`/`agent`/`auth`) and `cluster@postern`. russh checks
//! certificate validity against the real system clock; [`verify_ssh_cert`] is the check
//! against the injected `now` that services must run in their auth handlers. Because
//! russh also checks the real clock, a simulation must issue tunnel certificates whose
//! window (`now` − [`NOT_BEFORE_BACKDATE`](crate::NOT_BEFORE_BACKDATE) to
//! `host.expires`) covers the real time as well as the simulated one.

use rustls_pki_types::UnixTime;
pub use ssh_key;
use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{Certificate, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::ca::{CertAuthority, from_secs};
use crate::error::Error;
use crate::identity::{CaKind, HostIdentity, HostRole};

/// SSH certificate extension naming the host's role.
pub const EXT_ROLE: &str = "role@postern";
/// SSH certificate extension naming the cluster.
pub const EXT_CLUSTER: &str = "cluster@postern";

/// Generates the host CA's Ed25519 SSH key.
pub(crate) fn generate_ca_key() -> Result<PrivateKey, Error> {
    generate_ssh_key()
}

/// Generates an Ed25519 SSH key (for a proxy's or an agent's tunnel identity); the seed
/// comes from the OS through ring.
pub fn generate_ssh_key() -> Result<PrivateKey, Error> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).map_err(|_| {
        Error::KeyGeneration {
            reason: "the OS random source failed".into(),
        }
    })?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

pub(crate) fn load_ca_key(openssh: &str) -> Result<PrivateKey, Error> {
    PrivateKey::from_openssh(openssh).map_err(|e| Error::Load {
        what: "CA SSH key",
        reason: e.to_string(),
    })
}

pub(crate) fn ca_key_to_openssh(key: &PrivateKey) -> Result<String, Error> {
    key.to_openssh(LineEnding::LF)
        .map(|s| s.to_string())
        .map_err(|e| Error::Signing {
            reason: e.to_string(),
        })
}

/// What an SSH certificate must be to pass [`verify_ssh_cert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SshExpectation<'a> {
    /// Host certificate (proxy side) or user certificate (agent side).
    pub cert_type: CertType,
    /// The role the peer must have.
    pub role: HostRole,
    /// A principal that must be listed (e.g. the host id the peer claims).
    pub principal: &'a str,
}

/// An SSH certificate that passed [`verify_ssh_cert`]. Only that function makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSshCert {
    key_id: String,
    role: HostRole,
    cluster: String,
    principals: Vec<String>,
    valid_before: UnixTime,
}

impl VerifiedSshCert {
    /// The host id the certificate was issued to.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The host's role.
    pub fn role(&self) -> HostRole {
        self.role
    }

    /// The host's cluster.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Principals the certificate is valid for.
    pub fn principals(&self) -> &[String] {
        &self.principals
    }

    /// When it stops being valid.
    pub fn valid_before(&self) -> UnixTime {
        self.valid_before
    }
}

impl CertAuthority {
    /// The host CA's SSH public key, for `known_hosts`-style trust (`@cert-authority`)
    /// and for [`verify_ssh_cert`]. `None` for the user and database CAs.
    pub fn ssh_public_key(&self) -> Option<PublicKey> {
        self.ssh_key.as_ref().map(|k| k.public_key().clone())
    }

    /// Issues the SSH host certificate a proxy presents as the tunnel's SSH server.
    pub fn issue_ssh_host_cert(
        &self,
        host: &HostIdentity,
        key: &PublicKey,
        now: UnixTime,
    ) -> Result<Certificate, Error> {
        self.issue_ssh(host, CertType::Host, key, now)
    }

    /// Issues the SSH user certificate an agent authenticates to proxies with.
    pub fn issue_ssh_user_cert(
        &self,
        host: &HostIdentity,
        key: &PublicKey,
        now: UnixTime,
    ) -> Result<Certificate, Error> {
        self.issue_ssh(host, CertType::User, key, now)
    }

    fn issue_ssh(
        &self,
        host: &HostIdentity,
        cert_type: CertType,
        key: &PublicKey,
        now: UnixTime,
    ) -> Result<Certificate, Error> {
        let ca_key = self.ssh_key.as_ref().ok_or(Error::WrongCaKind {
            expected: CaKind::Host,
            actual: self.kind(),
        })?;
        crate::identity::check_host(host).map_err(|(field, reason)| Error::InvalidRequest {
            field: field.name(),
            reason,
        })?;
        self.same_cluster(&host.cluster)?;
        let valid_after = now
            .as_secs()
            .saturating_sub(crate::ca::NOT_BEFORE_BACKDATE.as_secs());
        let valid_before = host.expires.as_secs();
        if valid_before <= now.as_secs() {
            return Err(Error::InvalidRequest {
                field: "expiry",
                reason: "is not after now".into(),
            });
        }
        let signing = |e: ssh_key::Error| Error::Signing {
            reason: e.to_string(),
        };
        // Deterministic nonce and serial: a hash of what makes this certificate unique.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&key.to_bytes().map_err(signing)?);
        ctx.update(&valid_after.to_be_bytes());
        ctx.update(&valid_before.to_be_bytes());
        ctx.update(host.host_id.as_bytes());
        ctx.update(&[u8::from(cert_type == CertType::Host)]);
        let digest = ctx.finish();
        let nonce = digest.as_ref().to_vec();
        let mut serial = [0u8; 8];
        serial.copy_from_slice(&nonce[..8]);

        let mut builder = Builder::new(nonce, key.key_data().clone(), valid_after, valid_before)
            .map_err(signing)?;
        builder
            .serial(u64::from_be_bytes(serial))
            .map_err(signing)?
            .cert_type(cert_type)
            .map_err(signing)?
            .key_id(host.host_id.clone())
            .map_err(signing)?
            .valid_principal(host.host_id.clone())
            .map_err(signing)?;
        for name in &host.names {
            if *name != host.host_id {
                builder.valid_principal(name.clone()).map_err(signing)?;
            }
        }
        builder
            .extension(EXT_ROLE, host.role.as_str())
            .map_err(signing)?
            .extension(EXT_CLUSTER, host.cluster.clone())
            .map_err(signing)?;
        builder.sign(ca_key).map_err(signing)
    }
}

/// Validates a tunnel SSH certificate against the trusted host CA keys (several during
/// a rotation) at the injected `now`. Checks: no critical options; signed by a trusted
/// CA key; `valid_after <= now < valid_before`; signature; certificate type; role and
/// cluster extensions; the expected principal.
pub fn verify_ssh_cert(
    cert: &Certificate,
    expected: SshExpectation<'_>,
    trusted_ca_keys: &[PublicKey],
    now: UnixTime,
) -> Result<VerifiedSshCert, Error> {
    let key_id = cert.key_id().to_string();
    if let Some(option) = cert.critical_options().keys().next() {
        return Err(Error::SshCriticalOption {
            key_id,
            option: option.clone(),
        });
    }
    let fingerprint = cert.signature_key().fingerprint(HashAlg::Sha256);
    let trusted = trusted_ca_keys
        .iter()
        .map(|k| k.fingerprint(HashAlg::Sha256))
        .find(|f| *f == fingerprint)
        .ok_or_else(|| Error::SshUntrusted {
            key_id: key_id.clone(),
            ca_fingerprint: fingerprint.to_string(),
        })?;
    let now_secs = now.as_secs();
    if now_secs < cert.valid_after() {
        return Err(Error::SshNotYetValid {
            key_id,
            now,
            valid_after: from_secs(i64::try_from(cert.valid_after()).unwrap_or(i64::MAX)),
        });
    }
    if now_secs >= cert.valid_before() {
        return Err(Error::SshExpired {
            key_id,
            now,
            valid_before: from_secs(i64::try_from(cert.valid_before()).unwrap_or(i64::MAX)),
        });
    }
    // Trust and time were checked above, so a failure here is the signature.
    cert.validate_at(now_secs, [&trusted])
        .map_err(|_| Error::SshBadSignature {
            key_id: key_id.clone(),
        })?;
    if cert.cert_type() != expected.cert_type {
        return Err(Error::SshWrongUse {
            key_id,
            expected: format!("an SSH {}", cert_type_name(expected.cert_type)),
            actual: format!("an SSH {}", cert_type_name(cert.cert_type())),
        });
    }
    let role = cert.extensions().get(EXT_ROLE).map(String::as_str);
    if role != Some(expected.role.as_str()) {
        return Err(Error::SshWrongUse {
            key_id,
            expected: format!("role {}", expected.role.as_str()),
            actual: format!("role {}", role.unwrap_or("(none)")),
        });
    }
    let cluster =
        cert.extensions()
            .get(EXT_CLUSTER)
            .cloned()
            .ok_or_else(|| Error::SshMalformed {
                reason: format!("certificate {key_id:?} has no {EXT_CLUSTER} extension"),
            })?;
    if !cert
        .valid_principals()
        .iter()
        .any(|p| p == expected.principal)
    {
        return Err(Error::SshPrincipal {
            key_id,
            expected: expected.principal.to_string(),
            principals: cert.valid_principals().to_vec(),
        });
    }
    Ok(VerifiedSshCert {
        key_id,
        role: expected.role,
        cluster,
        principals: cert.valid_principals().to_vec(),
        valid_before: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            cert.valid_before(),
        )),
    })
}

fn cert_type_name(t: CertType) -> &'static str {
    match t {
        CertType::Host => "host certificate",
        CertType::User => "user certificate",
    }
}
