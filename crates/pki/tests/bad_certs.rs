//! The bad-certificate matrix: every way a certificate can be wrong is refused with its
//! own error variant and a message a person can act on; nothing panics.

mod common;

use std::time::Duration;

use common::*;
use postern_pki::{
    CertAuthority, Error, HostRole, IssuedCert, PrivateKey, Purpose, Validator,
    decode_identity_unverified,
};

struct Fixture {
    cluster: Cluster,
    user_cert: IssuedCert,
    host_cert: IssuedCert,
}

impl Fixture {
    fn new() -> Self {
        let cluster = Cluster::new("prod");
        let key = PrivateKey::generate().unwrap();
        let user_cert = cluster
            .user_ca
            .issue_identity(&alice(), &key.public_key(), at(T0))
            .unwrap();
        let host_cert = cluster
            .host_ca
            .issue_host(&agent_host(), &key.public_key(), at(T0))
            .unwrap();
        Self {
            cluster,
            user_cert,
            host_cert,
        }
    }

    fn user(&self, der: &[u8]) -> Result<(), Error> {
        self.cluster
            .validator()
            .verify_identity(der, Purpose::UserDatabase, at(T0 + HOUR))
            .map(drop)
    }

    fn forge_user(&self, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        forge(self.user_cert.der(), &self.cluster.user_ca, edit)
    }
}

/// Replaces the first occurrence of `from` in `der` with `to` (same length).
fn patch(der: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = der
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present in the certificate");
    let mut out = der.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}

/// Every case: name, and the validator's verdict.
fn matrix(f: &Fixture) -> Vec<(&'static str, Result<(), Error>)> {
    let user_der = f.user_cert.der().to_vec();
    let other = Cluster::new("other");
    let key = PrivateKey::generate().unwrap();
    let mut no_route = alice();
    no_route.route = None;
    let no_route_cert = f
        .cluster
        .user_ca
        .issue_identity(&no_route, &key.public_key(), at(T0))
        .unwrap();
    let proxy_cert = f
        .cluster
        .host_ca
        .issue_host(&proxy_host(), &key.public_key(), at(T0))
        .unwrap();
    let self_signed = {
        let params = rcgen::CertificateParams::new(vec!["alice".to_string()]).unwrap();
        let mut params = params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    };
    let other_user_cert = other
        .user_ca
        .issue_identity(
            &postern_pki::Identity {
                cluster: "other".into(),
                ..alice()
            },
            &key.public_key(),
            at(T0),
        )
        .unwrap();
    let rotated_out = {
        let old = &f.cluster.user_ca;
        let new = CertAuthority::generate(
            postern_pki::CaKind::User,
            "prod",
            at(T0 - HOUR),
            Duration::from_secs(365 * 24 * HOUR),
        )
        .unwrap();
        Validator::new([new.trusted().clone()])
            .with_retired([old.trusted().clone()])
            .verify_identity(&user_der, Purpose::UserDatabase, at(T0 + HOUR))
            .map(drop)
    };
    let validator = f.cluster.validator();
    let mut truncated = user_der.clone();
    truncated.truncate(200);

    vec![
        (
            "expired",
            validator
                .verify_identity(&user_der, Purpose::UserDatabase, at(T0 + 13 * HOUR))
                .map(drop),
        ),
        (
            "not yet valid",
            validator
                .verify_identity(&user_der, Purpose::UserDatabase, at(T0 - HOUR))
                .map(drop),
        ),
        ("wrong CA", f.user(other_user_cert.der())),
        ("self-signed", f.user(&self_signed)),
        ("host cert used as user cert", f.user(f.host_cert.der())),
        (
            "user cert used as host cert",
            validator
                .verify_host(&user_der, HostRole::Agent, at(T0 + HOUR))
                .map(drop),
        ),
        (
            "tampered identity field (role dev -> adm)",
            f.user(&patch(&user_der, b"\x0c\x03dev", b"\x0c\x03adm")),
        ),
        ("truncated DER", f.user(&truncated)),
        (
            "unknown critical extension",
            f.user(&f.forge_user(|p| {
                let mut ext =
                    rcgen::CustomExtension::from_oid_content(&[1, 2, 3, 4, 5], vec![5, 0]);
                ext.set_criticality(true);
                p.custom_extensions.push(ext);
            })),
        ),
        ("CA rotated out", rotated_out),
        ("route missing where required", f.user(no_route_cert.der())),
        ("garbage bytes", f.user(b"hello, I am not a certificate")),
        (
            "duplicated identity field",
            f.user(&f.forge_user(|p| {
                let again = p.custom_extensions[2].clone();
                p.custom_extensions.push(again);
            })),
        ),
        (
            "unknown identity field",
            f.user(&f.forge_user(|p| {
                let ext = rcgen::CustomExtension::from_oid_content(&field_oid(99), vec![5, 0]);
                p.custom_extensions.push(ext);
            })),
        ),
        (
            "missing identity field (roles)",
            f.user(&f.forge_user(|p| drop_extension(p, &field_oid(3)))),
        ),
        (
            "invalid identity field (protocol)",
            f.user(&f.forge_user(|p| {
                drop_extension(p, &field_oid(5));
                let mut route = vec![0x30, 0x0c];
                for s in ["db", "x", "u", "n"] {
                    route.extend([0x0c, s.len() as u8]);
                    route.extend(s.as_bytes());
                }
                route[1] = (route.len() - 2) as u8;
                p.custom_extensions
                    .push(rcgen::CustomExtension::from_oid_content(
                        &field_oid(5),
                        route,
                    ));
            })),
        ),
        (
            "proxy cert where agent cert is required",
            validator
                .verify_host(proxy_cert.der(), HostRole::Agent, at(T0 + HOUR))
                .map(drop),
        ),
        (
            "user role signed by the host CA",
            f.user(&forge(&user_der, &f.cluster.host_ca, |_| {})),
        ),
        (
            "cert cluster differs from its CA's",
            f.user(&f.forge_user(|p| {
                drop_extension(p, &field_oid(2));
                p.custom_extensions
                    .push(rcgen::CustomExtension::from_oid_content(
                        &field_oid(2),
                        [&[0x0c, 7][..], b"staging"].concat(),
                    ));
            })),
        ),
        (
            "no client-auth key usage",
            f.user(&f.forge_user(|p| p.extended_key_usages.clear())),
        ),
        (
            "DER SEQUENCE that is not X.509",
            f.user(&[0x30, 0x03, 0x02, 0x01, 0x00]),
        ),
        ("larger than the limit", f.user(&vec![0x30; 20_000])),
        (
            "no peer certificate after handshake",
            postern_pki::tls::peer_identity(None, &validator, Purpose::UserLogin, at(T0)).map(drop),
        ),
    ]
}

