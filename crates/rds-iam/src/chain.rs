//! The standard AWS credential chain, in the SDK's order, without `aws-config` (which
//! brings aws-lc-rs beside ring, and probes the network from tests):
//!
//! 1. **Environment**: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
//! 2. **Shared files**: profile `AWS_PROFILE` (default `default`) from
//!    `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`, sections `[NAME]`) and
//!    `AWS_CONFIG_FILE` (default `~/.aws/config`, sections `[profile NAME]` or
//!    `[default]`); a key in the credentials file wins over the same key in the config
//!    file. Static keys only: a profile that assumes a role, uses SSO or runs a process
//!    is refused with a message.
//! 3. **Container** (ECS, EKS Pod Identity): `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
//!    (on `http://169.254.170.2`) or `AWS_CONTAINER_CREDENTIALS_FULL_URI` (plain HTTP, to
//!    a loopback or the container endpoints' addresses), with the header
//!    `Authorization` from `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
//! 4. **EC2 instance metadata**, IMDSv2 only (a session token first), at
//!    `AWS_EC2_METADATA_SERVICE_ENDPOINT` (default `http://169.254.169.254`), unless
//!    `AWS_EC2_METADATA_DISABLED=true`.
//!
//! The first source that is configured answers; a configured source that fails is an
//! error (as in the SDK: a broken profile does not silently fall through to the instance
//! role). Credentials that expire (container, instance metadata) are cached until
//! [`REFRESH_BEFORE`] before they do; the environment and files are read at every call,
//! so rotated values are picked up.
//!
//! Time comes from the runtime seam's clock and connections from its network, so tests
//! (and simulations) decide both; the environment is a value ([`Env`]) for the same
//! reason.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials};
use postern_rt::{Net, WallClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Cached credentials are fetched again this long before they expire.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Longest an HTTP exchange with the container or instance metadata endpoint may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response read from those endpoints (they answer a few hundred bytes).
const HTTP_RESPONSE_MAX: usize = 64 * 1024;
/// Lifetime asked for an IMDSv2 session token.
const IMDS_TOKEN_TTL_SECS: u32 = 21_600;

const ECS_HOST: &str = "169.254.170.2";
const IMDS_DEFAULT: &str = "http://169.254.169.254";

/// The environment variables the chain reads (and `HOME`), as a value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The process's environment now (only `AWS_*` and `HOME` are kept).
    pub fn process() -> Self {
        Self::from_vars(
            std::env::vars().filter(|(name, _)| name.starts_with("AWS_") || name == "HOME"),
        )
    }

    /// An environment of the given variables.
    pub fn from_vars<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A variable's value; unset and empty are the same.
    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn home_file(&self, relative: &str) -> Option<PathBuf> {
        self.get("HOME")
            .map(|home| PathBuf::from(home).join(relative))
    }
}

/// Where the chain reads its environment at each call.
#[derive(Clone, Debug)]
enum EnvSource {
    Process,
    Fixed(Env),
}

/// The standard credential chain (see the module's comment).
#[derive(Clone)]
pub struct DefaultChain {
    env: EnvSource,
    net: Net,
    clock: WallClock,
    cache: Arc<Mutex<Option<Credentials>>>,
}

impl fmt::Debug for DefaultChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the cached secrets.
        f.debug_struct("DefaultChain")
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

/// Which source answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Environment,
    Profile,
    Container,
    InstanceMetadata,
}

impl Source {
    /// The provider name written into the credentials.
    pub fn name(self) -> &'static str {
        match self {
            Self::Environment => "environment",
            Self::Profile => "profile",
            Self::Container => "container",
            Self::InstanceMetadata => "instance-metadata",
        }
    }
}

/// Why the chain has no credentials: each source's reason, in order, or the one
/// configured source that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("no AWS credentials found: {}", .0.join("; "))]
    NotFound(Vec<String>),
    #[error("AWS credentials from the {}: {reason}", .from.name())]
    Failed { from: Source, reason: String },
}

/// A source's answer: credentials, not configured (why), or configured but failed.
enum Answer {
    Found(Credentials),
    NotConfigured(String),
}

