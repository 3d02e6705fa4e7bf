//! Running server programs as their system user, and waiting for them.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A system account's numeric ids, from /etc/passwd.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Account {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Whether this process runs as root (the servers then run as their own accounts).
pub(crate) fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

pub(crate) fn account(name: &str) -> io::Result<Account> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            let parse = |s: &str| {
                s.parse::<u32>()
                    .map_err(|e| io::Error::other(format!("bad /etc/passwd entry for {name}: {e}")))
            };
            return Ok(Account {
                uid: parse(fields[2])?,
                gid: parse(fields[3])?,
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no system user {name:?}: install the database server package"),
    ))
}

/// A command that runs `program` as `user` when we are root, else as ourselves.
pub(crate) fn command_as(user: Option<&str>, program: &str) -> Command {
    match user {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", user, "--", program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// Runs a command to completion; its output becomes the error if it fails.
pub(crate) fn run(mut cmd: Command, what: &str) -> io::Result<String> {
    succeeded(cmd.stdin(Stdio::null()).output()?, what)
}

/// The stdout of a command that succeeded; its output becomes the error if it failed.
pub(crate) fn succeeded(out: Output, what: &str) -> io::Result<String> {
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `path` (recursively) belong to `account`.
pub(crate) fn chown_tree(path: &Path, account: Account) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), account)?;
        }
    }
    Ok(())
}

/// Writes a file readable only by its owner (servers refuse world-readable keys).
pub(crate) fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

/// Polls `ready` until it is true or `limit` passes.
pub(crate) fn wait_until(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> io::Result<()> {
    // Test support measures real time on purpose: it waits for a real server process.
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        sleep(Duration::from_millis(10));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} was not ready within {limit:?}"),
    ))
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}
