//! The real `psql`, as tests run it: one builder for the connection (a libpq conninfo
//! string: host, port, user, database, TLS files, a service entry), the flags every test
//! wants, and a run that cannot hang the test.
//!
//! ```text
//! let out = Psql::new()
//!     .host("localhost").port(port).user("alice").dbname("postgres")
//!     .verify_full(&ca).client_cert(&crt, &key)
//!     .run("select current_user");
//! let (ok, stdout, stderr) = Psql::summary(&out);
//! ```
//!
//! Flags: `-X` (no `~/.psqlrc`), `-w` (never prompt for a password), `-q -t -A` (quiet,
//! tuples only, unaligned), `-v ON_ERROR_STOP=1` (a failing statement fails the run).

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::Duration;

use crate::process::wait_until;

/// How long a run may take before psql is killed, unless [`Psql::timeout`] says.
pub const PSQL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// A psql invocation; see the module's comment.
#[derive(Clone, Debug)]
pub struct Psql {
    program: PathBuf,
    /// Conninfo keywords and values, in order.
    params: Vec<(String, String)>,
    /// `-v NAME=VALUE`, after the default `ON_ERROR_STOP=1`.
    vars: Vec<(String, String)>,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
}

impl Default for Psql {
    fn default() -> Self {
        Self::new()
    }
}

impl Psql {
    /// `psql` from `PATH`, no connection parameters (libpq's defaults and environment).
    pub fn new() -> Self {
        Self {
            program: PathBuf::from("psql"),
            params: Vec::new(),
            vars: Vec::new(),
            env: Vec::new(),
            timeout: PSQL_TIMEOUT_DEFAULT,
        }
    }

    /// Runs this psql binary instead.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Any conninfo keyword (`connect_timeout`, `application_name`, ...).
    pub fn param(mut self, keyword: &str, value: impl ToString) -> Self {
        self.params.push((keyword.to_owned(), value.to_string()));
        self
    }

    /// A host name, an address, or the folder of a Unix socket.
    pub fn host(self, host: impl ToString) -> Self {
        self.param("host", host)
    }

    pub fn port(self, port: u16) -> Self {
        self.param("port", port)
    }

    pub fn user(self, user: &str) -> Self {
        self.param("user", user)
    }

    pub fn dbname(self, dbname: &str) -> Self {
        self.param("dbname", dbname)
    }

    /// `sslmode` (`disable`, `prefer`, `require`, `verify-full`, ...).
    pub fn sslmode(self, mode: &str) -> Self {
        self.param("sslmode", mode)
    }

    /// `sslmode=verify-full`, trusting the CA(s) in `root_cert`.
    pub fn verify_full(self, root_cert: &Path) -> Self {
        self.sslmode("verify-full")
            .param("sslrootcert", root_cert.display())
    }

    /// The client certificate and its key.
    pub fn client_cert(self, cert: &Path, key: &Path) -> Self {
        self.param("sslcert", cert.display())
            .param("sslkey", key.display())
    }

    /// The entry `name` of the service file `file` (`PGSERVICEFILE`).
    pub fn service(self, name: &str, file: &Path) -> Self {
        self.param("service", name).env("PGSERVICEFILE", file)
    }

    /// Every `keyword=value` of a conninfo string such as `service=orders` or
    /// `host=127.0.0.1 port=5432` (values without spaces or quotes).
    pub fn conninfo_text(mut self, conninfo: &str) -> Self {
        for pair in conninfo.split_whitespace() {
            let (keyword, value) = pair.split_once('=').unwrap_or((pair, ""));
            self = self.param(keyword, value);
        }
        self
    }