impl DefaultChain {
    /// The chain over the process's environment, read at each call.
    pub fn new(net: Net, clock: WallClock) -> Self {
        Self::with_source(EnvSource::Process, net, clock)
    }

    /// The chain over a fixed environment (tests, or a daemon's own settings).
    pub fn with_env(env: Env, net: Net, clock: WallClock) -> Self {
        Self::with_source(EnvSource::Fixed(env), net, clock)
    }

    fn with_source(env: EnvSource, net: Net, clock: WallClock) -> Self {
        Self {
            env,
            net,
            clock,
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// Credentials from the first configured source.
    pub async fn credentials(&self) -> Result<Credentials, ChainError> {
        let env = match &self.env {
            EnvSource::Process => Env::process(),
            EnvSource::Fixed(env) => env.clone(),
        };
        let mut reasons = Vec::new();
        for source in [Source::Environment, Source::Profile] {
            let answer = match source {
                Source::Environment => from_environment(&env),
                _ => from_profile(&env),
            }
            .map_err(|reason| ChainError::Failed {
                from: source,
                reason,
            })?;
            match answer {
                Answer::Found(credentials) => return Ok(credentials),
                Answer::NotConfigured(reason) => reasons.push(reason),
            }
        }
        if let Some(cached) = self.cached() {
            return Ok(cached);
        }
        for source in [Source::Container, Source::InstanceMetadata] {
            let answer = match source {
                Source::Container => self.container(&env).await,
                _ => self.instance_metadata(&env).await,
            }
            .map_err(|reason| ChainError::Failed {
                from: source,
                reason,
            })?;
            match answer {
                Answer::Found(credentials) => {
                    if let Ok(mut cache) = self.cache.lock() {
                        *cache = Some(credentials.clone());
                    }
                    return Ok(credentials);
                }
                Answer::NotConfigured(reason) => reasons.push(reason),
            }
        }
        Err(ChainError::NotFound(reasons))
    }

    /// The cached credentials while they are valid for longer than [`REFRESH_BEFORE`].
    fn cached(&self) -> Option<Credentials> {
        let cache = self.cache.lock().ok()?;
        let credentials = cache.as_ref()?;
        let expiry = credentials.expiry()?;
        let now = UNIX_EPOCH + Duration::from_millis(self.clock.now_ms());
        (now + REFRESH_BEFORE < expiry).then(|| credentials.clone())
    }

    async fn container(&self, env: &Env) -> Result<Answer, String> {
        let url = if let Some(relative) = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            if !relative.starts_with('/') {
                return Err(format!(
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI {relative:?} must start with /"
                ));
            }
            Url {
                host: ECS_HOST.to_owned(),
                port: 80,
                path: relative.to_owned(),
            }
        } else if let Some(full) = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
            let url = Url::parse(full).map_err(|reason| {
                format!("AWS_CONTAINER_CREDENTIALS_FULL_URI {full:?}: {reason}")
            })?;
            if !url.container_host_allowed() {
                return Err(format!(
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI {full:?}: plain HTTP is only allowed to a loopback address or the container credential endpoints (169.254.170.2, 169.254.170.23, fd00:ec2::23)"
                ));
            }
            url
        } else {
            return Ok(Answer::NotConfigured(
                "no container endpoint (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/FULL_URI unset)"
                    .to_owned(),
            ));
        };
        let mut headers = Vec::new();
        if let Some(path) = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            let token = std::fs::read_to_string(path).map_err(|error| {
                format!("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {path}: {error}")
            })?;
            headers.push(("Authorization", token.trim().to_owned()));
        } else if let Some(token) = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
            headers.push(("Authorization", token.to_owned()));
        }
        let body = self.http("GET", &url, &headers).await?;
        parse_credentials_json(&body, Source::Container).map(Answer::Found)
    }

    async fn instance_metadata(&self, env: &Env) -> Result<Answer, String> {
        if env
            .get("AWS_EC2_METADATA_DISABLED")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Ok(Answer::NotConfigured(
                "instance metadata disabled (AWS_EC2_METADATA_DISABLED=true)".to_owned(),
            ));
        }
        let endpoint = env
            .get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or(IMDS_DEFAULT);
        let base = Url::parse(endpoint).map_err(|reason| {
            format!("AWS_EC2_METADATA_SERVICE_ENDPOINT {endpoint:?}: {reason}")
        })?;
        let at = |path: &str| Url {
            path: format!("{}{path}", base.path.trim_end_matches('/')),
            ..base.clone()
        };
        let token = self
            .http(
                "PUT",
                &at("/latest/api/token"),
                &[(
                    "X-aws-ec2-metadata-token-ttl-seconds",
                    IMDS_TOKEN_TTL_SECS.to_string(),
                )],
            )
            .await
            .map_err(|reason| format!("IMDSv2 session token from {endpoint}: {reason}"))?;
        let token = String::from_utf8(token)
            .map_err(|_| "the IMDSv2 session token is not text".to_owned())?;
        let headers = [("X-aws-ec2-metadata-token", token.trim().to_owned())];
        let roles = self
            .http(
                "GET",
                &at("/latest/meta-data/iam/security-credentials/"),
                &headers,
            )
            .await
            .map_err(|reason| {
                format!(
                    "the instance's IAM role: {reason}; does the instance have an instance profile?"
                )
            })?;
        let roles = String::from_utf8_lossy(&roles);
        let role = roles
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .ok_or_else(|| "the instance has no IAM role (instance profile)".to_owned())?;
        if !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        {
            return Err(format!("the instance metadata named an odd role {role:?}"));
        }
        let body = self
            .http(
                "GET",
                &at(&format!(
                    "/latest/meta-data/iam/security-credentials/{role}"
                )),
                &headers,
            )
            .await
            .map_err(|reason| format!("credentials of role {role}: {reason}"))?;
        parse_credentials_json(&body, Source::InstanceMetadata).map(Answer::Found)
    }

    /// One HTTP/1.1 exchange (`Connection: close`); the body of a 200 answer.
    async fn http(
        &self,
        method: &str,
        url: &Url,
        headers: &[(&str, String)],
    ) -> Result<Vec<u8>, String> {
        let exchange = async {
            let mut connection = self
                .net
                .connect(&url.authority())
                .await
                .map_err(|error| format!("cannot connect to {}: {error}", url.authority()))?;
            let mut request = format!(
                "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n",
                url.path,
                url.authority()
            );
            for (name, value) in headers {
                if value.contains(['\r', '\n']) {
                    return Err(format!("the {name} header holds a line break"));
                }
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            request.push_str("\r\n");
            connection
                .write_all(request.as_bytes())
                .await
                .map_err(|error| error.to_string())?;
            let mut response = Vec::new();
            (&mut connection)
                .take(HTTP_RESPONSE_MAX as u64 + 1)
                .read_to_end(&mut response)
                .await
                .map_err(|error| error.to_string())?;
            if response.len() > HTTP_RESPONSE_MAX {
                return Err(format!("answer longer than {HTTP_RESPONSE_MAX} bytes"));
            }
            Ok(response)
        };
        let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer from {} within {HTTP_TIMEOUT:?}", url.authority()))??;
        let (status, body) = parse_response(&response)?;
        if status != 200 {
            let text = String::from_utf8_lossy(&body);
            return Err(format!(
                "HTTP {status}: {}",
                text.trim().chars().take(200).collect::<String>()
            ));
        }
        Ok(body)
    }
}

