//! The auth API over mutual TLS: every endpoint refuses unauthenticated callers, the
//! wrong kind of certificate and certificates from a foreign CA; oversize and malformed
//! requests are refused with a message.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use postern_auth::api;
use postern_auth::audit::{AuditEvent, FileAuditLog, codes};
use postern_auth::backend::MemoryBackend;
use postern_auth::database::{Database, Protocol};
use postern_auth::limiter::LoginLimits;
use postern_auth::role::parse_role_file;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::{CaKind, PrivateKey, TrustedCa};
use postern_rt::{Net, Rng, WallClock};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASSWORD: &str = "correct horse battery staple";
const SERVER_NAME: &str = "auth.test";

type Server = AuthServer<MemoryBackend, FileAuditLog>;

/// A certificate and its key, as a client presents them.
#[derive(Clone)]
struct Credentials {
    cert: CertificateDer<'static>,
    key: Arc<PrivateKey>,
}

struct Cluster {
    server: Arc<Server>,
    clock: WallClock,
    addr: String,
    host_cas: Vec<TrustedCa>,
    _dir: tempfile::TempDir,
}

async fn auth_server(cluster: &str, clock: &WallClock) -> (Arc<Server>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthConfig {
        cluster: cluster.into(),
        password_cost: PasswordCost {
            memory_kib: 64,
            passes: 1,
        },
        login_limits: LoginLimits::default(),
    };
    let server = AuthServer::new(
        MemoryBackend::new(Arc::new(clock.clone())),
        FileAuditLog::open(dir.path()).unwrap(),
        clock.clone(),
        Rng::from_seed(9),
        config,
    )
    .unwrap();
    server.ensure_cas().await.unwrap();
    (Arc::new(server), dir)
}

async fn start() -> Cluster {
    let clock = WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
        1_800_000_000,
    )));
    let (server, dir) = auth_server("test", &clock).await;
    let roles = "[[role]]\nname = \"dev\"\nallow.db_labels = { env = \"dev\" }\nallow.db_users = [\"*\"]\nallow.db_names = [\"*\"]\n";
    server
        .apply_roles("root", &parse_role_file("r.toml", roles).unwrap())
        .await
        .unwrap();
    server
        .create_user(
            "root",
            "alice",
            vec!["dev".into()],
            Traits::default(),
            Some(PASSWORD),
            false,
        )
        .await
        .unwrap();
    let listener = Net::Tokio.listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(api::serve(
        Arc::clone(&server),
        listener,
        vec![SERVER_NAME.into()],
    ));
    let host_cas = server.ca_status(CaKind::Host).await.unwrap().trusted;
    Cluster {
        server,
        clock,
        addr,
        host_cas,
        _dir: dir,
    }
}

fn public_key_b64(key: &PrivateKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.public_key().der())
}

async fn host(server: &Server, kind: TokenKind, host_id: &str) -> Credentials {
    let key = PrivateKey::generate().unwrap();
    let token = server
        .create_join_token("root", kind, Duration::from_secs(60))
        .await
        .unwrap();
    let joined = server
        .join(&token, kind, host_id, vec![], &key.public_key())
        .await
        .unwrap();
    Credentials {
        cert: joined.cert.der().clone(),
        key: Arc::new(key),
    }
}

async fn user(server: &Server) -> Credentials {
    let key = PrivateKey::generate().unwrap();
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let login = server
        .login("alice", PASSWORD, None, source, &key.public_key(), None)
        .await
        .unwrap();
    Credentials {
        cert: login.cert.der().clone(),
        key: Arc::new(key),
    }
}