// Goal: every bad certificate is refused with its own variant, and each case hits the
// variant it is about.
#[test]
fn each_bad_certificate_has_its_own_error() {
    let f = Fixture::new();
    let cases = matrix(&f);
    assert!(cases.len() >= 12);
    let mut seen = Vec::new();
    for (name, verdict) in &cases {
        let err = verdict
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("case {name:?} was accepted"));
        let expected = match *name {
            "expired" => matches!(err, Error::Expired { .. }),
            "not yet valid" => matches!(err, Error::NotYetValid { .. }),
            "wrong CA" => matches!(err, Error::UnknownIssuer { .. }),
            "self-signed" => matches!(err, Error::SelfSigned { .. }),
            "host cert used as user cert" => matches!(err, Error::HostCertUsedAsUser { .. }),
            "user cert used as host cert" => matches!(err, Error::UserCertUsedAsHost { .. }),
            "tampered identity field (role dev -> adm)" => {
                matches!(err, Error::BadSignature { .. })
            }
            "truncated DER" => matches!(err, Error::Truncated { .. }),
            "unknown critical extension" => matches!(err, Error::UnknownCriticalExtension { .. }),
            "CA rotated out" => matches!(err, Error::CaRotatedOut { .. }),
            "route missing where required" => matches!(err, Error::RouteMissing { .. }),
            "garbage bytes" => matches!(err, Error::NotACertificate { .. }),
            "duplicated identity field" => matches!(err, Error::DuplicateIdentityField { .. }),
            "unknown identity field" => matches!(err, Error::UnknownIdentityField { .. }),
            "missing identity field (roles)" => {
                matches!(err, Error::MissingIdentityField { .. })
            }
            "invalid identity field (protocol)" => {
                matches!(err, Error::InvalidIdentityField { .. })
            }
            "proxy cert where agent cert is required" => matches!(err, Error::WrongRole { .. }),
            "user role signed by the host CA" => matches!(err, Error::WrongIssuer { .. }),
            "cert cluster differs from its CA's" => matches!(err, Error::ClusterMismatch { .. }),
            "no client-auth key usage" => matches!(err, Error::KeyUsage { .. }),
            "DER SEQUENCE that is not X.509" => matches!(err, Error::Malformed { .. }),
            "larger than the limit" => matches!(err, Error::TooLarge { .. }),
            "no peer certificate after handshake" => matches!(err, Error::NoPeerCertificate),
            other => panic!("case {other:?} has no expected variant"),
        };
        assert!(expected, "case {name:?} gave {err:?}");
        let variant = std::mem::discriminant(err);
        assert!(
            !seen.contains(&variant),
            "case {name:?} shares its variant with another case: {err:?}"
        );
        seen.push(variant);
    }
}

