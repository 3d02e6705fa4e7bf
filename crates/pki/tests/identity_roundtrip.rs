//! Identity → certificate → Identity is exact, for any identity within the limits.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use common::*;
use postern_pki::{
    DbProtocol, DbRoute, HostIdentity, HostRole, Identity, PrivateKey, Purpose, Usage,
    decode_identity_unverified,
};
use proptest::prelude::*;

/// One cluster and one subject key for all cases: key generation is not under test.
fn fixture() -> &'static (Cluster, PrivateKey) {
    static FIXTURE: OnceLock<(Cluster, PrivateKey)> = OnceLock::new();
    FIXTURE.get_or_init(|| (Cluster::new("prod"), PrivateKey::generate().unwrap()))
}

/// Non-empty text without control characters, including non-ASCII.
fn name() -> impl Strategy<Value = String> {
    "[a-z*{}.]{1,3}|\\PC{1,24}"
}

fn text() -> impl Strategy<Value = String> {
    "|\\PC{1,24}"
}

fn route() -> impl Strategy<Value = DbRoute> {
    (
        name(),
        prop_oneof![Just(DbProtocol::Postgres), Just(DbProtocol::Mysql)],
        text(),
        text(),
    )
        .prop_map(|(service, protocol, db_user, db_name)| DbRoute {
            service,
            protocol,
            db_user,
            db_name,
        })
}

fn identity() -> impl Strategy<Value = Identity> {
    (
        (
            name(),
            prop::collection::vec(name(), 0..5),
            prop::collection::btree_map(name(), prop::collection::vec(text(), 0..4), 0..4),
            prop::option::of(route()),
        ),
        (
            prop::collection::vec(name(), 0..4),
            prop::collection::vec(name(), 0..4),
            prop_oneof![Just(Usage::User), Just(Usage::Db)],
            prop::option::of(any::<IpAddr>()),
            1u64..(4 * 365 * 24 * HOUR),
        ),
    )
        .prop_map(
            |(
                (user, roles, traits, route),
                (allowed_db_names, allowed_db_users, usage, client_ip, ttl),
            )| Identity {
                user,
                roles,
                traits: traits.into_iter().collect::<BTreeMap<_, _>>(),
                route,
                allowed_db_names,
                allowed_db_users,
                usage,
                cluster: "prod".into(),
                client_ip,
                expires: at(T0 + ttl),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    // Goal: any identity survives issuing and decoding (verified and unverified) exactly.
    #[test]
    fn identity_cert_identity_is_exact(id in identity()) {
        let (cluster, key) = fixture();
        let cert = cluster.user_ca.issue_identity(&id, &key.public_key(), at(T0)).unwrap();
        prop_assert_eq!(&decode_identity_unverified(cert.der()).unwrap(), &id);
        let purpose = match (id.usage, &id.route) {
            (Usage::User, _) => Purpose::UserLogin,
            (Usage::Db, Some(_)) => Purpose::ProxyToAgent,
            (Usage::Db, None) => return Ok(()),
        };
        let verified = cluster.validator().verify_identity(cert.der(), purpose, at(T0)).unwrap();
        prop_assert_eq!(verified.identity(), &id);
    }
}

fn host() -> impl Strategy<Value = HostIdentity> {
    let host_name = prop_oneof![
        "[a-z][a-z0-9-]{0,12}(\\.[a-z][a-z0-9-]{0,12}){0,3}",
        any::<IpAddr>().prop_map(|ip| ip.to_string()),
    ];
    (
        "[a-z][a-z0-9-]{0,20}",
        prop_oneof![
            Just(HostRole::Proxy),
            Just(HostRole::Agent),
            Just(HostRole::Auth)
        ],
        prop::collection::vec(host_name, 0..4),
        1u64..(365 * 24 * HOUR),
    )
        .prop_map(|(host_id, role, names, ttl)| HostIdentity {
            host_id,
            role,
            cluster: "prod".into(),
            names,
            expires: at(T0 + ttl),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // Goal: any host identity survives issuing and host validation exactly.
    #[test]
    fn host_cert_host_is_exact(h in host()) {
        let (cluster, key) = fixture();
        let cert = cluster.host_ca.issue_host(&h, &key.public_key(), at(T0)).unwrap();
        let verified = cluster.validator().verify_host(cert.der(), h.role, at(T0)).unwrap();
        prop_assert_eq!(verified.host(), &h);
    }
}

// Goal: the decoded sample identity reads as expected; reviewed in the snapshot.
#[test]
fn decoded_identity_snapshot() {
    let (cluster, key) = fixture();
    let cert = cluster
        .user_ca
        .issue_identity(&alice(), &key.public_key(), at(T0))
        .unwrap();
    let verified = cluster
        .validator()
        .verify_identity(cert.der(), Purpose::UserDatabase, at(T0 + HOUR))
        .unwrap();
    insta::assert_debug_snapshot!(verified.identity());
}

// Goal: identities outside the limits are refused at issuing time, not written.
#[test]
fn issuing_refuses_identities_outside_limits() {
    let (cluster, key) = fixture();
    let cases: Vec<(&str, Identity)> = vec![
        (
            "empty user",
            Identity {
                user: String::new(),
                ..alice()
            },
        ),
        (
            "control char",
            Identity {
                user: "al\nice".into(),
                ..alice()
            },
        ),
        (
            "empty role",
            Identity {
                roles: vec![String::new()],
                ..alice()
            },
        ),
        (
            "too long",
            Identity {
                roles: vec!["r".repeat(postern_pki::FIELD_LEN_MAX + 1)],
                ..alice()
            },
        ),
        (
            "too many",
            Identity {
                roles: vec!["r".into(); postern_pki::LIST_LEN_MAX + 1],
                ..alice()
            },
        ),
        (
            "other cluster",
            Identity {
                cluster: "staging".into(),
                ..alice()
            },
        ),
    ];
    for (name, id) in cases {
        let err = cluster
            .user_ca
            .issue_identity(&id, &key.public_key(), at(T0))
            .unwrap_err();
        assert!(
            matches!(err, postern_pki::Error::InvalidRequest { .. }),
            "{name}: {err}"
        );
    }
}
