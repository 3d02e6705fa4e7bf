//! A throwaway PostgreSQL server.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{
    Account, account, chown_tree, command_as, port_open, run, running_as_root, succeeded,
    wait_until, write_private,
};
use crate::{Psql, ServerTls};

/// How to start a [`PostgresServer`].
#[derive(Clone, Debug, Default)]
pub struct PostgresOptions {
    /// Serve TLS with this material. With it, TCP clients must use TLS and authenticate
    /// with a client certificate whose CN is the database user (`hostssl all all … cert`),
    /// as a self-hosted database behind Postern is set up.
    pub tls: Option<ServerTls>,
    /// How TCP clients authenticate; by default a client certificate with TLS, and
    /// trust without.
    pub tcp_auth: Option<TcpAuth>,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

/// How TCP clients of a [`PostgresServer`] authenticate (the `pg_hba.conf` method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpAuth {
    /// No authentication.
    Trust,
    /// A client certificate whose CN is the user (requires TLS).
    Cert,
    /// A cleartext password over TLS, as RDS asks for IAM auth tokens (requires TLS).
    Password,
}

impl TcpAuth {
    fn method(self) -> &'static str {
        match self {
            TcpAuth::Trust => "trust",
            TcpAuth::Cert => "cert",
            TcpAuth::Password => "password",
        }
    }
}

/// A PostgreSQL server on 127.0.0.1 and a Unix socket in its own folder; stopped and
/// deleted on drop. The superuser is `postgres`, reachable over the socket without a
/// password (for test set-up); TCP clients authenticate as the options say.
#[derive(Debug)]
pub struct PostgresServer {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    user: Option<&'static str>,
    child: Option<Child>,
}

impl PostgresServer {
    pub fn start(options: PostgresOptions) -> io::Result<Self> {
        let bin = postgres_bin()?;
        let user = running_as_root().then_some("postgres");
        let dir = tempfile::Builder::new().prefix("postern-pg-").tempdir()?;
        let owner: Option<Account> = user.map(account).transpose()?;
        let data = dir.path().join("data");
        if let Some(owner) = owner {
            chown_tree(dir.path(), owner)?;
        }

        let mut initdb = command_as(user, &bin.join("initdb").to_string_lossy());
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C");
        run(initdb, "initdb")?;

        let port = crate::free_port()?;
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", dir.path().display()),
            "fsync = off".to_owned(),
            "max_connections = 200".to_owned(),
        ];
        // Local socket for set-up; TCP as the options say, and nothing else.
        let mut hba = vec!["local all all trust".to_owned()];
        if let Some(tls) = &options.tls {
            write_private(&data.join("server.crt"), &tls.cert_pem)?;
            write_private(&data.join("server.key"), &tls.key_pem)?;
            write_private(&data.join("client_ca.crt"), &tls.client_ca_pem)?;
            conf.extend([
                "ssl = on".to_owned(),
                "ssl_cert_file = 'server.crt'".to_owned(),
                "ssl_key_file = 'server.key'".to_owned(),
                "ssl_ca_file = 'client_ca.crt'".to_owned(),
                "ssl_min_protocol_version = 'TLSv1.2'".to_owned(),
            ]);
            let method = options.tcp_auth.unwrap_or(TcpAuth::Cert).method();
            hba.push(format!("hostssl all all 127.0.0.1/32 {method}"));
        } else {
            let auth = options.tcp_auth.unwrap_or(TcpAuth::Trust);
            if auth != TcpAuth::Trust {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{auth:?} authentication needs TLS: set PostgresOptions::tls"),
                ));
            }
            hba.push("host all all 127.0.0.1/32 trust".to_owned());
        }
        conf.extend(options.extra_conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf)?;
        fs::write(data.join("pg_hba.conf"), hba.join("\n") + "\n")?;
        if let Some(owner) = owner {
            chown_tree(&data, owner)?;
        }

        let log = fs::File::create(dir.path().join("postgres.log"))?;
        if let Some(owner) = owner {
            std::os::unix::fs::chown(
                dir.path().join("postgres.log"),
                Some(owner.uid),
                Some(owner.gid),
            )?;
        }
        let child = command_as(user, &bin.join("postgres").to_string_lossy())
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let server = Self {
            dir,
            port,
            bin,
            user,
            child: Some(child),
        };
        let socket = server.dir.path().join(format!(".s.PGSQL.{port}"));
        let ready = wait_until(Duration::from_secs(30), "PostgreSQL", || {
            socket.exists() && port_open(port)
        });
        if let Err(e) = ready {
            let log =
                fs::read_to_string(server.dir.path().join("postgres.log")).unwrap_or_default();
            return Err(io::Error::new(e.kind(), format!("{e}; server log:\n{log}")));
        }
        // The socket appears before the server accepts queries; wait for a real answer.
        wait_until(Duration::from_secs(30), "PostgreSQL queries", || {
            server.psql("postgres", "select 1").is_ok()
        })?;
        Ok(server)
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder holding the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL as the superuser over the Unix socket; returns unaligned, tuples-only
    /// output.
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let program = self.bin.join("psql");
        let psql = if program.exists() {
            Psql::new().program(program)
        } else {
            Psql::new()
        };
        let out = psql
            .host(self.dir.path().display())
            .port(self.port)
            .user("postgres")
            .dbname(database)
            .run(sql);
        succeeded(out, "psql").map(|out| out.trim_end().to_owned())
    }

    /// The server's log so far, for failing tests to print.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server now (a fast shutdown that ends open sessions).
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let mut pg_ctl = command_as(self.user, &self.bin.join("pg_ctl").to_string_lossy());
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "-t", "20", "stop"]);
        let stopped = run(pg_ctl, "pg_ctl stop");
        if stopped.is_err() {
            let _ = child.kill();
        }
        child.wait()?;
        stopped.map(|_| ())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn append(path: &Path, lines: &[String]) -> io::Result<()> {
    let mut text = fs::read_to_string(path)?;
    text.push_str("\n# postern-testkit\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    fs::write(path, text)
}

/// The newest installed PostgreSQL's binaries (`POSTERN_PG_BIN` overrides).
fn postgres_bin() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("POSTERN_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| io::Error::new(e.kind(), format!("no PostgreSQL under /usr/lib/postgresql ({e}); run ./scripts/test to install it")))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no initdb under /usr/lib/postgresql/*/bin; run ./scripts/test to install PostgreSQL",
        )
    })
}