impl ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.credentials().await.map_err(|error| match error {
                ChainError::NotFound(_) => CredentialsError::not_loaded(error.to_string()),
                ChainError::Failed { .. } => CredentialsError::provider_error(error.to_string()),
            })
        })
    }
}

fn from_environment(env: &Env) -> Result<Answer, String> {
    match (
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(key), Some(secret)) => Ok(Answer::Found(Credentials::new(
            key,
            secret,
            env.get("AWS_SESSION_TOKEN").map(str::to_owned),
            None,
            Source::Environment.name(),
        ))),
        (Some(_), None) => {
            Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".to_owned())
        }
        (None, Some(_)) => {
            Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".to_owned())
        }
        (None, None) => Ok(Answer::NotConfigured(
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY unset".to_owned(),
        )),
    }
}

/// Profile settings that need more than static keys, which this chain does not do.
const UNSUPPORTED_PROFILE_KEYS: [&str; 5] = [
    "role_arn",
    "sso_session",
    "sso_start_url",
    "credential_process",
    "web_identity_token_file",
];

fn from_profile(env: &Env) -> Result<Answer, String> {
    let explicit = env.get("AWS_PROFILE");
    let profile = explicit.unwrap_or("default");
    let credentials_file = env
        .get("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env.home_file(".aws/credentials"));
    let config_file = env
        .get("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| env.home_file(".aws/config"));
    let read = |path: &Option<PathBuf>| -> Result<Option<String>, String> {
        let Some(path) = path else { return Ok(None) };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(format!("cannot read {}: {error}", path.display())),
        }
    };
    let mut settings = BTreeMap::new();
    let mut found = false;
    // Config first, so that the credentials file's keys replace its.
    if let Some(text) = read(&config_file)?
        && let Some(section) = ini_section(&text, |name| {
            name == format!("profile {profile}") || (profile == "default" && name == "default")
        })
    {
        found = true;
        settings.extend(section);
    }
    if let Some(text) = read(&credentials_file)?
        && let Some(section) = ini_section(&text, |name| name == profile)
    {
        found = true;
        settings.extend(section);
    }
    let files = || {
        [&credentials_file, &config_file]
            .iter()
            .filter_map(|p| p.as_ref().map(|p| p.display().to_string()))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    if !found {
        return match explicit {
            Some(_) => Err(format!(
                "AWS_PROFILE={profile}, but no profile {profile:?} in {}",
                files()
            )),
            None => Ok(Answer::NotConfigured(format!(
                "no profile \"default\" in {}",
                if files().is_empty() {
                    "any shared file (HOME unset)".to_owned()
                } else {
                    files()
                }
            ))),
        };
    }
    match (
        settings.get("aws_access_key_id"),
        settings.get("aws_secret_access_key"),
    ) {
        (Some(key), Some(secret)) => Ok(Answer::Found(Credentials::new(
            key,
            secret,
            settings.get("aws_session_token").cloned(),
            None,
            Source::Profile.name(),
        ))),
        _ => {
            if let Some(key) = UNSUPPORTED_PROFILE_KEYS
                .iter()
                .find(|key| settings.contains_key(**key))
            {
                return Err(format!(
                    "profile {profile:?} uses {key}, which Postern does not support: give it aws_access_key_id and aws_secret_access_key, or use the environment, a container or the instance's IAM role"
                ));
            }
            let missing = if settings.contains_key("aws_access_key_id") {
                "aws_secret_access_key"
            } else {
                "aws_access_key_id"
            };
            Err(format!("profile {profile:?} has no {missing}"))
        }
    }
}

/// The keys and values of the first INI section whose name (`[ name ]`, trimmed)
/// satisfies `wanted`. Comments start with `#` or `;`; keys are lower-cased.
fn ini_section(text: &str, wanted: impl Fn(&str) -> bool) -> Option<BTreeMap<String, String>> {
    let mut section: Option<BTreeMap<String, String>> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if section.is_some() {
                break;
            }
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            if wanted(&name) {
                section = Some(BTreeMap::new());
            }
            continue;
        }
        if let Some(section) = &mut section
            && let Some((key, value)) = line.split_once('=')
        {
            section.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    section
}

/// The JSON both the container endpoint and the instance metadata answer with.
fn parse_credentials_json(body: &[u8], source: Source) -> Result<Credentials, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("answer is not JSON: {error}"))?;
    let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
    if let Some(code) = field("Code")
        && code != "Success"
    {
        return Err(format!(
            "the endpoint answered Code {code:?}: {}",
            field("Message").unwrap_or("")
        ));
    }
    let (Some(key), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("the answer has no AccessKeyId and SecretAccessKey".to_owned());
    };
    let expiry = match field("Expiration") {
        Some(text) => Some(parse_time(text)?),
        None => None,
    };
    Ok(Credentials::new(
        key,
        secret,
        field("Token").map(str::to_owned),
        expiry,
        source.name(),
    ))
}

