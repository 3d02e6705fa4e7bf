//! The `postern start` configuration: one TOML file whose sections name the roles this
//! process runs (`[auth]`, `[proxy]`, `[db]`), plus `[log]` and `[metrics]`.
//!
//! Every error names the file, line, column and field, e.g.
//! `postern.toml:12:3: proxy.listen_postgres: invalid socket address "x": ...`.
//! Parse errors carry a byte span from `toml`; the field is found by walking the
//! spanned document ([`toml::de::DeTable`]) to the deepest key whose span holds the
//! error. Semantic checks that run after parsing (no role enabled, a `[db]` without
//! proxies) go the other way: from the field to its span.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_auth::duration::parse_duration;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::de::{DeTable, DeValue};

/// Largest config file read: a config is a few kilobytes; anything far larger is a
/// wrong path.
pub(crate) const CONFIG_SIZE_MAX: u64 = 1024 * 1024;
/// Most databases one `[db]` section may serve.
pub(crate) const DATABASES_MAX: usize = 1000;

/// Defaults, one per setting, documented in docs/OPERATIONS.md.
pub(crate) const DATA_DIR_DEFAULT: &str = "/var/lib/postern";
pub(crate) const CLUSTER_NAME_DEFAULT: &str = "postern";
pub(crate) const AUTH_LISTEN_DEFAULT: &str = "0.0.0.0:3025";
pub(crate) const PROXY_LISTEN_POSTGRES_DEFAULT: &str = "0.0.0.0:5432";
pub(crate) const PROXY_LISTEN_WEB_DEFAULT: &str = "0.0.0.0:3080";
pub(crate) const PROXY_LISTEN_TUNNEL_DEFAULT: &str = "0.0.0.0:3024";
pub(crate) const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
pub(crate) const CONNECTIONS_PER_USER_DEFAULT: u32 = 100;
pub(crate) const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
pub(crate) const DYNAMIC_LABEL_PERIOD_MIN: Duration = Duration::from_secs(1);

