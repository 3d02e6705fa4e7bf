//! A throwaway MariaDB server.

use std::fs;
use std::io;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::ServerTls;
use crate::process::{
    account, chown_tree, command_as, port_open, run, running_as_root, wait_until, write_private,
};

/// How to start a [`MariaDbServer`].
#[derive(Clone, Debug, Default)]
pub struct MariaDbOptions {
    /// Serve TLS with this material (`ssl-ca`, `ssl-cert`, `ssl-key`). Users that must
    /// present a client certificate are created with `REQUIRE SUBJECT '/CN=NAME'`.
    pub tls: Option<ServerTls>,
}

/// A MariaDB server on 127.0.0.1 and a Unix socket in its own folder; stopped and deleted
/// on drop. `root` reaches it over the socket without a password (for test set-up).
#[derive(Debug)]
pub struct MariaDbServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl MariaDbServer {
    pub fn start(options: MariaDbOptions) -> io::Result<Self> {
        let user = running_as_root().then_some("mysql");
        let dir = tempfile::Builder::new()
            .prefix("postern-mariadb-")
            .tempdir()?;
        let data = dir.path().join("data");
        fs::create_dir(&data)?;
        let mut tls_args = Vec::new();
        if let Some(tls) = &options.tls {
            write_private(&dir.path().join("server.crt"), &tls.cert_pem)?;
            write_private(&dir.path().join("server.key"), &tls.key_pem)?;
            write_private(&dir.path().join("client_ca.crt"), &tls.client_ca_pem)?;
            for (flag, file) in [
                ("--ssl-cert", "server.crt"),
                ("--ssl-key", "server.key"),
                ("--ssl-ca", "client_ca.crt"),
            ] {
                tls_args.push(format!("{flag}={}", dir.path().join(file).display()));
            }
        }
        if let Some(user) = user {
            chown_tree(dir.path(), account(user)?)?;
        }

        let mut install = command_as(user, "mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if let Some(user) = user {
            install.arg(format!("--user={user}"));
        }
        run(install, "mariadb-install-db")?;

        let port = crate::free_port()?;
        let socket = dir.path().join("mysqld.sock");
        let log = fs::File::create(dir.path().join("mariadb.log"))?;
        let mut server = command_as(user, "mariadbd");
        server
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(user) = user {
            server.arg(format!("--user={user}"));
        }
        let child = server.spawn()?;
        let server = Self {
            dir,
            port,
            child: Some(child),
        };
        let ready = wait_until(Duration::from_secs(30), "MariaDB", || {
            port_open(port) && server.sql("select 1").is_ok()
        });
        if let Err(e) = ready {
            return Err(io::Error::new(
                e.kind(),
                format!("{e}; server log:\n{}", server.log()),
            ));
        }
        Ok(server)
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// Runs SQL as root over the Unix socket; returns tab-separated output without
    /// column names.
    pub fn sql(&self, sql: &str) -> io::Result<String> {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "-N", "-B", "-e", sql]);
        run(cmd, "mariadb").map(|out| out.trim_end().to_owned())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mariadb.log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server now.
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let shutdown = self.sql("shutdown");
        let exited = wait_until(Duration::from_secs(20), "MariaDB shutdown", || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if shutdown.is_err() || exited.is_err() {
            let _ = child.kill();
        }
        child.wait()?;
        Ok(())
    }
}

impl Drop for MariaDbServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
