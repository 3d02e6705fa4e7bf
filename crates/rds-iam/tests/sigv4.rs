//! RDS IAM tokens verify against the SigV4 presign rules, recomputed here from the
//! specification with fixed credentials and time, independently of the AWS SDK.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use postern_rds_iam::{Error, TokenSigner};
use postern_rt::WallClock;
use ring::{digest, hmac};
use rustls_pki_types::UnixTime;

const ACCESS_KEY: &str = "AKIDEXAMPLE";
const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const HOST: &str = "orders.cluster-abc123.eu-west-1.rds.amazonaws.com";

/// 2026-11-24T10:20:30Z, as a manual clock.
fn at() -> WallClock {
    WallClock::manual(UnixTime::since_unix_epoch(Duration::from_secs(
        1_795_515_630,
    )))
}

fn signer(session_token: Option<&str>) -> TokenSigner {
    let credentials = Credentials::new(
        ACCESS_KEY,
        SECRET_KEY,
        session_token.map(str::to_owned),
        None,
        "test",
    );
    TokenSigner::new("eu-west-1", credentials, at())
}

/// RFC 3986 percent-decoding of a query component (`+` is a space in form encoding).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// SigV4's URI encoding: everything but unreserved characters, upper-case hex.
fn sigv4_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
        .as_ref()
        .to_vec()
}

/// Checks a token as RDS would: parses it, rebuilds the canonical request and string to
/// sign, derives the signing key from the secret, and compares signatures. Returns the
/// query parameters on success.
fn verify(token: &str, secret: &str) -> Result<BTreeMap<String, String>, String> {
    let (authority, query) = token.split_once("/?").ok_or("no query")?;
    let mut params = BTreeMap::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').ok_or("bad pair")?;
        if params.insert(decode(k), decode(v)).is_some() {
            return Err(format!("duplicate parameter {k}"));
        }
    }
    let signature = params.remove("X-Amz-Signature").ok_or("no signature")?;
    if params.get("X-Amz-Algorithm").map(String::as_str) != Some("AWS4-HMAC-SHA256") {
        return Err("wrong algorithm".into());
    }
    if params.get("X-Amz-SignedHeaders").map(String::as_str) != Some("host") {
        return Err("signed headers must be exactly host".into());
    }
    let date_time = params.get("X-Amz-Date").ok_or("no date")?.clone();
    let credential = params
        .get("X-Amz-Credential")
        .ok_or("no credential")?
        .clone();
    let scope_parts: Vec<&str> = credential.splitn(2, '/').collect();
    let scope = scope_parts.get(1).ok_or("no scope")?.to_string();
    let scope_fields: Vec<&str> = scope.split('/').collect();
    if scope_fields.len() != 4 || scope_fields[2] != "rds-db" || scope_fields[3] != "aws4_request" {
        return Err(format!("bad scope {scope}"));
    }
    if !date_time.starts_with(scope_fields[0]) {
        return Err("scope date differs from X-Amz-Date".into());
    }
    let canonical_query = params
        .iter()
        .map(|(k, v)| format!("{}={}", sigv4_encode(k), sigv4_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let empty_payload = hex(digest::digest(&digest::SHA256, b"").as_ref());
    let canonical_request =
        format!("GET\n/\n{canonical_query}\nhost:{authority}\n\nhost\n{empty_payload}");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), scope_fields[0]);
    let k_region = hmac_sha256(&k_date, scope_fields[1]);
    let k_service = hmac_sha256(&k_region, scope_fields[2]);
    let k_signing = hmac_sha256(&k_service, scope_fields[3]);
    let expected = hex(&hmac_sha256(&k_signing, &string_to_sign));
    if expected != signature {
        return Err(format!(
            "signature mismatch: expected {expected}, token has {signature}"
        ));
    }
    Ok(params)
}