/// A configuration that parsed and passed every check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Folder for durable files: auth state (`state.db`), audit log (`audit/`), the
    /// agent's audit spool.
    #[serde(default = "default_data_dir")]
    pub(crate) data_dir: PathBuf,
    pub(crate) auth: Option<AuthSection>,
    pub(crate) proxy: Option<ProxySection>,
    pub(crate) db: Option<DbSection>,
    #[serde(default)]
    pub(crate) log: LogSection,
    pub(crate) metrics: Option<MetricsSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSection {
    /// The auth API (mutual TLS).
    #[serde(default = "default_auth_listen")]
    pub(crate) listen: ListenAddr,
    /// Names (DNS or IP) proxies and agents reach this auth server by; they go into its
    /// certificate. `localhost` and `127.0.0.1` are always added.
    #[serde(default)]
    pub(crate) public_names: Vec<String>,
    #[serde(default = "default_cluster_name")]
    pub(crate) cluster_name: String,
    /// Shared PostgreSQL state and audit (several auth servers); absent: SQLite state
    /// and JSON-lines audit files under `data_dir`.
    pub(crate) postgres: Option<AuthPostgres>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthPostgres {
    /// libpq-style connection string: `host=... dbname=... user=...`.
    pub(crate) conninfo: String,
    #[serde(default = "default_schema")]
    pub(crate) schema: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxySection {
    /// PostgreSQL clients (SSLRequest negotiation).
    #[serde(default = "default_listen_postgres")]
    pub(crate) listen_postgres: ListenAddr,
    /// One-port mode: TLS routed by ALPN (`postern-postgres`), and the web API.
    #[serde(default = "default_listen_web")]
    pub(crate) listen_web: ListenAddr,
    /// Agents' reverse tunnels (SSH).
    #[serde(default = "default_listen_tunnel")]
    pub(crate) listen_tunnel: ListenAddr,
    /// The host name clients and agents reach this proxy by; goes into its
    /// certificates. Default: `localhost`.
    pub(crate) public_addr: Option<String>,
    /// A stable name for this proxy on its certificates (default: `proxy-` and the host
    /// name).
    pub(crate) host_id: Option<String>,
    /// The auth server, when it is not in this process.
    pub(crate) auth_addr: Option<DialAddr>,
    /// Single-use join token (`postern admin tokens add --type proxy`), when the auth
    /// server is not in this process.
    pub(crate) join_token: Option<String>,
    /// The cluster's host CA certificate (PEM), to trust the remote auth server.
    pub(crate) auth_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) limits: ProxyLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxyLimits {
    /// A client that has not finished its start-up within this is dropped.
    #[serde(default = "default_handshake_timeout")]
    pub(crate) handshake_timeout: Seconds,
    /// Most concurrent sessions per user; more are refused with an ErrorResponse.
    #[serde(default = "default_connections_per_user")]
    pub(crate) connections_per_user: u32,
    /// On shutdown, how long running sessions may continue before they are closed.
    #[serde(default = "default_drain_timeout")]
    pub(crate) drain_timeout: Seconds,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: default_handshake_timeout(),
            connections_per_user: default_connections_per_user(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DbSection {
    /// A stable name for this agent (default: `db-` and the host name).
    pub(crate) host_id: Option<String>,
    /// The auth server, when it is not in this process.
    pub(crate) auth_addr: Option<DialAddr>,
    /// Single-use join token (`postern admin tokens add --type db`).
    pub(crate) join_token: Option<String>,
    /// The cluster's host CA certificate (PEM), to trust the remote auth server.
    pub(crate) auth_ca_file: Option<PathBuf>,
    /// Tunnel addresses of the proxies to dial (`host:port` of their `listen_tunnel`).
    /// With a proxy in this process, it is dialled even when not listed.
    #[serde(default)]
    pub(crate) proxies: Vec<DialAddr>,
    /// On shutdown, how long running sessions may continue before they are closed.
    #[serde(default = "default_drain_timeout")]
    pub(crate) drain_timeout: Seconds,
    #[serde(default)]
    pub(crate) databases: Vec<DatabaseSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DatabaseSection {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) description: String,
    pub(crate) protocol: DbProtocolSetting,
    /// `host:port` of the database.
    pub(crate) uri: DialAddr,
    /// CA certificate(s) (PEM) the database's server certificate chains to. Default:
    /// the cluster's database CA (for servers set up with `admin auth sign`).
    pub(crate) ca_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) tls: DatabaseTls,
    pub(crate) aws: Option<AwsSection>,
    #[serde(default)]
    pub(crate) static_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) dynamic_labels: BTreeMap<String, DynamicLabel>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbProtocolSetting {
    Postgres,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DatabaseTls {
    #[serde(default)]
    pub(crate) mode: TlsModeSetting,
    /// The name to verify in the server's certificate, when it differs from the host
    /// in `uri`.
    pub(crate) server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum TlsModeSetting {
    #[default]
    VerifyFull,
    VerifyCa,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AwsSection {
    /// RDS/Aurora: the agent logs in with an IAM auth token for this region.
    pub(crate) region: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DynamicLabel {
    /// Program and arguments; its trimmed standard output is the label's value.
    pub(crate) command: Vec<String>,
    #[serde(default = "default_label_period")]
    pub(crate) period: Seconds,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    #[serde(default)]
    pub(crate) format: LogFormat,
    /// A `tracing` filter (`info`, `postern=debug,info`); `RUST_LOG` overrides it.
    pub(crate) level: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsSection {
    /// Plain HTTP `GET /metrics` in Prometheus text format.
    pub(crate) listen: ListenAddr,
}

/// A socket address to listen on: `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenAddr(pub(crate) SocketAddr);

/// An address to dial: `HOST:PORT`, the host a name or an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DialAddr(pub(crate) String);

impl DialAddr {
    pub(crate) fn host(&self) -> &str {
        let host = self.0.rsplit_once(':').map_or(self.0.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    #[cfg(test)]
    pub(crate) fn port(&self) -> u16 {
        self.0
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(0)
    }
}

/// A duration written `90s`, `30m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seconds(pub(crate) Duration);

fn default_data_dir() -> PathBuf {
    PathBuf::from(DATA_DIR_DEFAULT)
}
fn default_cluster_name() -> String {
    CLUSTER_NAME_DEFAULT.to_owned()
}
fn default_schema() -> String {
    "postern".to_owned()
}
fn listen(text: &str) -> ListenAddr {
    // The defaults are literals that parse; a typo in one is caught by the tests.
    ListenAddr(text.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))))
}
fn default_auth_listen() -> ListenAddr {
    listen(AUTH_LISTEN_DEFAULT)
}
fn default_listen_postgres() -> ListenAddr {
    listen(PROXY_LISTEN_POSTGRES_DEFAULT)
}
fn default_listen_web() -> ListenAddr {
    listen(PROXY_LISTEN_WEB_DEFAULT)
}
fn default_listen_tunnel() -> ListenAddr {
    listen(PROXY_LISTEN_TUNNEL_DEFAULT)
}
fn default_handshake_timeout() -> Seconds {
    Seconds(HANDSHAKE_TIMEOUT_DEFAULT)
}
fn default_connections_per_user() -> u32 {
    CONNECTIONS_PER_USER_DEFAULT
}
fn default_drain_timeout() -> Seconds {
    Seconds(DRAIN_TIMEOUT_DEFAULT)
}
fn default_label_period() -> Seconds {
    Seconds(Duration::from_secs(60))
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "invalid socket address {text:?}: write IP:PORT, e.g. 0.0.0.0:3080 or 127.0.0.1:0"
            ))
        })
    }
}

impl<'de> Deserialize<'de> for DialAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.chars().any(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|port| port != 0)
        });
        if valid {
            Ok(DialAddr(text))
        } else {
            Err(de::Error::custom(format!(
                "invalid address {text:?}: write HOST:PORT, e.g. db.example.com:5432"
            )))
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(Seconds)
            .map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for TlsModeSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "verify-full" => Ok(Self::VerifyFull),
            "verify-ca" => Ok(Self::VerifyCa),
            "insecure" => Err(de::Error::custom(
                "\"insecure\" is not supported: Postern always verifies the database's certificate; use verify-ca when its name does not match",
            )),
            _ => Err(de::Error::custom(format!(
                "unknown TLS mode {text:?}: use verify-full (the default) or verify-ca"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for DbProtocolSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "postgres" => Ok(Self::Postgres),
            "mysql" => Err(de::Error::custom(
                "\"mysql\" is not supported yet: this build serves PostgreSQL only",
            )),
            _ => Err(de::Error::custom(format!(
                "unknown protocol {text:?}: use postgres"
            ))),
        }
    }
}

/// A config error: where, which field, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    pub(crate) file: String,
    /// 1-based line and column; `None` for errors about the whole file.
    pub(crate) position: Option<(usize, usize)>,
    /// Dotted field path, `db.databases[0].uri`; empty for syntax errors.
    pub(crate) field: String,
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks the config file at `path`.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let whole = |message: String| ConfigError {
        file: file.clone(),
        position: None,
        field: String::new(),
        message,
    };
    let metadata = std::fs::metadata(path)
        .map_err(|error| whole(format!("cannot read the config file: {error}")))?;
    if metadata.len() > CONFIG_SIZE_MAX {
        return Err(whole(format!(
            "{} bytes is larger than a config can be ({CONFIG_SIZE_MAX} bytes); is this the right file?",
            metadata.len()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| whole(format!("cannot read the config file: {error}")))?;
    parse(&file, &text)
}

/// Parses and checks config text; `file` names it in errors.
pub(crate) fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|error| {
        let message = error.message().trim().to_owned();
        match error.span() {
            Some(span) => {
                let field = field_at(text, &span);
                ConfigError {
                    file: file.to_owned(),
                    position: Some(line_column(text, span.start)),
                    field,
                    message,
                }
            }
            None => ConfigError {
                file: file.to_owned(),
                position: None,
                field: String::new(),
                message,
            },
        }
    })?;
    check(&config).map_err(|(field, message)| ConfigError {
        file: file.to_owned(),
        position: span_of(text, &field).map(|span| line_column(text, span.start)),
        field,
        message,
    })?;
    Ok(config)
}

/// Checks across fields. Returns the field to blame (dotted path) and the message.
fn check(config: &Config) -> Result<(), (String, String)> {
    if config.auth.is_none() && config.proxy.is_none() && config.db.is_none() {
        return Err((
            String::new(),
            "no role enabled: add an [auth], [proxy] or [db] section (all three for a single machine)".to_owned(),
        ));
    }
    if let Some(auth) = &config.auth {
        check_name("auth.cluster_name", &auth.cluster_name)?;
    }
    let local_auth = config.auth.is_some();
    if let Some(proxy) = &config.proxy {
        check_remote_auth(
            "proxy",
            local_auth,
            &proxy.auth_addr,
            &proxy.join_token,
            &proxy.auth_ca_file,
        )?;
        if let Some(host_id) = &proxy.host_id {
            check_name("proxy.host_id", host_id)?;
        }
        let limits = &proxy.limits;
        if limits.handshake_timeout.0.is_zero() {
            return Err((
                "proxy.limits.handshake_timeout".to_owned(),
                "must be longer than 0s, e.g. \"10s\"".to_owned(),
            ));
        }
        if limits.connections_per_user == 0 {
            return Err((
                "proxy.limits.connections_per_user".to_owned(),
                "must be at least 1 (0 would refuse everyone)".to_owned(),
            ));
        }
        let ports = [
            ("proxy.listen_postgres", proxy.listen_postgres),
            ("proxy.listen_web", proxy.listen_web),
            ("proxy.listen_tunnel", proxy.listen_tunnel),
        ];
        for (i, (field, addr)) in ports.iter().enumerate() {
            let clash = ports[..i]
                .iter()
                .find(|(_, other)| addr.0.port() != 0 && other.0 == addr.0);
            if let Some((other, _)) = clash {
                return Err((
                    (*field).to_owned(),
                    format!(
                        "{} is also {other}: give each listener its own port",
                        addr.0
                    ),
                ));
            }
        }
    }
    if let Some(db) = &config.db {
        check_remote_auth(
            "db",
            local_auth,
            &db.auth_addr,
            &db.join_token,
            &db.auth_ca_file,
        )?;
        if db.proxies.is_empty() && config.proxy.is_none() {
            return Err((
                "db".to_owned(),
                "no proxies to dial: list their tunnel addresses in db.proxies = [\"proxy.example.com:3024\"], or add a [proxy] section to run one here".to_owned(),
            ));
        }
        if db.databases.is_empty() {
            return Err((
                "db".to_owned(),
                "no databases: add a [[db.databases]] section with name, protocol and uri"
                    .to_owned(),
            ));
        }
        if db.databases.len() > DATABASES_MAX {
            return Err((
                "db.databases".to_owned(),
                format!(
                    "{} databases is more than one agent serves ({DATABASES_MAX}); split them over several agents",
                    db.databases.len()
                ),
            ));
        }
        if let Some(host_id) = &db.host_id {
            check_name("db.host_id", host_id)?;
        }
        for (i, database) in db.databases.iter().enumerate() {
            let at = |field: &str| format!("db.databases[{i}].{field}");
            check_name(&at("name"), &database.name)?;
            if let Some(first) = db.databases[..i]
                .iter()
                .position(|other| other.name == database.name)
            {
                return Err((
                    at("name"),
                    format!(
                        "{:?} is also the name of db.databases[{first}]: names must be unique",
                        database.name
                    ),
                ));
            }
            if let Some(region) = &database.aws
                && region.region.trim().is_empty()
            {
                return Err((at("aws.region"), "empty region, e.g. \"eu-west-1\"".into()));
            }
            for (name, label) in &database.dynamic_labels {
                let field = format!("db.databases[{i}].dynamic_labels.{name}");
                if database.static_labels.contains_key(name) {
                    return Err((
                        field,
                        format!("{name:?} is also a static label: a label has one source"),
                    ));
                }
                if label.command.is_empty() || label.command[0].is_empty() {
                    return Err((
                        format!("{field}.command"),
                        "empty command: write the program and its arguments, e.g. [\"uname\", \"-r\"]"
                            .into(),
                    ));
                }
                if label.period.0 < DYNAMIC_LABEL_PERIOD_MIN {
                    return Err((
                        format!("{field}.period"),
                        format!(
                            "shorter than {}s: a command that often would load the host",
                            DYNAMIC_LABEL_PERIOD_MIN.as_secs()
                        ),
                    ));
                }
            }
        }
    }
    if let Some(level) = &config.log.level
        && let Err(error) = tracing_subscriber::EnvFilter::try_new(level)
    {
        return Err((
            "log.level".to_owned(),
            format!(
                "{level:?} is not a tracing filter ({error}); write e.g. \"info\" or \"postern=debug,info\""
            ),
        ));
    }
    Ok(())
}

fn check_name(field: &str, name: &str) -> Result<(), (String, String)> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err((
            field.to_owned(),
            format!("{name:?}: use 1 to 64 of letters, digits and . _ -"),
        ))
    }
}

