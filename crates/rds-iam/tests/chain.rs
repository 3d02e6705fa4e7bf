//! The standard credential chain, each source on its own and the order between them.
//! Files live in temporary folders; a local HTTP server stands in for the container
//! endpoint and the instance metadata service (their addresses are settings); the clock
//! is manual, so the cache's expiry is exact.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use postern_rds_iam::chain::{ChainError, DefaultChain, Env, REFRESH_BEFORE, Source};
use postern_rt::{Net, WallClock};
use rustls_pki_types::UnixTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 2026-11-24T00:00:00Z
const T0: u64 = 1_795_478_400;
const EXPIRATION: &str = "2026-11-24T06:00:00Z";
const EXPIRES_AT: u64 = T0 + 6 * 3600;

fn clock() -> WallClock {
    WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(T0)))
}

fn chain(vars: &[(&str, String)], clock: &WallClock) -> DefaultChain {
    // IMDS off unless a test turns it on: nothing here may reach 169.254.169.254.
    let mut all: Vec<(String, String)> = vec![("AWS_EC2_METADATA_DISABLED".into(), "true".into())];
    all.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    DefaultChain::with_env(Env::from_vars(all), Net::Tokio, clock.clone())
}

fn write(path: &Path, text: &str) -> String {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// A request the fake endpoint saw: method, path, headers (lower-case names).
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A plain-HTTP server answering each request with `answer(&seen)` (status, body);
/// records what it saw.
async fn serve(
    answer: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8(request).unwrap();
                let mut lines = text.split("\r\n");
                let mut first = lines.next().unwrap().split(' ');
                let seen = Seen {
                    method: first.next().unwrap().to_owned(),
                    path: first.next().unwrap().to_owned(),
                    headers: lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect(),
                };
                let (status, body) = answer(&seen);
                log.lock().unwrap().push(seen);
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            });
        }
    });
    (addr, seen)
}

fn credentials_json(key: &str) -> String {
    format!(
        r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{key}","SecretAccessKey":"secret-{key}","Token":"token-{key}","Expiration":"{EXPIRATION}"}}"#
    )
}

// Goal: environment keys are used as they are, with the session token.
#[tokio::test]
async fn environment_keys() {
    let clock = clock();
    let credentials = chain(
        &[
            ("AWS_ACCESS_KEY_ID", "AKENV".into()),
            ("AWS_SECRET_ACCESS_KEY", "env-secret".into()),
            ("AWS_SESSION_TOKEN", "env-token".into()),
        ],
        &clock,
    )
    .credentials()
    .await
    .unwrap();
    assert_eq!(credentials.access_key_id(), "AKENV");
    assert_eq!(credentials.secret_access_key(), "env-secret");
    assert_eq!(credentials.session_token(), Some("env-token"));
    assert_eq!(credentials.expiry(), None);

    let half = chain(&[("AWS_ACCESS_KEY_ID", "AKENV".into())], &clock)
        .credentials()
        .await
        .unwrap_err();
    assert!(
        matches!(&half, ChainError::Failed { from: Source::Environment, reason } if reason.contains("AWS_SECRET_ACCESS_KEY")),
        "{half}"
    );
}