/// Sends one HTTP/1.1 request over mutual TLS. `Err` if the connection or handshake fails.
async fn request(
    cluster: &Cluster,
    credentials: Option<&Credentials>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &cluster.host_cas {
        roots.add(ca.der().clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_details(
        postern_pki::tls::ring_provider(),
        Arc::new(cluster.clock.clone()),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match credentials {
        Some(c) => builder
            .with_client_auth_cert(vec![c.cert.clone()], c.key.to_rustls())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = Net::Tokio
        .connect(&cluster.addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.write_all(body.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Caller {
    Proxy,
    Agent,
    User,
}

struct Endpoint {
    method: &'static str,
    path: &'static str,
    body: String,
    /// Who may call it; the first is used for the happy path.
    allowed: &'static [Caller],
    /// Status of the happy path.
    ok: u16,
}

// Each endpoint serves its own caller and refuses: no certificate, the wrong role, a foreign CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_checks_the_caller() {
    let cluster = start().await;
    let server = &cluster.server;
    let proxy = host(server, TokenKind::Proxy, "proxy-1").await;
    let agent = host(server, TokenKind::Db, "agent-1").await;
    let alice = user(server).await;
    let (foreign_server, _foreign_dir) = auth_server("foreign", &cluster.clock).await;
    let foreign = host(&foreign_server, TokenKind::Proxy, "proxy-1").await;

    let database = Database {
        name: "dev-pg".into(),
        description: "dev".into(),
        protocol: Protocol::Postgres,
        uri: "db:5432".into(),
        labels: BTreeMap::from([("env".into(), "dev".into())]),
    };
    let revision = server
        .announce_database("agent-1", &database, Duration::from_secs(600))
        .await
        .unwrap();
    let key = PrivateKey::generate().unwrap();
    let key_b64 = public_key_b64(&key);
    let routed = {
        let caller = server
            .validator()
            .await
            .unwrap()
            .verify_identity(
                &alice.cert,
                postern_pki::Purpose::UserLogin,
                cluster.clock.now(),
            )
            .unwrap();
        server
            .reissue_for_database(&caller, "dev-pg", "app", "app", &key.public_key())
            .await
            .unwrap()
    };
    let routed_b64 = base64::engine::general_purpose::STANDARD.encode(routed.der());
    let event = AuditEvent::new(
        codes::LOGIN,
        time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        &mut ChaCha20Rng::seed_from_u64(1),
    );
    let json = |value: serde_json::Value| value.to_string();

    let endpoints = [
        Endpoint {
            method: "POST",
            path: "/v1/login",
            body: json(
                serde_json::json!({"user": "alice", "password": PASSWORD, "source": "192.0.2.1", "public_key": key_b64}),
            ),
            allowed: &[Caller::Proxy],
            ok: 200,
        },
        Endpoint {
            method: "GET",
            path: "/v1/databases",
            body: String::new(),
            allowed: &[Caller::User],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/databases/certs",
            body: json(
                serde_json::json!({"service": "dev-pg", "db_user": "app", "public_key": key_b64}),
            ),
            allowed: &[Caller::User],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/db-access",
            body: json(serde_json::json!({"user_cert": routed_b64, "public_key": key_b64})),
            allowed: &[Caller::Proxy],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/db-client",
            body: json(serde_json::json!({"db_user": "app", "public_key": key_b64})),
            allowed: &[Caller::Agent],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/hosts/renew",
            body: json(serde_json::json!({"public_key": key_b64})),
            allowed: &[Caller::Proxy, Caller::Agent],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/registry/announce",
            body: json(serde_json::json!({"database": database, "ttl_secs": 600})),
            allowed: &[Caller::Agent],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/registry/keepalive",
            body: json(
                serde_json::json!({"db_name": "other", "revision": revision.0, "ttl_secs": 600}),
            ),
            allowed: &[Caller::Agent],
            ok: 409,
        },
        Endpoint {
            method: "GET",
            path: "/v1/registry/servers/dev-pg",
            body: String::new(),
            allowed: &[Caller::Proxy],
            ok: 200,
        },
        Endpoint {
            method: "POST",
            path: "/v1/registry/withdraw",
            body: json(serde_json::json!({"db_name": "gone"})),
            allowed: &[Caller::Agent],
            ok: 204,
        },
        Endpoint {
            method: "POST",
            path: "/v1/audit/events",
            body: json(serde_json::json!([event])),
            allowed: &[Caller::Agent, Caller::Proxy],
            ok: 200,
        },
        Endpoint {
            method: "GET",
            path: "/v1/cas",
            body: String::new(),
            allowed: &[Caller::User, Caller::Proxy, Caller::Agent],
            ok: 200,
        },
    ];
    for endpoint in &endpoints {
        let (method, path, body) = (endpoint.method, endpoint.path, endpoint.body.as_str());
        let credentials = |caller: Caller| match caller {
            Caller::Proxy => &proxy,
            Caller::Agent => &agent,
            Caller::User => &alice,
        };
        let (status, text) = request(
            &cluster,
            Some(credentials(endpoint.allowed[0])),
            method,
            path,
            body,
        )
        .await
        .unwrap();
        assert_eq!(
            status, endpoint.ok,
            "{method} {path} as {:?}: {text}",
            endpoint.allowed[0]
        );

        let (status, text) = request(&cluster, None, method, path, body).await.unwrap();
        assert_eq!(status, 401, "{method} {path} without a certificate: {text}");
        assert!(text.contains("no client certificate"), "{text}");

        for caller in [Caller::Proxy, Caller::Agent, Caller::User] {
            if endpoint.allowed.contains(&caller) {
                continue;
            }
            let (status, text) = request(&cluster, Some(credentials(caller)), method, path, body)
                .await
                .unwrap();
            assert_eq!(status, 403, "{method} {path} as {caller:?}: {text}");
        }

        match request(&cluster, Some(&foreign), method, path, body).await {
            // The server refuses the certificate during or right after the handshake;
            // the client notices on whichever of handshake, write or read comes first.
            Err(error) => assert!(
                ["handshake", "write", "read"]
                    .iter()
                    .any(|stage| error.starts_with(stage)),
                "{error}"
            ),
            Ok((status, text)) => {
                panic!("{method} {path} with a foreign CA cert answered {status}: {text}")
            }
        }
    }
}

// Joining needs a valid token, not a certificate; a wrong or reused token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_endpoint_needs_a_token() {
    let cluster = start().await;
    let key = PrivateKey::generate().unwrap();
    let token = cluster
        .server
        .create_join_token("root", TokenKind::Db, Duration::from_secs(60))
        .await
        .unwrap();
    let body = |token: &str| {
        serde_json::json!({"token": token, "kind": "db", "host_id": "agent-9", "public_key": public_key_b64(&key)}).to_string()
    };
    let (status, text) = request(&cluster, None, "POST", "/v1/join", &body(&token))
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let response: api::CertResponse = serde_json::from_str(&text).unwrap();
    let cert = CertificateDer::from_pem_slice(response.cert.as_bytes()).unwrap();
    let validator = cluster.server.validator().await.unwrap();
    validator
        .verify_host(&cert, postern_pki::HostRole::Agent, cluster.clock.now())
        .unwrap();
    let (status, text) = request(&cluster, None, "POST", "/v1/join", &body(&token))
        .await
        .unwrap();
    assert_eq!(status, 403, "reused token: {text}");
    let (status, _) = request(&cluster, None, "POST", "/v1/join", &body("not-a-token"))
        .await
        .unwrap();
    assert_eq!(status, 403);
}

// Oversize bodies get 413; malformed JSON and unknown fields get 4xx naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused() {
    let cluster = start().await;
    let agent = host(&cluster.server, TokenKind::Db, "agent-1").await;
    // Most routes take 64 KiB; audit batches take up to AUDIT_REQUEST_SIZE_MAX.
    let big = format!("{{\"db_name\": \"{}\"}}", "x".repeat(70_000));
    let (status, big_text) = request(
        &cluster,
        Some(&agent),
        "POST",
        "/v1/registry/withdraw",
        &big,
    )
    .await
    .unwrap();
    assert_eq!(status, 413);
    assert!(big_text.contains("too large"), "{big_text}");
    assert!(big_text.contains("at most 65536 bytes"), "{big_text}");
    let count = postern_auth::api::AUDIT_REQUEST_SIZE_MAX / 3 + 1;
    let big = format!("[{}]", vec!["{}"; count].join(","));
    let (status, big_text) = request(&cluster, Some(&agent), "POST", "/v1/audit/events", &big)
        .await
        .unwrap();
    assert_eq!(status, 413, "{big_text}");
    // Under that bound the body is read and judged on its content.
    let (status, text) = request(
        &cluster,
        Some(&agent),
        "POST",
        "/v1/audit/events",
        &format!("[{}]", vec!["{}"; 40_000].join(",")),
    )
    .await
    .unwrap();
    assert!(
        (400..500).contains(&status) && status != 413,
        "{status} {text}"
    );
    let (status, text) = request(
        &cluster,
        Some(&agent),
        "POST",
        "/v1/registry/withdraw",
        "{\"db_name\": \"x\", \"extra\": 1}",
    )
    .await
    .unwrap();
    assert!((400..500).contains(&status), "{status}");
    assert!(text.contains("extra"), "{text}");
    assert!(text.contains("invalid request body"), "{text}");
    let (status, _) = request(
        &cluster,
        Some(&agent),
        "POST",
        "/v1/registry/withdraw",
        "{not json",
    )
    .await
    .unwrap();
    assert!((400..500).contains(&status), "{status}");
    let (status, text) = request(
        &cluster,
        Some(&agent),
        "POST",
        "/v1/db-client",
        "{\"db_user\": \"x\", \"public_key\": \"%%%\"}",
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("public_key"), "{text}");
}