    /// A psql variable (`-v NAME=VALUE`), e.g. `VERBOSITY=verbose`.
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// An environment variable for psql (`HOME`, `PGCONNECT_TIMEOUT`, ...).
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Kill psql after `timeout` (default [`PSQL_TIMEOUT_DEFAULT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The connection parameters as one libpq conninfo string, values quoted as needed.
    pub fn conninfo(&self) -> String {
        let quote = |value: &str| {
            let plain = !value.is_empty()
                && !value
                    .chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
            if plain {
                value.to_owned()
            } else {
                format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        };
        self.params
            .iter()
            .map(|(keyword, value)| format!("{keyword}={}", quote(value)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// psql running `sql` (`-c`), not started: for tests that signal it or read it as it
    /// runs. Its stdin is empty, its stdout and stderr are piped.
    pub fn command(&self, sql: &str) -> Command {
        let mut command = Command::new(&self.program);
        self.add_to(&mut command, &["-c", sql]);
        command
    }

    /// Runs `sql` (`-c`): what psql printed and its exit status. A psql still running
    /// after the timeout is killed, and its stderr says so.
    pub fn run(&self, sql: &str) -> Output {
        self.run_in(Command::new(&self.program), sql)
    }

    /// [`Psql::run`] on `command` (the caller's psql, with the caller's environment).
    pub fn run_in(&self, mut command: Command, sql: &str) -> Output {
        self.add_to(&mut command, &["-c", sql]);
        self.finish(command, None)
    }

    /// Runs `script` as psql's input (`-f -`), so meta-commands such as `\copy` work.
    pub fn run_script(&self, script: &str) -> Output {
        let mut command = Command::new(&self.program);
        self.add_to(&mut command, &["-f", "-"]);
        command.stdin(Stdio::piped());
        self.finish(command, Some(script.as_bytes().to_vec()))
    }

    /// (success, stdout trimmed, stderr) of a run, as tests assert on them.
    pub fn summary(output: &Output) -> (bool, String, String) {
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn add_to(&self, command: &mut Command, rest: &[&str]) {
        command.args(["-X", "-w", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"]);
        for (name, value) in &self.vars {
            command.arg("-v").arg(format!("{name}={value}"));
        }
        let conninfo = self.conninfo();
        if !conninfo.is_empty() {
            command.arg(conninfo);
        }
        command.args(rest);
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }

    /// Starts `command`, feeds it `input`, and collects its output; kills it at the
    /// timeout. A psql that cannot start is reported as a failed run.
    fn finish(&self, mut command: Command, input: Option<Vec<u8>>) -> Output {
        match command.spawn() {
            Ok(child) => collect(child, input, self.timeout),
            Err(error) => Output {
                status: failed_status(),
                stdout: Vec::new(),
                stderr: format!("cannot run {}: {error}", self.program.display()).into_bytes(),
            },
        }
    }
}

fn collect(mut child: Child, input: Option<Vec<u8>>, timeout: Duration) -> Output {
    let writer = child.stdin.take().map(|mut stdin| {
        thread::spawn(move || {
            // psql may exit before reading it all (a failed connection): not an error.
            let _ = stdin.write_all(&input.unwrap_or_default());
        })
    });
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let mut exited = None;
    // Polls until psql exits (or cannot be waited for) or the timeout passes.
    let _ = wait_until(timeout, "psql", || match child.try_wait() {
        Ok(None) => false,
        Ok(Some(status)) => {
            exited = Some(status);
            true
        }
        Err(_) => true,
    });
    let (status, timed_out) = match exited {
        Some(status) => (status, false),
        None => {
            let _ = child.kill();
            (child.wait().unwrap_or_else(|_| failed_status()), true)
        }
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = stderr.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\npsql killed after {timeout:?}\n").as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// An exit status that is not success (for a psql that could not run at all).
fn failed_status() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw(1 << 8)
}

#[cfg(test)]
mod tests {
    use super::Psql;

    // Values with spaces or quotes are quoted as libpq reads them; plain ones are not.
    #[test]
    fn conninfo_quotes_what_needs_it() {
        let psql = Psql::new()
            .host("/tmp/a dir")
            .port(5432)
            .param("application_name", "it's");
        assert_eq!(
            psql.conninfo(),
            r"host='/tmp/a dir' port=5432 application_name='it\'s'"
        );
        assert_eq!(
            Psql::new().conninfo_text("service=orders").conninfo(),
            "service=orders"
        );
    }
}