// Goal: the forger used by the matrix is faithful, so the forged cases fail only
// because of their edit.
#[test]
fn unedited_forgery_is_accepted() {
    let f = Fixture::new();
    let forged = f.forge_user(|_| {});
    assert_eq!(f.user(&forged), Ok(()));
}

// Goal: the matrix's messages read well; reviewed in the snapshot.
#[test]
fn matrix_messages_snapshot() {
    let f = Fixture::new();
    let full_len = f.user_cert.der().len().to_string();
    let report: String = matrix(&f)
        .into_iter()
        .map(|(name, verdict)| {
            let err = verdict.expect_err(name);
            // ECDSA signatures vary in length by a byte or two; keep the snapshot stable.
            let message = err.to_string().replace(&full_len, "<cert length>");
            format!("{name}\n  [{:?}] {message}\n", err.category())
        })
        .collect();
    insta::assert_snapshot!(report);
}

// Goal: the unverified decoder refuses the same malformed inputs without panicking.
#[test]
fn unverified_decode_refuses_malformed_input() {
    let f = Fixture::new();
    let der = f.user_cert.der().to_vec();
    for len in 0..der.len() {
        assert!(
            decode_identity_unverified(&der[..len]).is_err(),
            "prefix {len}"
        );
    }
    assert!(decode_identity_unverified(&der).is_ok());
}

// Goal: flipping the lowest or highest bit of any byte of a valid certificate is always
// refused by the validator (exhaustive over positions), and never panics.
#[test]
fn every_single_bit_flip_is_refused() {
    let f = Fixture::new();
    let der = f.user_cert.der().to_vec();
    for i in 0..der.len() {
        for bit in [0x01, 0x80] {
            let mut flipped = der.clone();
            flipped[i] ^= bit;
            let _ = decode_identity_unverified(&flipped);
            assert!(
                f.user(&flipped).is_err(),
                "byte {i} ^ {bit:#04x} was accepted"
            );
        }
    }
}

mod mutations {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn fixture() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(Fixture::new)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // Goal: changing any one byte of a valid certificate never panics and is never
        // accepted (the signature covers everything that matters).
        #[test]
        fn one_changed_byte_is_never_accepted(index in any::<prop::sample::Index>(), xor in 1u8..) {
            let f = fixture();
            let mut der = f.user_cert.der().to_vec();
            let i = index.index(der.len());
            der[i] ^= xor;
            let _ = decode_identity_unverified(&der);
            prop_assert!(f.user(&der).is_err(), "byte {} ^ {:#04x} was accepted", i, xor);
        }

        // Goal: arbitrary splices of a certificate (cut, repeat, insert) never panic
        // either decoder.
        #[test]
        fn spliced_bytes_never_panic(cut in any::<prop::sample::Index>(), junk in prop::collection::vec(any::<u8>(), 0..64)) {
            let f = fixture();
            let der = f.user_cert.der();
            let at = cut.index(der.len());
            let spliced: Vec<u8> = der[..at].iter().chain(&junk).chain(&der[at..]).copied().collect();
            let _ = decode_identity_unverified(&spliced);
            let verdict = f.user(&spliced);
            prop_assert!(junk.is_empty() || verdict.is_err());
        }
    }
}

// Goal: a certificate that outlives its CA (only possible by forging) is refused once
// the CA has expired, naming the CA.
#[test]
fn expired_ca_is_refused_even_if_leaf_is_current() {
    let ca = CertAuthority::generate(
        postern_pki::CaKind::User,
        "prod",
        at(T0),
        Duration::from_secs(2 * HOUR),
    )
    .unwrap();
    let key = PrivateKey::generate().unwrap();
    let mut id = alice();
    id.expires = at(T0 + HOUR);
    let cert = ca.issue_identity(&id, &key.public_key(), at(T0)).unwrap();
    let outliving = forge(cert.der(), &ca, |p| {
        p.not_after = time::OffsetDateTime::from_unix_timestamp((T0 + 24 * HOUR) as i64).unwrap();
    });
    let validator = Validator::new([ca.trusted().clone()]);
    let ok = validator.verify_identity(&outliving, Purpose::UserDatabase, at(T0 + HOUR + 1));
    assert!(ok.is_ok(), "{ok:?}");
    let err = validator
        .verify_identity(&outliving, Purpose::UserDatabase, at(T0 + 3 * HOUR))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Expired { cert, .. } if cert.contains("issuing CA")),
        "{err}"
    );
}