/// A proxy or agent without the auth server in this process needs its address, a join
/// token and the CA to trust it by.
fn check_remote_auth(
    section: &str,
    local_auth: bool,
    addr: &Option<DialAddr>,
    token: &Option<String>,
    ca_file: &Option<PathBuf>,
) -> Result<(), (String, String)> {
    if local_auth {
        if addr.is_some() || token.is_some() || ca_file.is_some() {
            let field = if addr.is_some() {
                "auth_addr"
            } else if token.is_some() {
                "join_token"
            } else {
                "auth_ca_file"
            };
            return Err((
                format!("{section}.{field}"),
                "the auth server runs in this process: remove this setting, or remove [auth] to join a remote one".to_owned(),
            ));
        }
        return Ok(());
    }
    let kind = if section == "db" { "db" } else { "proxy" };
    if addr.is_none() {
        return Err((
            section.to_owned(),
            format!(
                "no auth server: set {section}.auth_addr = \"auth.example.com:3025\", or add an [auth] section to run it here"
            ),
        ));
    }
    if token.as_deref().is_none_or(str::is_empty) {
        return Err((
            section.to_owned(),
            format!(
                "no join token: create one with `postern admin tokens add --type {kind}` and set {section}.join_token"
            ),
        ));
    }
    if ca_file.is_none() {
        return Err((
            section.to_owned(),
            format!(
                "no CA to trust the auth server by: set {section}.auth_ca_file to the cluster's host CA certificate"
            ),
        ));
    }
    Ok(())
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The dotted path of the deepest key whose key or value span holds `span`.
fn field_at(text: &str, span: &Range<usize>) -> String {
    let Ok(document) = DeTable::parse(text) else {
        return String::new();
    };
    let mut best: Option<Vec<String>> = None;
    search_table(document.get_ref(), span, &mut Vec::new(), &mut best);
    best.map(|path| render_path(&path)).unwrap_or_default()
}

fn search_table(
    table: &DeTable<'_>,
    span: &Range<usize>,
    path: &mut Vec<String>,
    best: &mut Option<Vec<String>>,
) {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        if (contains(&key.span(), span) || contains(&value.span(), span))
            && best.as_ref().is_none_or(|b| b.len() < path.len())
        {
            *best = Some(path.clone());
        }
        search_value(value.get_ref(), span, path, best);
        path.pop();
    }
}