fn parse_time(text: &str) -> Result<SystemTime, String> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|error| format!("Expiration {text:?}: {error}"))?;
    let secs = u64::try_from(time.unix_timestamp())
        .map_err(|_| format!("Expiration {text:?} is before 1970"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A plain-HTTP URL: `http://HOST[:PORT]/PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Url {
    host: String,
    port: u16,
    path: String,
}

impl Url {
    fn parse(text: &str) -> Result<Self, String> {
        let rest = text.strip_prefix("http://").ok_or_else(|| {
            "only http:// URLs are supported (the endpoints are plain HTTP)".to_owned()
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().map_err(|_| format!("bad port {port:?}"))?,
                None if after.is_empty() => 80,
                None => return Err(format!("junk after the host: {after:?}")),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_owned(),
                    port.parse().map_err(|_| format!("bad port {port:?}"))?,
                ),
                None => (authority.to_owned(), 80),
            }
        };
        if host.is_empty() || host.contains(['@', ' ']) {
            return Err(format!("bad host {host:?}"));
        }
        if path.contains([' ', '\r', '\n']) {
            return Err("the path holds spaces or line breaks".to_owned());
        }
        Ok(Self {
            host,
            port,
            path: path.to_owned(),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The SDK's rule for plain HTTP to a full container URI.
    fn container_host_allowed(&self) -> bool {
        const CONTAINER_ENDPOINTS: [&str; 3] = ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"];
        match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ip.is_loopback()
                    || CONTAINER_ENDPOINTS
                        .iter()
                        .any(|endpoint| endpoint.parse() == Ok(ip))
            }
            Err(_) => self.host.eq_ignore_ascii_case("localhost"),
        }
    }
}

/// Status and body of an HTTP/1.1 response (Content-Length, chunked, or to the end).
fn parse_response(response: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer is not HTTP (no end of headers)")?;
    let head = std::str::from_utf8(&response[..split]).map_err(|_| "the headers are not text")?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("the answer is not HTTP: {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    if chunked {
        return dechunk(body).map(|body| (status, body));
    }
    match length {
        Some(length) => body
            .get(..length)
            .map(|body| (status, body.to_vec()))
            .ok_or_else(|| "the answer ended early".to_owned()),
        None => Ok((status, body.to_vec())),
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut")?;
        let size_text = std::str::from_utf8(&body[..end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("a chunk is cut")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("a chunk is cut")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_container_hosts_are_checked() {
        let url = Url::parse("http://127.0.0.1:8080/creds?x=1").unwrap();
        assert_eq!(url.authority(), "127.0.0.1:8080");
        assert_eq!(url.path, "/creds?x=1");
        assert!(url.container_host_allowed());
        let url = Url::parse("http://169.254.170.23/v1/credentials").unwrap();
        assert_eq!(url.port, 80);
        assert!(url.container_host_allowed());
        let url = Url::parse("http://[fd00:ec2::23]/x").unwrap();
        assert_eq!(url.authority(), "[fd00:ec2::23]:80");
        assert!(url.container_host_allowed());
        assert!(
            !Url::parse("http://example.com/x")
                .unwrap()
                .container_host_allowed()
        );
        assert!(
            !Url::parse("http://10.0.0.1/x")
                .unwrap()
                .container_host_allowed()
        );
        assert!(Url::parse("https://example.com/x").is_err());
        assert!(Url::parse("http://a b/x").is_err());
    }

    #[test]
    fn responses_parse_with_length_chunks_or_to_the_end() {
        let (status, body) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"abc"[..]));
        let (status, body) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"abcde"[..]));
        let (status, body) = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((status, body.as_slice()), (404, &b"nope"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn ini_sections_are_found_by_name() {
        let text = "# comment\n[default]\naws_access_key_id = A\n\n[profile dev]\n; c\nAWS_Secret_Access_Key=B\n[other]\nx=y\n";
        let default = ini_section(text, |n| n == "default").unwrap();
        assert_eq!(
            default.get("aws_access_key_id").map(String::as_str),
            Some("A")
        );
        let dev = ini_section(text, |n| n == "profile dev").unwrap();
        assert_eq!(
            dev.get("aws_secret_access_key").map(String::as_str),
            Some("B")
        );
        assert_eq!(dev.len(), 1);
        assert!(ini_section(text, |n| n == "missing").is_none());
    }
}
