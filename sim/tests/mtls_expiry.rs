//! Mutual TLS between two simulated hosts with Postern's certificates, through the
//! runtime seam: the handshake succeeds while the certificates are valid and fails with
//! the expiry error once the simulated wall clock passes their `notAfter`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use postern_pki::tls::{
    explain_handshake_error, mtls_client_config, mtls_server_config, peer_identity, ring_provider,
};
use postern_pki::{
    CaKind, CertAuthority, Error as PkiError, HostIdentity, HostRole, Identity, PrivateKey,
    Purpose, UnixTime, Usage, Validator,
};
use postern_rt::{Runtime, WallClock};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const EPOCH_SECS: u64 = 1_800_000_000;
const USER_TTL: Duration = Duration::from_secs(3600);
const HOST_TTL: Duration = Duration::from_secs(24 * 3600);

struct Material {
    user_ca: CertAuthority,
    host_ca: CertAuthority,
    server: (rustls::pki_types::CertificateDer<'static>, PrivateKey),
    client: (rustls::pki_types::CertificateDer<'static>, PrivateKey),
}

fn material() -> Material {
    let now = UnixTime::since_unix_epoch(Duration::from_secs(EPOCH_SECS));
    let user_ca =
        CertAuthority::generate(CaKind::User, "sim", now, Duration::from_secs(365 * 86400))
            .unwrap();
    let host_ca =
        CertAuthority::generate(CaKind::Host, "sim", now, Duration::from_secs(365 * 86400))
            .unwrap();
    let server_key = PrivateKey::generate().unwrap();
    let server = host_ca
        .issue_host(
            &HostIdentity {
                host_id: "auth-1".to_owned(),
                role: HostRole::Auth,
                cluster: "sim".to_owned(),
                names: vec!["auth".to_owned()],
                expires: UnixTime::since_unix_epoch(Duration::from_secs(EPOCH_SECS) + HOST_TTL),
            },
            &server_key.public_key(),
            now,
        )
        .unwrap();
    let client_key = PrivateKey::generate().unwrap();
    let client = user_ca
        .issue_identity(
            &Identity {
                user: "alice".to_owned(),
                roles: vec!["dev".to_owned()],
                traits: Default::default(),
                route: None,
                allowed_db_names: vec![],
                allowed_db_users: vec![],
                usage: Usage::User,
                cluster: "sim".to_owned(),
                client_ip: None,
                expires: UnixTime::since_unix_epoch(Duration::from_secs(EPOCH_SECS) + USER_TTL),
            },
            &client_key.public_key(),
            now,
        )
        .unwrap();
    Material {
        user_ca,
        host_ca,
        server: (server.der().clone(), server_key),
        client: (client.der().clone(), client_key),
    }
}

/// What each side saw of one handshake.
#[derive(Debug, Default)]
struct Seen {
    server_errors: Vec<String>,
    server_expired: Vec<PkiError>,
}

// Valid certs: the server learns the client's identity. Clock past the user cert's
// expiry: the server refuses with our expiry error (telling the user to log in again)
// and the client gets the certificate-expired alert. Clock past the host cert's
// expiry too: the client refuses the server's certificate as expired.
#[test]
fn handshake_fails_with_the_expiry_error_after_the_clock_passes_not_after() {
    let m = Arc::new(material());
    let seen = Arc::new(Mutex::new(Seen::default()));
    // Both hosts read one simulated clock; the test moves it through the shared skew.
    let clock = WallClock::simulated();

    let mut sim = turmoil::Builder::new()
        .rng_seed(7)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(Duration::from_secs(60))
        .build();

    {
        let (m, seen, clock) = (m.clone(), seen.clone(), clock.clone());
        sim.host("auth", move || {
            let (m, seen, clock) = (m.clone(), seen.clone(), clock.clone());
            async move {
                let rt = Runtime::from_parts(
                    postern_rt::Net::Turmoil,
                    clock.clone(),
                    postern_rt::Rng::from_seed(1),
                    "/sim/auth".into(),
                );
                let config = mtls_server_config(
                    vec![m.server.0.clone()],
                    m.server.1.to_rustls(),
                    &[m.user_ca.trusted().clone()],
                    ring_provider(),
                    Arc::new(clock.clone()),
                )
                .unwrap();
                let acceptor = TlsAcceptor::from(config);
                let validator = Validator::new([m.user_ca.trusted().clone()]);
                let listener = rt.net().listen("0.0.0.0:3025").await?;
                loop {
                    let conn = listener.accept().await?;
                    match acceptor.accept(conn).await {
                        Ok(mut tls) => {
                            let (_, session) = tls.get_ref();
                            let who = peer_identity(
                                session.peer_certificates(),
                                &validator,
                                Purpose::UserLogin,
                                clock.now(),
                            )
                            .map(|v| v.identity().user.clone())
                            .unwrap_or_else(|e| format!("invalid: {e}"));
                            tls.write_all(format!("{who}\n").as_bytes()).await?;
                            tls.shutdown().await?;
                        }
                        Err(e) => {
                            let mut seen = seen.lock().unwrap();
                            let expired = e
                                .get_ref()
                                .and_then(|e| e.downcast_ref::<rustls::Error>())
                                .and_then(explain_handshake_error);
                            seen.server_expired.extend(expired);
                            seen.server_errors.push(e.to_string());
                        }
                    }
                }
            }
        });
    }

    {
        let (m, clock) = (m.clone(), clock.clone());
        sim.client("alice", async move {
            let rt = Runtime::from_parts(
                postern_rt::Net::Turmoil,
                clock.clone(),
                postern_rt::Rng::from_seed(2),
                "/sim/alice".into(),
            );
            let config = mtls_client_config(
                vec![m.client.0.clone()],
                m.client.1.to_rustls(),
                &[m.host_ca.trusted().clone()],
                ring_provider(),
                Arc::new(clock.clone()),
            )
            .unwrap();
            // One connector for all attempts, as a real client keeps one: pki turns
            // resumption off, so every handshake shows (and checks) the certificates.
            let connector = TlsConnector::from(config);
            let server_name = ServerName::try_from("auth").unwrap();
            let attempt = |rt: Runtime,
                           connector: TlsConnector,
                           server_name: ServerName<'static>| async move {
                let conn = rt.net().connect("auth:3025").await?;
                let tls = connector.connect(server_name, conn).await?;
                let mut line = String::new();
                BufReader::new(tls).read_line(&mut line).await?;
                Ok::<_, std::io::Error>(line)
            };

            // 1. Valid: the server saw alice.
            let line = attempt(rt.clone(), connector.clone(), server_name.clone()).await?;
            assert_eq!(line, "alice\n");

            // 2. Past the user cert's notAfter: the server refuses; the client is told why.
            clock.set_skew_ms((USER_TTL + Duration::from_secs(60)).as_millis() as i64);
            let err = attempt(rt.clone(), connector.clone(), server_name.clone())
                .await
                .unwrap_err();
            let alert = err
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .cloned();
            assert_eq!(
                alert,
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateExpired
                )),
                "{err}"
            );

            // 3. Past the host cert's notAfter too: the client refuses the server.
            clock.set_skew_ms((HOST_TTL + Duration::from_secs(60)).as_millis() as i64);
            let err = attempt(rt.clone(), connector.clone(), server_name.clone())
                .await
                .unwrap_err();
            let rustls_error = err
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .cloned()
                .unwrap();
            let explained = explain_handshake_error(&rustls_error).expect("an expiry error");
            assert!(
                matches!(explained, PkiError::Expired { .. }),
                "{explained:?}"
            );
            Ok(())
        });
    }

    sim.run().unwrap();

    let seen = seen.lock().unwrap();
    // The server refused alice's expired certificate with our expiry error, whose
    // message says what to do.
    assert_eq!(seen.server_expired.len(), 1, "{seen:?}");
    match &seen.server_expired[0] {
        PkiError::Expired { not_after, now, .. } => {
            assert_eq!(not_after.as_secs(), EPOCH_SECS + USER_TTL.as_secs());
            assert!(now.as_secs() > not_after.as_secs());
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    let message = seen.server_expired[0].to_string();
    assert!(message.contains("postern login"), "{message}");
}
