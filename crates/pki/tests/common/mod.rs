//! Shared fixtures: a cluster's three CAs and sample identities, at fixed times.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use postern_pki::{
    CaKind, CertAuthority, DbProtocol, DbRoute, HostIdentity, HostRole, Identity, UnixTime, Usage,
    Validator,
};

/// 2026-11-24T00:00:00Z: the fixed "now" of these tests.
pub const T0: u64 = 1_795_478_400;
pub const HOUR: u64 = 3600;

pub fn at(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

pub struct Cluster {
    pub user_ca: CertAuthority,
    pub host_ca: CertAuthority,
    pub db_ca: CertAuthority,
}

impl Cluster {
    pub fn new(name: &str) -> Self {
        let ttl = Duration::from_secs(10 * 365 * 24 * HOUR);
        let make = |kind| CertAuthority::generate(kind, name, at(T0 - 24 * HOUR), ttl).unwrap();
        Self {
            user_ca: make(CaKind::User),
            host_ca: make(CaKind::Host),
            db_ca: make(CaKind::Db),
        }
    }

    pub fn validator(&self) -> Validator {
        Validator::new([
            self.user_ca.trusted().clone(),
            self.host_ca.trusted().clone(),
        ])
    }
}

pub fn alice() -> Identity {
    let mut traits = BTreeMap::new();
    traits.insert(
        "db_users".to_string(),
        vec!["alice".to_string(), "reader".to_string()],
    );
    traits.insert("team".to_string(), vec!["payments".to_string()]);
    Identity {
        user: "alice".into(),
        roles: vec!["dev".into(), "db-reader".into()],
        traits,
        route: Some(DbRoute {
            service: "orders-pg".into(),
            protocol: DbProtocol::Postgres,
            db_user: "reader".into(),
            db_name: "orders".into(),
        }),
        allowed_db_names: vec!["orders".into(), "*".into()],
        allowed_db_users: vec!["reader".into(), "{{internal.db_users}}".into()],
        usage: Usage::User,
        cluster: "prod".into(),
        client_ip: Some("203.0.113.7".parse().unwrap()),
        expires: at(T0 + 12 * HOUR),
    }
}

pub fn agent_host() -> HostIdentity {
    HostIdentity {
        host_id: "agent-1".into(),
        role: HostRole::Agent,
        cluster: "prod".into(),
        names: vec!["agent-1.prod.postern".into(), "10.0.0.5".into()],
        expires: at(T0 + 24 * HOUR),
    }
}

pub fn proxy_host() -> HostIdentity {
    HostIdentity {
        host_id: "proxy-1".into(),
        role: HostRole::Proxy,
        cluster: "prod".into(),
        names: vec!["proxy-1.prod.postern".into()],
        expires: at(T0 + 24 * HOUR),
    }
}

/// Re-signs `base` (a certificate we issued) with `ca`'s private key after `edit` has
/// changed its parameters: what an attacker holding a CA key, or a buggy issuer, could
/// produce. Copies CN, validity, EKU and every extension under Postern's arc.
pub fn forge(
    base: &[u8],
    ca: &CertAuthority,
    edit: impl FnOnce(&mut rcgen::CertificateParams),
) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(base).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    if let Some(cn) = cert.subject().iter_common_name().next() {
        dn.push(rcgen::DnType::CommonName, cn.as_str().unwrap());
    }
    params.distinguished_name = dn;
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(cert.validity().not_before.timestamp()).unwrap();
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).unwrap();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        if eku.value.client_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        }
        if eku.value.server_auth {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        }
    }
    for ext in cert.extensions() {
        let oid: Vec<u64> = ext.oid.iter().unwrap().collect();
        if oid.starts_with(postern_pki::oid::POSTERN_ARC) {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &oid,
                    ext.value.to_vec(),
                ));
        }
    }
    edit(&mut params);
    let pem = ca.to_pem().unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&pem.key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&pem.cert, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    params.signed_by(&key, &issuer).unwrap().der().to_vec()
}

/// The OID of identity field number `n` (`ARC.1.n`).
pub fn field_oid(n: u64) -> Vec<u64> {
    let mut oid = postern_pki::oid::POSTERN_ARC.to_vec();
    oid.extend([1, n]);
    oid
}

/// Removes the extension with `oid` from `params`.
pub fn drop_extension(params: &mut rcgen::CertificateParams, oid: &[u64]) {
    params
        .custom_extensions
        .retain(|e| e.oid_components().collect::<Vec<_>>() != oid);
}