// Goal: the shared files: ~/.aws/credentials by default; AWS_PROFILE picks a profile;
// the config file's `[profile NAME]`; a credentials-file key wins over the config's;
// AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE move the files; a named profile that is
// missing, or one that needs what is not built (role_arn), is an error that says so.
#[tokio::test]
async fn shared_files_and_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let home = dir.path().join("home");
    write(
        &home.join(".aws/credentials"),
        "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = default-secret\n\n[dev]\naws_access_key_id = AKDEV\n",
    );
    write(
        &home.join(".aws/config"),
        "[default]\nregion = eu-west-1\n[profile dev]\naws_access_key_id = AKCONFIG\naws_secret_access_key = dev-secret\naws_session_token = dev-token\n[profile admin]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = default\n",
    );
    let home_var = ("HOME", home.display().to_string());

    let default = chain(std::slice::from_ref(&home_var), &clock)
        .credentials()
        .await
        .unwrap();
    assert_eq!(default.access_key_id(), "AKDEFAULT");
    assert_eq!(default.secret_access_key(), "default-secret");

    let dev = chain(&[home_var.clone(), ("AWS_PROFILE", "dev".into())], &clock)
        .credentials()
        .await
        .unwrap();
    assert_eq!(dev.access_key_id(), "AKDEV", "the credentials file wins");
    assert_eq!(
        dev.secret_access_key(),
        "dev-secret",
        "the rest from config"
    );
    assert_eq!(dev.session_token(), Some("dev-token"));

    let moved = write(
        &dir.path().join("elsewhere/creds"),
        "[default]\naws_access_key_id=AKMOVED\naws_secret_access_key=moved\n",
    );
    let credentials = chain(
        &[home_var.clone(), ("AWS_SHARED_CREDENTIALS_FILE", moved)],
        &clock,
    )
    .credentials()
    .await
    .unwrap();
    assert_eq!(credentials.access_key_id(), "AKMOVED");
    let config_only = write(
        &dir.path().join("elsewhere/config"),
        "[profile ops]\naws_access_key_id=AKOPS\naws_secret_access_key=ops\n",
    );
    let credentials = chain(
        &[
            home_var.clone(),
            ("AWS_CONFIG_FILE", config_only),
            ("AWS_PROFILE", "ops".into()),
        ],
        &clock,
    )
    .credentials()
    .await
    .unwrap();
    assert_eq!(credentials.access_key_id(), "AKOPS");

    let missing = chain(&[home_var.clone(), ("AWS_PROFILE", "nope".into())], &clock)
        .credentials()
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, ChainError::Failed { from: Source::Profile, reason } if reason.contains("no profile \"nope\"")),
        "{missing}"
    );
    let role = chain(&[home_var, ("AWS_PROFILE", "admin".into())], &clock)
        .credentials()
        .await
        .unwrap_err();
    assert!(role.to_string().contains("role_arn"), "{role}");
}

// Goal: the container endpoint: the relative URI is not reachable here, so the full URI
// on loopback; the authorization token (from its file before the variable) is sent; an
// endpoint on another host is refused before any request.
#[tokio::test]
async fn container_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let (addr, seen) = serve(|_| (200, credentials_json("AKECS"))).await;
    let token_file = write(&dir.path().join("token"), "file-token\n");
    let credentials = chain(
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://{addr}/v2/credentials/abc"),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "var-token".into()),
        ],
        &clock,
    )
    .credentials()
    .await
    .unwrap();
    assert_eq!(credentials.access_key_id(), "AKECS");
    assert_eq!(credentials.secret_access_key(), "secret-AKECS");
    assert_eq!(credentials.session_token(), Some("token-AKECS"));
    assert_eq!(
        credentials.expiry(),
        Some(UNIX_EPOCH + Duration::from_secs(EXPIRES_AT))
    );
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, "/v2/credentials/abc");
    assert_eq!(requests[0].header("authorization"), Some("file-token"));

    let refused = chain(
        &[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://example.com/creds".into(),
        )],
        &clock,
    )
    .credentials()
    .await
    .unwrap_err();
    assert!(
        matches!(
            &refused,
            ChainError::Failed {
                from: Source::Container,
                ..
            }
        ),
        "{refused}"
    );

    let (addr, _) = serve(|_| (403, "denied".into())).await;
    let denied = chain(
        &[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://{addr}/creds"),
        )],
        &clock,
    )
    .credentials()
    .await
    .unwrap_err();
    assert!(denied.to_string().contains("HTTP 403"), "{denied}");
}

