//! The auth API under turmoil: the same server code, on the seam's simulated network,
//! with a manual wall clock. A user certificate is served; no certificate is refused.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use postern_auth::api;
use postern_auth::audit::MemoryAuditLog;
use postern_auth::backend::MemoryBackend;
use postern_auth::limiter::LoginLimits;
use postern_auth::server::{AuthConfig, AuthServer};
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::{CaKind, PrivateKey, TrustedCa};
use postern_rt::{Net, Rng, WallClock};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const START_SECS: u64 = 1_800_000_000;

struct Client {
    clock: WallClock,
    host_cas: Vec<TrustedCa>,
    credentials: Option<(CertificateDer<'static>, Arc<PrivateKey>)>,
}

async fn get(client: &Client, path: &str) -> Result<u16, Box<dyn std::error::Error>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &client.host_cas {
        roots.add(ca.der().clone())?;
    }
    let builder = rustls::ClientConfig::builder_with_details(
        postern_pki::tls::ring_provider(),
        Arc::new(client.clock.clone()),
    )
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match &client.credentials {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert.clone()], key.to_rustls())?,
        None => builder.with_no_client_auth(),
    };
    let tcp = Net::Turmoil.connect("auth:3025").await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("auth")?, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: auth\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("no status line")?;
    Ok(status)
}

// Under turmoil, a user certificate gets the database list and a caller without one gets 401.
#[test]
fn api_runs_under_turmoil() {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(START_SECS)));
    let setup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (server, user_cert, user_key, host_cas) = setup.block_on(async {
        let config = AuthConfig {
            cluster: "sim".into(),
            password_cost: PasswordCost {
                memory_kib: 64,
                passes: 1,
            },
            login_limits: LoginLimits::default(),
        };
        let server = AuthServer::new(
            MemoryBackend::new(Arc::new(clock.clone())),
            MemoryAuditLog::new(),
            clock.clone(),
            Rng::from_seed(3),
            config,
        )
        .unwrap();
        server.ensure_cas().await.unwrap();
        server
            .create_user(
                "root",
                "alice",
                vec![],
                Traits::default(),
                Some("a long enough password"),
                false,
            )
            .await
            .unwrap();
        let key = PrivateKey::generate().unwrap();
        let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let login = server
            .login(
                "alice",
                "a long enough password",
                None,
                source,
                &key.public_key(),
                None,
            )
            .await
            .unwrap();
        let host_cas = server.ca_status(CaKind::Host).await.unwrap().trusted;
        (
            Arc::new(server),
            login.cert.der().clone(),
            Arc::new(key),
            host_cas,
        )
    });

    let epoch = UNIX_EPOCH + Duration::from_secs(START_SECS);
    let mut sim = turmoil::Builder::new().rng_seed(7).epoch(epoch).build();
    sim.host("auth", move || {
        let server = Arc::clone(&server);
        async move {
            let listener = Net::Turmoil.listen("0.0.0.0:3025").await?;
            api::serve(server, listener, vec!["auth".into()]).await?;
            Ok(())
        }
    });
    sim.client("client", async move {
        let user = Client {
            clock: clock.clone(),
            host_cas: host_cas.clone(),
            credentials: Some((user_cert, user_key)),
        };
        assert_eq!(get(&user, "/v1/databases").await?, 200);
        let anonymous = Client {
            clock,
            host_cas,
            credentials: None,
        };
        assert_eq!(get(&anonymous, "/v1/databases").await?, 401);
        Ok(())
    });
    sim.run().unwrap();
}
