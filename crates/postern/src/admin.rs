//! The administration commands: they open the auth state and audit log directly and
//! go through the same audited operations as the auth API.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use postern_auth::audit::{AuditLog, AuditQuery, FileAuditLog, PostgresAuditLog};
use postern_auth::backend::{Backend, PostgresBackend, SqliteBackend};
use postern_auth::duration::{format_duration, parse_duration};
use postern_auth::role::parse_role_file;
use postern_auth::server::{AuthConfig, AuthServer, TokenKind};
use postern_auth::totp::Totp;
use postern_auth::user::{PasswordCost, Traits};
use postern_pki::CaKind;
use postern_rt::{Rng, WallClock};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cli::{
    Admin, Audit, AuthCommand, CaType, Cli, Command, Db, Format, Roles, TokenType, Tokens, Users,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Length of generated passwords.
const GENERATED_PASSWORD_LEN: usize = 24;

pub(crate) async fn run(cli: Cli) -> Result<(), BoxError> {
    let runtime = postern_rt::Runtime::production(cli.state.data_dir.clone())?;
    let clock = runtime.clock().clone();
    let rng = runtime.rng().clone();
    let config = AuthConfig {
        cluster: cli.state.cluster.clone(),
        password_cost: PasswordCost::default(),
        login_limits: Default::default(),
    };
    match &cli.state.postgres {
        None => {
            let dir = &cli.state.data_dir;
            std::fs::create_dir_all(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
            let backend = SqliteBackend::open(&dir.join("state.db"), Arc::new(clock.clone()))?;
            let audit = FileAuditLog::open(&dir.join("audit"))?;
            let server = AuthServer::new(backend, audit, clock, rng.clone(), config)?;
            execute(&server, &rng, cli.command).await
        }
        Some(conninfo) => {
            let schema = &cli.state.postgres_schema;
            let backend =
                PostgresBackend::connect(conninfo, schema, Arc::new(clock.clone())).await?;
            let audit = PostgresAuditLog::connect(conninfo, schema).await?;
            let server = AuthServer::new(backend, audit, clock, rng.clone(), config)?;
            execute(&server, &rng, cli.command).await
        }
    }
}

/// Who is acting, for the audit log: the operating-system user running the command.
/// `USER` and `LOGNAME` are often unset for root in services and CI, so the process's
/// own uid, named through /etc/passwd, is the fallback.
fn actor() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .or_else(process_user)
        .unwrap_or_else(|| "unknown".to_owned());
    format!("admin:{user}")
}

/// The name of the account this process runs as, or `uid N` if it has none.
fn process_user() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let entry_uid = fields.nth(1)?.parse::<u32>().ok()?;
        (entry_uid == uid).then(|| name.to_owned())
    });
    Some(name.unwrap_or_else(|| format!("uid {uid}")))
}

async fn execute<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    rng: &Rng,
    command: Command,
) -> Result<(), BoxError> {
    match command {
        Command::Start(_) => Err("`postern start` does not open the state as a command".into()),
        Command::User(_) => Err("the user's commands do not open the auth state".into()),
        Command::Admin(Admin::Users(command)) => users(server, rng, command).await,
        Command::Admin(Admin::Roles(command)) => roles(server, command).await,
        Command::Admin(Admin::Tokens(Tokens::Add { kind, ttl })) => {
            let ttl = parse_duration(&ttl).map_err(|reason| format!("--ttl: {reason}"))?;
            let kind = match kind {
                TokenType::Db => TokenKind::Db,
                TokenType::Proxy => TokenKind::Proxy,
            };
            let token = server.create_join_token(&actor(), kind, ttl).await?;
            println!("{token}");
            eprintln!(
                "A {kind} host can join with this token once, within {}.",
                format_duration(ttl)
            );
            Ok(())
        }
        Command::Admin(Admin::Auth(command)) => auth(server, command).await,
        Command::Admin(Admin::Db(Db::Ls { format })) => {
            let listed = server.list_databases(None).await?;
            if format == Format::Json {
                for entry in &listed {
                    let line = serde_json::json!({
                        "name": entry.database.name,
                        "description": entry.database.description,
                        "protocol": entry.database.protocol,
                        "labels": entry.database.labels,
                        "agents": entry.host_ids,
                    });
                    println!("{line}");
                }
                return Ok(());
            }
            let rows = listed
                .iter()
                .map(|entry| {
                    vec![
                        entry.database.name.clone(),
                        entry.database.protocol.to_string(),
                        entry.database.description.clone(),
                        labels(&entry.database.labels),
                        entry.host_ids.join(","),
                    ]
                })
                .collect();
            print_table(
                &["NAME", "PROTOCOL", "DESCRIPTION", "LABELS", "AGENTS"],
                rows,
            );
            Ok(())
        }
        Command::Audit(Audit::Search {
            from,
            to,
            since,
            event,
            user,
            session,
            limit,
        }) => {
            let now = server_now(server);
            let to = match to {
                Some(to) => OffsetDateTime::parse(&to, &Rfc3339)
                    .map_err(|error| format!("--to {to:?}: {error}"))?,
                None => now + time::Duration::seconds(1),
            };
            let from = match from {
                Some(from) => OffsetDateTime::parse(&from, &Rfc3339)
                    .map_err(|error| format!("--from {from:?}: {error}"))?,
                None => {
                    let since =
                        parse_duration(&since).map_err(|reason| format!("--since: {reason}"))?;
                    now - time::Duration::seconds(
                        i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
                    )
                }
            };
            let query = AuditQuery {
                event,
                user,
                session_id: session,
                limit,
                ..AuditQuery::between(from, to)
            };
            let mut out = std::io::stdout().lock();
            for event in server.audit_log().search(&query).await? {
                writeln!(out, "{}", serde_json::to_string(&event)?)?;
            }
            Ok(())
        }
    }
}

