//! The user's commands (`postern login`, `status`, `logout`, `db ...`, `proxy db`), as
//! thin wrappers over `postern_client`: parse, call, print.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use postern_client::Error;
use postern_client::dbfiles::Protocol;
use postern_client::ops::{Client, LoginParams, format_time};
use postern_client::profile::{Home, split_addr};
use postern_client::render;
use postern_client::tls::{ALPN_POSTGRES, Trust, client_config};
use postern_rt::{Net, WallClock};

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Log in to a proxy with your password (and second factor); keeps a profile under
    /// ~/.postern.
    Login(LoginArgs),
    /// Show the current login: proxy, user, roles, expiry, logged-in databases.
    Status {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Log out of the current proxy: remove its profile, keys and database sections.
    Logout,
    /// List, log in to and connect to databases.
    #[command(subcommand)]
    Db(UserDb),
    /// Local proxies for clients that cannot present certificates.
    #[command(subcommand)]
    Proxy(ProxyCommand),
}

#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    /// The proxy's web address, HOST:PORT.
    #[arg(long, env = "POSTERN_PROXY")]
    proxy: String,
    /// Your Postern user name.
    #[arg(long, env = "POSTERN_USER")]
    user: String,
    /// Lifetime of the login, e.g. 8h (default 12h, capped by your roles).
    #[arg(long)]
    ttl: Option<String>,
    /// Read the password from the first line of stdin (and a TOTP code from the second,
    /// if any) instead of prompting.
    #[arg(long)]
    password_stdin: bool,
    /// The current TOTP code, for users with a second factor.
    #[arg(long)]
    totp: Option<String>,
    /// The cluster's host CA (PEM), to verify the proxy on a first login.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Where PostgreSQL clients connect, HOST:PORT (default: the proxy address).
    #[arg(long)]
    postgres_addr: Option<String>,
    /// Do not verify the proxy on this login (test clusters only). The CA it presents is
    /// saved and its fingerprint printed: compare it with your administrator's.
    #[arg(long)]
    danger_insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ConfigFormat {
    Text,
    Cmd,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserDb {
    /// List the databases your roles allow; `>` marks those you are logged in to.
    Ls {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Get a certificate for a database and write its client configuration sections.
    Login(DbTarget),
    /// Remove a database's certificate and sections (all databases without a name).
    Logout { name: Option<String> },
    /// Print environment variables for PostgreSQL or MySQL clients: eval $(postern db env).
    Env {
        #[arg(long = "db")]
        name: Option<String>,
    },
    /// Print host, port and certificate paths for GUI clients and drivers.
    Config {
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = ConfigFormat::Text)]
        format: ConfigFormat,
    },
    /// Run psql (or mysql) against a database, logging in again when needed. Arguments
    /// after `--` go to the client.
    Connect {
        #[command(flatten)]
        target: DbTarget,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct DbTarget {
    name: String,
    /// Database user (default: your user name, or what the last db login used).
    #[arg(long)]
    db_user: Option<String>,
    /// Database name (default: the database user's).
    #[arg(long)]
    db_name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProxyCommand {
    /// Listen on 127.0.0.1 for plain PostgreSQL connections and carry them to the proxy
    /// over TLS with your certificate for database NAME.
    Db {
        name: String,
        /// Local port (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

/// Runs a user command; prints errors for a person.
pub(crate) fn main(command: &UserCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: &UserCommand) -> Result<ExitCode, Error> {
    let client = Client::new(Home::from_env()?, Net::Tokio, WallClock::system());
    match command {
        UserCommand::Login(args) => login(&client, args).await?,
        UserCommand::Status { format } => {
            let status = client.status()?;
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                ),
                OutputFormat::Text => {
                    println!("> Profile URL:  {}", status.proxy);
                    println!("  Logged in as: {}", status.user);
                    println!("  Cluster:      {}", status.cluster);
                    println!("  Roles:        {}", status.roles.join(", "));
                    let state = if status.expired {
                        " (EXPIRED: run `postern login`)"
                    } else {
                        ""
                    };
                    println!(
                        "  Valid until:  {}{state}",
                        format_time(status.expires_unix)
                    );
                    println!("  Databases:    {}", status.databases.join(", "));
                }
            }
        }
        UserCommand::Logout => match client.logout()? {
            Some(proxy) => println!("Logged out of {proxy}."),
            None => println!("Not logged in."),
        },
        UserCommand::Db(command) => return db(&client, command).await,
        UserCommand::Proxy(ProxyCommand::Db { name, port }) => {
            proxy_db(&client, name, *port).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn login(client: &Client, args: &LoginArgs) -> Result<(), Error> {
    let ttl = args
        .ttl
        .as_deref()
        .map(postern_auth::duration::parse_duration)
        .transpose()
        .map_err(|error| Error::Usage(format!("--ttl: {error}")))?;
    let (password, stdin_totp) = if args.password_stdin {
        let mut lines = std::io::stdin().lock().lines();
        let password = lines
            .next()
            .transpose()
            .map_err(|error| Error::Usage(format!("cannot read the password from stdin: {error}")))?
            .unwrap_or_default();
        let totp = lines.next().transpose().ok().flatten();
        (password, totp)
    } else {
        (
            prompt_hidden(&format!("Password for {}: ", args.user))?,
            None,
        )
    };
    let mut params = LoginParams {
        proxy: args.proxy.clone(),
        postgres_addr: args.postgres_addr.clone(),
        user: args.user.clone(),
        password,
        totp: args.totp.clone().or(stdin_totp),
        ttl,
        ca_file: args.ca_file.clone(),
        danger_insecure_skip_verify: args.danger_insecure_skip_verify,
    };
    if params.danger_insecure_skip_verify {
        eprintln!(
            "WARNING: --danger-insecure-skip-verify: the proxy's identity is NOT checked on this login; \
             anyone between you and {} could read your password.",
            params.proxy
        );
    }
    let logged_in = match client.login(params.clone()).await {
        // A user with a second factor gets one chance to type it, when at a terminal.
        Err(Error::WrongPassword { .. }) if params.totp.is_none() && !args.password_stdin => {
            params.totp = Some(prompt_hidden("Second factor (TOTP code): ")?);
            client.login(params).await?
        }
        other => other?,
    };
    if args.danger_insecure_skip_verify {
        for fingerprint in &logged_in.ca_fingerprints {
            eprintln!("Saved the cluster's host CA without checking it: {fingerprint}");
        }
    }
    println!("> Profile URL:  {}", logged_in.profile.proxy);
    println!("  Logged in as: {}", logged_in.identity.user);
    println!("  Roles:        {}", logged_in.identity.roles.join(", "));
    println!(
        "  Valid until:  {}",
        format_time(logged_in.identity.expires.as_secs())
    );
    Ok(())
}

/// Reads a line from the terminal without echo.
fn prompt_hidden(prompt: &str) -> Result<String, Error> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| {
            Error::Usage("no terminal to ask for the password: use --password-stdin".to_owned())
        })?;
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(
                tty.try_clone()
                    .map(std::process::Stdio::from)
                    .unwrap_or(std::process::Stdio::null()),
            )
            .status()
    };
    let mut out = &tty;
    let _ = out.write_all(prompt.as_bytes());
    let _ = out.flush();
    let _ = stty("-echo");
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = stty("echo");
    let _ = out.write_all(b"\n");
    read.map_err(|error| Error::Usage(format!("cannot read from the terminal: {error}")))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn db(client: &Client, command: &UserDb) -> Result<ExitCode, Error> {
    match command {
        UserDb::Ls { format } => {
            let databases = client.databases().await?;
            match format {
                OutputFormat::Text => print!("{}", render::db_table(&databases)),
                OutputFormat::Json => print!("{}", render::db_json(&databases)),
            }
        }
        UserDb::Login(target) => {
            let db = client
                .db_login(
                    &target.name,
                    target.db_user.as_deref(),
                    target.db_name.as_deref(),
                )
                .await?;
            println!(
                "Logged in to database {:?} as db user {:?}.",
                db.name, db.user
            );
            match db.protocol {
                Protocol::Postgres => println!(
                    "Connect with: psql \"service={}\"   (or: postern db connect {})",
                    db.name, db.name
                ),
                _ => println!(
                    "Connect with: mysql --defaults-group-suffix=_{}   (or: postern db connect {})",
                    db.name, db.name
                ),
            }
        }
        UserDb::Logout { name } => {
            let names = client.db_logout(name.as_deref())?;
            if names.is_empty() {
                println!("No database was logged in.");
            }
            for name in names {
                println!("Logged out of database {name:?}.");
            }
        }
        UserDb::Env { name } => {
            let (profile, _) = client.session()?;
            let name = client.pick_database(&profile, name.as_deref())?;
            print!("{}", render::db_env(&client.connection(&profile, &name)?));
        }
        UserDb::Config { name, format } => {
            let (profile, _) = client.session()?;
            let name = client.pick_database(&profile, name.as_deref())?;
            let db = client.connection(&profile, &name)?;
            match format {
                ConfigFormat::Text => print!("{}", render::db_config_text(&db)),
                ConfigFormat::Cmd => print!("{}", render::db_config_cmd(&db)),
                ConfigFormat::Json => print!("{}", render::db_config_json(&db)),
            }
        }
        UserDb::Connect { target, args } => return connect(client, target, args).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(client: &Client, target: &DbTarget, args: &[String]) -> Result<ExitCode, Error> {
    let (profile, _) = client.session()?;
    let reason = client.relogin_reason(
        &profile,
        &target.name,
        target.db_user.as_deref(),
        target.db_name.as_deref(),
    );
    let db = match reason {
        Some(reason) => {
            eprintln!("Logging in to database {:?} first ({reason}).", target.name);
            client
                .db_login(
                    &target.name,
                    target.db_user.as_deref(),
                    target.db_name.as_deref(),
                )
                .await?
        }
        None => client.connection(&profile, &target.name)?,
    };
    let mut command = match db.protocol {
        Protocol::Postgres => {
            let mut command = std::process::Command::new("psql");
            command.arg(render::pg_conninfo(&db));
            command
        }
        _ => {
            let mut command = std::process::Command::new("mysql");
            command.arg(format!("--defaults-group-suffix=_{}", db.name));
            command
        }
    };
    command.args(args);
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command.status().map_err(|error| {
        Error::Usage(format!(
            "cannot run {program}: {error}; install it, or use `postern db config` for other clients"
        ))
    })?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

async fn proxy_db(client: &Client, name: &str, port: u16) -> Result<(), Error> {
    let (profile, _) = client.session()?;
    if client.relogin_reason(&profile, name, None, None).is_some() {
        eprintln!("Logging in to database {name:?} first.");
        client.db_login(name, None, None).await?;
    }
    let (profile, _) = client.session()?;
    let db = client.connection(&profile, name)?;
    if db.protocol != Protocol::Postgres {
        return Err(Error::Usage(format!(
            "`postern proxy db` carries PostgreSQL; {name:?} is not a PostgreSQL database"
        )));
    }
    let (host, _) = split_addr(&profile.postgres_addr)?;
    let cas = postern_pki::TrustedCa::from_pem_bundle(&std::fs::read_to_string(&db.ca).map_err(
        |source| Error::File {
            path: db.ca.clone(),
            source,
        },
    )?)?;
    let cert = rustls_pki_types::pem::PemObject::from_pem_file(&db.cert)
        .map_err(|error| Error::Tls(format!("{}: {error}", db.cert.display())))?;
    let key = postern_pki::PrivateKey::from_pem(&std::fs::read_to_string(&db.key).map_err(
        |source| Error::File {
            path: db.key.clone(),
            source,
        },
    )?)?;
    // On the proxy's TLS-routing web port the protocol is chosen by ALPN; on its
    // PostgreSQL port by the usual SSLRequest.
    let routing = profile.postgres_addr == profile.proxy;
    let tls = client_config(
        &Trust::Cas(cas),
        Some((vec![cert], key.to_rustls())),
        if routing { &[ALPN_POSTGRES] } else { &[] },
        &WallClock::system(),
    )?;
    let upstream = postern_client::local_proxy::Upstream {
        net: Net::Tokio,
        addr: profile.postgres_addr.clone(),
        server_name: rustls_pki_types::ServerName::try_from(host)
            .map_err(|error| Error::Usage(format!("proxy host name: {error}")))?,
        tls: Arc::clone(&tls),
        ssl_request: !routing,
    };
    let listener = Net::Tokio
        .listen(&format!("127.0.0.1:{port}"))
        .await
        .map_err(|source| Error::File {
            path: format!("127.0.0.1:{port}").into(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::File {
        path: "local listener".into(),
        source,
    })?;
    println!(
        "Proxying connections to {name} on {local}: psql \"host=127.0.0.1 port={} user={} dbname={} sslmode=disable\"",
        local.port(),
        db.user,
        if db.database.is_empty() {
            &db.user
        } else {
            &db.database
        }
    );
    let _ = std::io::stdout().flush();
    postern_client::local_proxy::serve(listener, upstream).await
}