// A token signed at a fixed time with fixed credentials verifies and carries the
// action, user, host:port, region, 15-minute expiry and signing time.
#[tokio::test]
async fn token_verifies_against_the_sigv4_presign_rules() {
    let token = signer(None).token(HOST, 5432, "alice").await.unwrap();
    assert!(token.starts_with(&format!("{HOST}:5432/?")), "{token}");
    let params = verify(&token, SECRET_KEY).unwrap();
    assert_eq!(params["Action"], "connect");
    assert_eq!(params["DBUser"], "alice");
    assert_eq!(params["X-Amz-Expires"], "900");
    assert_eq!(params["X-Amz-Date"], "20261124T102030Z");
    assert_eq!(
        params["X-Amz-Credential"],
        "AKIDEXAMPLE/20261124/eu-west-1/rds-db/aws4_request"
    );
    insta::assert_snapshot!(token);
}

// The verifier is not a rubber stamp: a wrong secret, another user or another host fail.
#[tokio::test]
async fn tampered_tokens_do_not_verify() {
    let token = signer(None).token(HOST, 5432, "alice").await.unwrap();
    assert!(
        verify(&token, "not-the-secret")
            .unwrap_err()
            .contains("signature mismatch")
    );
    let other_user = token.replace("DBUser=alice", "DBUser=admin");
    assert!(
        verify(&other_user, SECRET_KEY)
            .unwrap_err()
            .contains("signature mismatch")
    );
    let other_port = token.replacen(":5432/", ":5433/", 1);
    assert!(
        verify(&other_port, SECRET_KEY)
            .unwrap_err()
            .contains("signature mismatch")
    );
}

// Temporary credentials add a signed session token, its special characters encoded.
#[tokio::test]
async fn session_tokens_verify() {
    let token = signer(Some("FwoGZXIvYXdzE+/session="))
        .token(HOST, 3306, "app_user-1@x")
        .await
        .unwrap();
    let params = verify(&token, SECRET_KEY).unwrap();
    assert_eq!(params["X-Amz-Security-Token"], "FwoGZXIvYXdzE+/session=");
    assert_eq!(params["DBUser"], "app_user-1@x");
}

// The signing time follows the injected clock: a minute later, a different date and
// signature.
#[tokio::test]
async fn signing_time_follows_the_clock() {
    let clock = at();
    let signer = TokenSigner::new(
        "eu-west-1",
        Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"),
        clock.clone(),
    );
    let first = signer.token(HOST, 5432, "alice").await.unwrap();
    clock.advance(Duration::from_secs(60));
    let second = signer.token(HOST, 5432, "alice").await.unwrap();
    assert_eq!(
        verify(&second, SECRET_KEY).unwrap()["X-Amz-Date"],
        "20261124T102130Z"
    );
    assert_ne!(first, second);
}

#[derive(Debug)]
struct NoCredentials;

impl ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
            "no providers in chain provided credentials",
        )))
    }
}

// Missing credentials give an error that says what the agent looked for and which IAM
// policy the identity needs, instead of an opaque failure.
#[tokio::test]
async fn missing_credentials_explain_the_needed_policy() {
    let signer = TokenSigner::new("eu-west-1", NoCredentials, WallClock::system());
    let err = signer.token(HOST, 5432, "alice").await.unwrap_err();
    assert!(matches!(err, Error::NoCredentials { .. }));
    let message = err.to_string();
    assert!(message.contains("AWS_ACCESS_KEY_ID"), "{message}");
    assert!(message.contains("rds-db:connect"), "{message}");
    assert!(
        message.contains("arn:aws:rds-db:eu-west-1:<account>:dbuser:<DbiResourceId>/alice"),
        "{message}"
    );
}

// Requests that cannot be signed are refused with the reason.
#[tokio::test]
async fn malformed_requests_are_refused() {
    let err = signer(None).token("", 5432, "alice").await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest { .. }), "{err}");
    let err = signer(None).token(HOST, 5432, "").await.unwrap_err();
    assert!(err.to_string().contains("database user is empty"), "{err}");
    let err = signer(None)
        .token("evil.example/?x=", 5432, "alice")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("plain DNS name"), "{err}");
    // The SDK would panic on the space, and `&` would add a parameter: refused first.
    for user in ["app user", "alice&Action=other", "bob#", "\u{fc}ser"] {
        let err = signer(None).token(HOST, 5432, user).await.unwrap_err();
        assert!(err.to_string().contains("letters, digits"), "{user}: {err}");
    }
}