fn server_now<B: Backend, A: AuditLog>(server: &AuthServer<B, A>) -> OffsetDateTime {
    let clock: &WallClock = server.clock();
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(clock.now_ms()) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn read_password(from_stdin: bool, rng: &Rng) -> Result<(String, bool), BoxError> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        return Ok((line.trim_end_matches(['\r', '\n']).to_owned(), false));
    }
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let password = (0..GENERATED_PASSWORD_LEN)
        .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len() as u64) as usize]))
        .collect();
    Ok((password, true))
}

/// A role name with a typo would silently grant nothing: say so.
async fn warn_missing_roles<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    name: &str,
) -> Result<(), BoxError> {
    let user = server.state().user(name).await?;
    let existing = server.state().roles_of(&user).await?;
    for role in &user.roles {
        if !existing.iter().any(|known| &known.name == role) {
            eprintln!(
                "warning: role {role:?} does not exist (yet); it grants nothing until applied. `postern admin roles ls` lists the roles."
            );
        }
    }
    Ok(())
}

fn show_totp(name: &str, totp: &Totp) {
    println!("TOTP secret for {name}: {}", totp.secret_base32());
    println!("TOTP URI: {}", totp.uri("Postern", name));
}

async fn users<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    rng: &Rng,
    command: Users,
) -> Result<(), BoxError> {
    match command {
        Users::Add {
            name,
            roles,
            db_users,
            db_names,
            traits,
            password_stdin,
            totp,
        } => {
            let mut external: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for entry in traits {
                let (trait_name, value) = entry
                    .split_once('=')
                    .ok_or_else(|| format!("--trait {entry:?}: write NAME=VALUE"))?;
                external
                    .entry(trait_name.to_owned())
                    .or_default()
                    .push(value.to_owned());
            }
            let traits = Traits {
                db_users,
                db_names,
                external,
            };
            let (password, generated) = read_password(password_stdin, rng)?;
            let secret = server
                .create_user(&actor(), &name, roles, traits, Some(&password), totp)
                .await?;
            println!("User {name:?} created.");
            warn_missing_roles(server, &name).await?;
            if generated {
                println!("Password: {password}");
            }
            if let Some(secret) = secret {
                show_totp(&name, &secret);
            }
            Ok(())
        }
        Users::Ls { format } => {
            let users = server.state().users().await?;
            if format == Format::Json {
                for user in users {
                    let line = serde_json::json!({
                        "name": user.name,
                        "roles": user.roles,
                        "traits": user.traits,
                        "totp": user.totp.is_some(),
                    });
                    println!("{line}");
                }
                return Ok(());
            }
            let rows = users
                .into_iter()
                .map(|user| {
                    let mut traits = BTreeMap::new();
                    if !user.traits.db_users.is_empty() {
                        traits.insert("db_users".to_owned(), user.traits.db_users.join("|"));
                    }
                    if !user.traits.db_names.is_empty() {
                        traits.insert("db_names".to_owned(), user.traits.db_names.join("|"));
                    }
                    for (name, values) in &user.traits.external {
                        traits.insert(name.clone(), values.join("|"));
                    }
                    let totp = if user.totp.is_some() { "yes" } else { "no" };
                    vec![
                        user.name,
                        user.roles.join(","),
                        labels(&traits),
                        totp.to_owned(),
                    ]
                })
                .collect();
            print_table(&["NAME", "ROLES", "TRAITS", "TOTP"], rows);
            Ok(())
        }
        Users::Rm { name } => {
            server.delete_user(&actor(), &name).await?;
            println!("User {name:?} deleted.");
            Ok(())
        }
        Users::ResetPassword {
            name,
            password_stdin,
            totp,
        } => {
            let (password, generated) = read_password(password_stdin, rng)?;
            let secret = server
                .reset_password(&actor(), &name, &password, totp)
                .await?;
            println!("Password of {name:?} reset.");
            if generated {
                println!("Password: {password}");
            }
            if let Some(secret) = secret {
                show_totp(&name, &secret);
            }
            Ok(())
        }
    }
}