// Goal: IMDSv2: a session token first (PUT with a TTL), then the role, then its
// credentials, each GET carrying the token; cached until REFRESH_BEFORE before the
// expiry, then fetched again.
#[tokio::test]
async fn instance_metadata_v2_and_cache() {
    let clock = clock();
    let (addr, seen) = serve(|seen| match (seen.method.as_str(), seen.path.as_str()) {
        ("PUT", "/latest/api/token") => (200, "session-token".into()),
        (_, _) if seen.header("x-aws-ec2-metadata-token") != Some("session-token") => {
            (401, String::new())
        }
        ("GET", "/latest/meta-data/iam/security-credentials/") => (200, "db-agent-role\n".into()),
        ("GET", "/latest/meta-data/iam/security-credentials/db-agent-role") => {
            (200, credentials_json("AKIMDS"))
        }
        _ => (404, String::new()),
    })
    .await;
    let chain = DefaultChain::with_env(
        Env::from_vars([(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://{addr}"),
        )]),
        Net::Tokio,
        clock.clone(),
    );
    let credentials = chain.credentials().await.unwrap();
    assert_eq!(credentials.access_key_id(), "AKIMDS");
    assert_eq!(credentials.session_token(), Some("token-AKIMDS"));
    {
        let requests = seen.lock().unwrap();
        let paths: Vec<(&str, &str)> = requests
            .iter()
            .map(|s| (s.method.as_str(), s.path.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("PUT", "/latest/api/token"),
                ("GET", "/latest/meta-data/iam/security-credentials/"),
                (
                    "GET",
                    "/latest/meta-data/iam/security-credentials/db-agent-role"
                ),
            ]
        );
        assert_eq!(
            requests[0].header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some("21600")
        );
    }

    // Cached: no request while more than REFRESH_BEFORE is left.
    clock.set(UnixTime::since_unix_epoch(Duration::from_secs(
        EXPIRES_AT - REFRESH_BEFORE.as_secs() - 1,
    )));
    chain.credentials().await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3);
    // Then fetched again.
    clock.set(UnixTime::since_unix_epoch(Duration::from_secs(
        EXPIRES_AT - REFRESH_BEFORE.as_secs() + 1,
    )));
    chain.credentials().await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 6);
}

// Goal: the order: environment, then files, then container, then instance metadata;
// with nothing configured the error lists why each source had nothing.
#[tokio::test]
async fn sources_are_tried_in_the_standard_order() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let home = dir.path().join("home");
    write(
        &home.join(".aws/credentials"),
        "[default]\naws_access_key_id=AKFILE\naws_secret_access_key=file\n",
    );
    let (ecs, ecs_seen) = serve(|_| (200, credentials_json("AKECS"))).await;
    let (imds, imds_seen) = serve(|seen| match seen.method.as_str() {
        "PUT" => (200, "t".into()),
        _ if seen.path.ends_with('/') => (200, "role".into()),
        _ => (200, credentials_json("AKIMDS")),
    })
    .await;
    let env = ("AWS_ACCESS_KEY_ID", "AKENV".to_owned());
    let env_secret = ("AWS_SECRET_ACCESS_KEY", "env".to_owned());
    let files = ("HOME", home.display().to_string());
    let container = (
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("http://{ecs}/creds"),
    );
    let metadata = (
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        format!("http://{imds}"),
    );
    let key_of = |vars: Vec<(&'static str, String)>| {
        let clock = clock.clone();
        async move {
            DefaultChain::with_env(Env::from_vars(vars), Net::Tokio, clock)
                .credentials()
                .await
                .unwrap()
                .access_key_id()
                .to_owned()
        }
    };
    let all = vec![
        env.clone(),
        env_secret.clone(),
        files.clone(),
        container.clone(),
        metadata.clone(),
    ];
    assert_eq!(key_of(all).await, "AKENV");
    let no_env = vec![files.clone(), container.clone(), metadata.clone()];
    assert_eq!(key_of(no_env).await, "AKFILE");
    assert_eq!(key_of(vec![container, metadata.clone()]).await, "AKECS");
    assert_eq!(key_of(vec![metadata]).await, "AKIMDS");
    assert_eq!(ecs_seen.lock().unwrap().len(), 1, "only when it was first");
    assert_eq!(imds_seen.lock().unwrap().len(), 3, "only when it was first");

    let empty = dir.path().join("empty-home");
    let none = chain(&[("HOME", empty.display().to_string())], &clock)
        .credentials()
        .await
        .unwrap_err();
    let ChainError::NotFound(reasons) = &none else {
        panic!("{none}");
    };
    assert_eq!(reasons.len(), 4, "{none}");
    assert!(reasons[0].contains("AWS_ACCESS_KEY_ID"), "{none}");
    assert!(reasons[1].contains("no profile \"default\""), "{none}");
    assert!(reasons[2].contains("container"), "{none}");
    assert!(reasons[3].contains("AWS_EC2_METADATA_DISABLED"), "{none}");
}