fn search_value(
    value: &DeValue<'_>,
    span: &Range<usize>,
    path: &mut Vec<String>,
    best: &mut Option<Vec<String>>,
) {
    match value {
        DeValue::Table(table) => search_table(table, span, path, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(format!("[{i}]"));
                if contains(&item.span(), span)
                    && best.as_ref().is_none_or(|b| b.len() < path.len())
                {
                    *best = Some(path.clone());
                }
                search_value(item.get_ref(), span, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn render_path(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if !part.starts_with('[') && !out.is_empty() {
            out.push('.');
        }
        out.push_str(part);
    }
    out
}

/// The span of the key (or array item) that `field` (a dotted path, `a.b[0].c`) names,
/// or of its nearest existing ancestor.
fn span_of(text: &str, field: &str) -> Option<Range<usize>> {
    let document = DeTable::parse(text).ok()?;
    let mut parts = Vec::new();
    for segment in field.split('.').filter(|s| !s.is_empty()) {
        match segment.split_once('[') {
            Some((key, index)) => {
                parts.push((key.to_owned(), None));
                let index = index.trim_end_matches(']').parse::<usize>().ok()?;
                parts.push((String::new(), Some(index)));
            }
            None => parts.push((segment.to_owned(), None)),
        }
    }
    let mut found = None;
    // Owned steps: a config file is small and read once.
    let mut current = DeValue::Table(document.into_inner());
    for (key, index) in parts {
        let next = match (&current, index) {
            (DeValue::Array(items), Some(i)) => {
                let Some(item) = items.get(i) else {
                    return found;
                };
                found = Some(item.span());
                item.get_ref().clone()
            }
            (DeValue::Table(table), None) => {
                let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == key.as_str()) else {
                    return found;
                };
                found = Some(k.span());
                v.get_ref().clone()
            }
            _ => return found,
        };
        current = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The all-in-one example shipped with the tree.
    const EXAMPLE: &str = include_str!("../../../../testdata/examples/postern.toml");

    const ALL_IN_ONE: &str = r#"
data_dir = "/tmp/postern"

[auth]
listen = "127.0.0.1:3025"

[proxy]
listen_postgres = "127.0.0.1:5432"

[db]
[[db.databases]]
name = "orders"
protocol = "postgres"
uri = "localhost:5433"
static_labels = { env = "dev" }
"#;

    // Bad configs: each error names file, line, column and field, and says what to do.
    // One snapshot holds them all so a reviewer reads them side by side.
    #[test]
    fn bad_configs_name_file_line_column_and_field() {
        let cases: &[(&str, &str)] = &[
            ("syntax error", "[proxy\nlisten_postgres = 1\n"),
            ("no role", "[log]\nformat = \"json\"\n"),
            ("empty file", ""),
            (
                "invalid listen address",
                "[auth]\n\n[proxy]\nlisten_web = \"127.0.0.1:3080\"\n  listen_postgres = \"x\"\n",
            ),
            ("unknown top-level field", "[auth]\n[prxy]\n"),
            (
                "unknown field",
                "[auth]\nlisten = \"127.0.0.1:1\"\nclustername = \"a\"\n",
            ),
            ("wrong type", "[auth]\npublic_names = \"localhost\"\n"),
            (
                "db without proxies",
                "[auth]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5432\"\n",
            ),
            ("db without databases", "[auth]\n[proxy]\n[db]\n"),
            (
                "unknown tls mode",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5432\"\ntls.mode = \"verify-none\"\n",
            ),
            (
                "insecure tls mode",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5432\"\ntls = { mode = \"insecure\" }\n",
            ),
            (
                "missing uri in second database",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5432\"\n\n[[db.databases]]\nname = \"b\"\nprotocol = \"postgres\"\n",
            ),
            (
                "duplicate database name",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5432\"\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5433\"\n",
            ),
            (
                "mysql",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"mysql\"\nuri = \"localhost:3306\"\n",
            ),
            (
                "uri without port",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost\"\n",
            ),
            (
                "bad duration",
                "[auth]\n[proxy]\nlimits.handshake_timeout = \"10 parsecs\"\n",
            ),
            (
                "zero connections per user",
                "[auth]\n[proxy.limits]\nconnections_per_user = 0\n",
            ),
            (
                "negative connections per user",
                "[auth]\n[proxy.limits]\nconnections_per_user = -1\n",
            ),
            (
                "same port twice",
                "[auth]\n[proxy]\nlisten_postgres = \"127.0.0.1:7000\"\nlisten_web = \"127.0.0.1:7000\"\n",
            ),
            ("proxy without auth", "[proxy]\n"),
            (
                "proxy without token",
                "[proxy]\nauth_addr = \"auth.example.com:3025\"\n",
            ),
            (
                "join token beside local auth",
                "[auth]\n[proxy]\njoin_token = \"abc\"\n",
            ),
            (
                "dynamic label with empty command",
                "[auth]\n[proxy]\n[db]\n[[db.databases]]\nname = \"a\"\nprotocol = \"postgres\"\nuri = \"localhost:5432\"\n[db.databases.dynamic_labels.kernel]\ncommand = []\n",
            ),
            ("bad log format", "[auth]\n[log]\nformat = \"xml\"\n"),
            ("bad log level", "[auth]\n[log]\nlevel = \"info,[\"\n"),
            (
                "bad cluster name",
                "[auth]\ncluster_name = \"my cluster\"\n",
            ),
            (
                "bad metrics address",
                "[auth]\n[metrics]\nlisten = \"localhost:9090\"\n",
            ),
        ];
        let mut report = String::new();
        for (name, text) in cases {
            let error = parse("postern.toml", text).expect_err(name).to_string();
            report.push_str(&format!("--- {name}\n{error}\n"));
        }
        insta::assert_snapshot!(report);
    }

    // The position points at the offending key, counted in characters from 1.
    #[test]
    fn position_is_the_line_and_column_of_the_field() {
        let text = "[auth]\n\n[proxy]\n  listen_postgres = \"x\"\n";
        let error = parse("p.toml", text).unwrap_err();
        assert_eq!(error.field, "proxy.listen_postgres");
        assert_eq!(error.position, Some((4, 21)));
        let error = parse("p.toml", "[auth]\n[proxy]\njoin_token = \"t\"\n").unwrap_err();
        assert_eq!(error.field, "proxy.join_token");
        assert_eq!(error.position, Some((3, 1)));
    }

    // The example config and a minimal all-in-one parse, with the defaults filled in.
    #[test]
    fn good_configs_parse_with_defaults() {
        let config = parse("postern.toml", ALL_IN_ONE).unwrap();
        let auth = config.auth.unwrap();
        assert_eq!(auth.cluster_name, "postern");
        assert_eq!(auth.listen.0.to_string(), "127.0.0.1:3025");
        let proxy = config.proxy.unwrap();
        assert_eq!(proxy.listen_web.0.to_string(), PROXY_LISTEN_WEB_DEFAULT);
        assert_eq!(
            proxy.listen_tunnel.0.to_string(),
            PROXY_LISTEN_TUNNEL_DEFAULT
        );
        assert_eq!(proxy.limits, ProxyLimits::default());
        let db = config.db.unwrap();
        assert_eq!(db.databases[0].uri.host(), "localhost");
        assert_eq!(db.databases[0].uri.port(), 5433);
        assert_eq!(db.databases[0].tls.mode, TlsModeSetting::VerifyFull);
        assert_eq!(config.log, LogSection::default());
        assert!(config.metrics.is_none());

        let example = parse("postern.toml", EXAMPLE).unwrap();
        assert!(example.auth.is_some() && example.proxy.is_some() && example.db.is_some());
        assert!(example.metrics.is_some());
    }

    // The split example (one role per machine) parses: each file alone is a config.
    #[test]
    fn split_examples_parse() {
        let auth = include_str!("../../../../testdata/examples/split/auth.toml");
        let proxy = include_str!("../../../../testdata/examples/split/proxy.toml");
        let db = include_str!("../../../../testdata/examples/split/db.toml");
        let auth = parse("auth.toml", auth).unwrap();
        assert!(auth.auth.is_some() && auth.proxy.is_none() && auth.db.is_none());
        let proxy = parse("proxy.toml", proxy).unwrap();
        let section = proxy.proxy.unwrap();
        assert!(proxy.auth.is_none() && proxy.db.is_none());
        assert_eq!(section.host_id.as_deref(), Some("proxy-1"));
        assert_eq!(section.auth_addr.unwrap().host(), "auth.example.com");
        let db = parse("db.toml", db).unwrap();
        assert!(db.auth.is_none() && db.proxy.is_none());
        assert_eq!(db.db.unwrap().proxies[0].0, "proxy.example.com:3024");
    }

    // Every default listen address is a valid socket address (the fallback never runs).
    #[test]
    fn default_addresses_parse() {
        for text in [
            AUTH_LISTEN_DEFAULT,
            PROXY_LISTEN_POSTGRES_DEFAULT,
            PROXY_LISTEN_WEB_DEFAULT,
            PROXY_LISTEN_TUNNEL_DEFAULT,
        ] {
            assert!(text.parse::<SocketAddr>().is_ok(), "{text}");
        }
    }

    // A remote agent: auth elsewhere, joins with a token, dials listed proxies.
    #[test]
    fn remote_agent_parses() {
        let text = r#"
[db]
auth_addr = "auth.example.com:3025"
join_token = "abc123"
auth_ca_file = "/etc/postern/host-ca.pem"
proxies = ["proxy-1.example.com:3024", "[::1]:3024"]
drain_timeout = "1m"

[[db.databases]]
name = "aurora"
protocol = "postgres"
uri = "aurora.cluster-x.eu-west-1.rds.amazonaws.com:5432"
ca_cert_file = "/etc/postern/rds-ca.pem"
tls = { mode = "verify-ca", server_name = "aurora.internal" }
aws = { region = "eu-west-1" }
dynamic_labels.kernel = { command = ["uname", "-r"], period = "5m" }
"#;
        let config = parse("agent.toml", text).unwrap();
        let db = config.db.unwrap();
        assert_eq!(db.proxies[1].host(), "::1");
        assert_eq!(db.drain_timeout, Seconds(Duration::from_secs(60)));
        let aurora = &db.databases[0];
        assert_eq!(aurora.tls.mode, TlsModeSetting::VerifyCa);
        assert_eq!(aurora.aws.as_ref().unwrap().region, "eu-west-1");
        assert_eq!(
            aurora.dynamic_labels["kernel"].period,
            Seconds(Duration::from_secs(300))
        );
    }

    proptest::proptest! {
        // Any all-in-one config built from valid values parses back to those values.
        #[test]
        fn generated_good_configs_parse(
            ports in proptest::collection::hash_set(1u16..u16::MAX, 4),
            timeout_s in 1u64..100_000,
            per_user in 1u32..100_000,
            name in "[a-z][a-z0-9_.-]{0,30}",
            labels in proptest::collection::btree_map("[a-z]{1,8}", "[a-zA-Z0-9 ]{0,12}", 0..4),
            json in proptest::bool::ANY,
        ) {
            let ports: Vec<u16> = ports.into_iter().collect();
            let expected_labels = labels.clone();
            let labels: String = labels
                .iter()
                .map(|(k, v)| format!("{k} = {v:?}\n"))
                .collect();
            let text = format!(
                "[auth]\ncluster_name = {name:?}\n[proxy]\nlisten_postgres = \"127.0.0.1:{}\"\nlisten_web = \"127.0.0.1:{}\"\nlisten_tunnel = \"127.0.0.1:{}\"\n[proxy.limits]\nhandshake_timeout = \"{timeout_s}s\"\nconnections_per_user = {per_user}\n[log]\nformat = \"{}\"\n[db]\n[[db.databases]]\nname = {name:?}\nprotocol = \"postgres\"\nuri = \"db.internal:{}\"\n[db.databases.static_labels]\n{labels}",
                ports[0], ports[1], ports[2],
                if json { "json" } else { "text" },
                ports[3],
            );
            let config = parse("generated.toml", &text).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}\n{text}")))?;
            let proxy = config.proxy.unwrap();
            proptest::prop_assert_eq!(proxy.listen_postgres.0.port(), ports[0]);
            proptest::prop_assert_eq!(proxy.limits.handshake_timeout.0.as_secs(), timeout_s);
            proptest::prop_assert_eq!(proxy.limits.connections_per_user, per_user);
            let db = config.db.unwrap();
            proptest::prop_assert_eq!(&db.databases[0].name, &name);
            proptest::prop_assert_eq!(db.databases[0].uri.port(), ports[3]);
            proptest::prop_assert_eq!(&db.databases[0].static_labels, &expected_labels);
        }
    }
}