async fn roles<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    command: Roles,
) -> Result<(), BoxError> {
    match command {
        Roles::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|error| format!("{}: {error}", file.display()))?;
            let roles = parse_role_file(&file.display().to_string(), &text)?;
            let existed = server.apply_roles(&actor(), &roles).await?;
            for (role, existed) in roles.iter().zip(existed) {
                println!(
                    "Role {:?} {}.",
                    role.name,
                    if existed { "updated" } else { "created" }
                );
            }
            Ok(())
        }
        Roles::Ls { format } => {
            let roles = server.state().roles().await?;
            if format == Format::Json {
                for role in roles {
                    println!("{}", serde_json::to_string(&role)?);
                }
                return Ok(());
            }
            let rows = roles
                .into_iter()
                .map(|role| {
                    let ttl = role
                        .max_session_ttl()
                        .map(format_duration)
                        .unwrap_or_else(|| "-".to_owned());
                    vec![
                        role.name.clone(),
                        describe_rules(&role.allow),
                        describe_rules(&role.deny),
                        ttl,
                    ]
                })
                .collect();
            print_table(&["NAME", "ALLOW", "DENY", "MAX TTL"], rows);
            Ok(())
        }
        Roles::Rm { name } => {
            server.delete_role(&actor(), &name).await?;
            println!("Role {name:?} deleted.");
            Ok(())
        }
    }
}

async fn auth<B: Backend, A: AuditLog>(
    server: &AuthServer<B, A>,
    command: AuthCommand,
) -> Result<(), BoxError> {
    match command {
        AuthCommand::Sign {
            format: _,
            hosts,
            out,
            ttl,
        } => {
            let ttl = parse_duration(&ttl).map_err(|reason| format!("--ttl: {reason}"))?;
            let files = server.sign_db_server(&actor(), &hosts, ttl).await?;
            let prefix = out.display().to_string();
            let paths = [
                format!("{prefix}.crt"),
                format!("{prefix}.key"),
                format!("{prefix}.cas"),
            ];
            for path in &paths {
                if Path::new(path).exists() {
                    return Err(format!("{path} exists; remove it or choose another --out").into());
                }
            }
            write_file(&paths[0], &files.server_crt, 0o644)?;
            write_file(&paths[1], &files.server_key, 0o600)?;
            write_file(&paths[2], &files.server_cas, 0o644)?;
            println!(
                "Wrote {}, {} and {} (valid for {}).",
                paths[0],
                paths[1],
                paths[2],
                format_duration(ttl)
            );
            println!(
                "PostgreSQL: ssl = on, ssl_cert_file = '{}', ssl_key_file = '{}', ssl_ca_file = '{}',",
                paths[0], paths[1], paths[2]
            );
            println!("            and `hostssl all all ::/0 cert` in pg_hba.conf.");
            println!(
                "MySQL/MariaDB: ssl-cert={}, ssl-key={}, ssl-ca={}; users REQUIRE SUBJECT '/CN=NAME'.",
                paths[0], paths[1], paths[2]
            );
            Ok(())
        }
        AuthCommand::Rotate { kind } => {
            let kinds: &[(CaKind, &str)] = match kind {
                CaType::User => &[(CaKind::User, "user")],
                CaType::Host => &[(CaKind::Host, "host")],
                CaType::Db => &[(CaKind::Db, "db")],
                CaType::All => &[
                    (CaKind::User, "user"),
                    (CaKind::Host, "host"),
                    (CaKind::Db, "db"),
                ],
            };
            for (kind, name) in kinds {
                let phase = server.rotate_ca(&actor(), *kind).await?;
                println!("{name} CA rotation: now in phase {phase}");
            }
            Ok(())
        }
    }
}

fn write_file(path: &str, contents: &str, mode: u32) -> Result<(), BoxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| format!("{path}: {error}"))?;
    file.write_all(contents.as_bytes())
        .map_err(|error| format!("{path}: {error}"))?;
    file.sync_all()
        .map_err(|error| format!("{path}: {error}"))?;
    Ok(())
}

/// One side of a role on one line: `labels: env=dev; users: alice; names: *`, or `-`.
fn describe_rules(rules: &postern_auth::role::Rules) -> String {
    let list = |patterns: &[postern_auth::role::Pattern]| {
        patterns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = Vec::new();
    if !rules.db_labels.is_empty() {
        let selector: BTreeMap<String, String> = rules
            .db_labels
            .iter()
            .map(|(key, values)| (key.clone(), list(values).replace(',', "|")))
            .collect();
        parts.push(format!("labels: {}", labels(&selector)));
    }
    if !rules.db_users.is_empty() {
        parts.push(format!("users: {}", list(&rules.db_users)));
    }
    if !rules.db_names.is_empty() {
        parts.push(format!("names: {}", list(&rules.db_names)));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}
