//! Profiles, one per proxy, under `~/.postern/`:
//!
//! ```text
//! ~/.postern/current                     the proxy of the active profile
//! ~/.postern/profiles/HOST_PORT.json     user, proxy and PostgreSQL addresses, databases
//! ~/.postern/keys/HOST_PORT/user.key     private key (0600), shared by all certificates
//! ~/.postern/keys/HOST_PORT/user.crt     login certificate
//! ~/.postern/keys/HOST_PORT/cas.pem      cluster host CA(s): verify the proxy
//! ~/.postern/keys/HOST_PORT/db/NAME.crt  certificate routed to database NAME
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::dbfiles::Protocol;
use crate::files::{
    KEY_FILE_MODE, PUBLIC_FILE_MODE, create_private_dir, read_or_empty, remove_if_exists,
    write_atomic,
};

/// The user's home, from `$HOME` (tests point it at a temporary folder).
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => Ok(Self::new(PathBuf::from(home))),
            _ => Err(Error::NoHome),
        }
    }

    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn postern(&self) -> PathBuf {
        self.root.join(".postern")
    }

    fn current_file(&self) -> PathBuf {
        self.postern().join("current")
    }

    fn profile_file(&self, proxy: &str) -> PathBuf {
        self.postern()
            .join("profiles")
            .join(format!("{}.json", folder_name(proxy)))
    }

    /// The key folder of the profile for `proxy`.
    pub fn keys(&self, proxy: &str) -> KeyFiles {
        KeyFiles {
            dir: self.postern().join("keys").join(folder_name(proxy)),
        }
    }

    /// The active profile, if any.
    pub fn current(&self) -> Result<Option<Profile>, Error> {
        let proxy = read_or_empty(&self.current_file())?;
        let proxy = proxy.trim();
        if proxy.is_empty() {
            return Ok(None);
        }
        self.load(proxy)
    }

    /// The profile for `proxy`, if there is one.
    pub fn load(&self, proxy: &str) -> Result<Option<Profile>, Error> {
        let path = self.profile_file(proxy);
        let text = read_or_empty(&path)?;
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| Error::Corrupt {
                path,
                reason: error.to_string(),
            })
    }

    /// Saves `profile` and makes it the active one.
    pub fn save(&self, profile: &Profile) -> Result<(), Error> {
        let path = self.profile_file(&profile.proxy);
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        let json = serde_json::to_vec_pretty(profile).map_err(|error| Error::Corrupt {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        write_atomic(&path, &json, PUBLIC_FILE_MODE)?;
        write_atomic(
            &self.current_file(),
            format!("{}\n", profile.proxy).as_bytes(),
            PUBLIC_FILE_MODE,
        )
    }

    /// Removes the profile for `proxy`, its keys and certificates.
    pub fn remove(&self, proxy: &str) -> Result<(), Error> {
        remove_if_exists(&self.profile_file(proxy))?;
        let keys = self.keys(proxy);
        match std::fs::remove_dir_all(&keys.dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::File {
                    path: keys.dir,
                    source,
                });
            }
        }
        let current = read_or_empty(&self.current_file())?;
        if current.trim() == proxy {
            remove_if_exists(&self.current_file())?;
        }
        Ok(())
    }
}

/// `host:port` as a file name: `host_port`, anything unusual replaced by `_`.
pub fn folder_name(proxy: &str) -> String {
    proxy
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The files of one profile's keys and certificates.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    dir: PathBuf,
}

impl KeyFiles {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("user.key")
    }
    pub fn user_cert(&self) -> PathBuf {
        self.dir.join("user.crt")
    }
    pub fn cas(&self) -> PathBuf {
        self.dir.join("cas.pem")
    }
    pub fn db_cert(&self, name: &str) -> PathBuf {
        self.dir
            .join("db")
            .join(format!("{}.crt", folder_name(name)))
    }

    /// Writes the login's key (0600), certificate and CAs; drops old database certs.
    pub fn write_login(&self, key_pem: &str, cert_pem: &str, cas_pem: &str) -> Result<(), Error> {
        create_private_dir(&self.dir)?;
        let _ = std::fs::remove_dir_all(self.dir.join("db"));
        write_atomic(&self.key(), key_pem.as_bytes(), KEY_FILE_MODE)?;
        write_atomic(&self.user_cert(), cert_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        write_atomic(&self.cas(), cas_pem.as_bytes(), PUBLIC_FILE_MODE)
    }

    pub fn write_db_cert(&self, name: &str, cert_pem: &str) -> Result<(), Error> {
        create_private_dir(&self.dir.join("db"))?;
        write_atomic(&self.db_cert(name), cert_pem.as_bytes(), PUBLIC_FILE_MODE)
    }
}

/// One proxy's profile: who is logged in, where, and to which databases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The proxy's web address (`HOST:PORT`): its API and TLS-routing port.
    pub proxy: String,
    /// Where PostgreSQL clients connect (the proxy's PostgreSQL port, or `proxy`).
    pub postgres_addr: String,
    /// Where MySQL clients connect.
    #[serde(default)]
    pub mysql_addr: Option<String>,
    pub user: String,
    /// Databases logged in to, by name.
    #[serde(default)]
    pub databases: BTreeMap<String, DbLogin>,
}

/// A database the user ran `postern db login` for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbLogin {
    pub protocol: Protocol,
    pub db_user: String,
    #[serde(default)]
    pub db_name: String,
}

/// Splits `HOST:PORT` (IPv6 in brackets) into host and port.
pub fn split_addr(addr: &str) -> Result<(String, u16), Error> {
    let bad = || {
        Error::Usage(format!(
            "{addr:?} is not HOST:PORT (e.g. proxy.example.com:3080)"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Addresses split into host and port; malformed ones are refused with an example.
    #[test]
    fn splits_addresses() {
        assert_eq!(split_addr("a.b:3080").unwrap(), ("a.b".to_owned(), 3080));
        assert_eq!(split_addr("[::1]:5432").unwrap(), ("::1".to_owned(), 5432));
        let error = split_addr("nohost").unwrap_err().to_string();
        assert!(error.contains("HOST:PORT"), "{error}");
        assert!(split_addr(":80").is_err());
        assert!(split_addr("h:0").is_err());
    }

    // A saved profile loads back, becomes current, and logout removes it with its keys.
    #[test]
    fn profiles_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().to_owned());
        assert!(home.current().unwrap().is_none());
        let profile = Profile {
            proxy: "proxy.example:3080".to_owned(),
            postgres_addr: "proxy.example:5433".to_owned(),
            mysql_addr: None,
            user: "alice".to_owned(),
            databases: BTreeMap::from([(
                "orders".to_owned(),
                DbLogin {
                    protocol: Protocol::Postgres,
                    db_user: "alice".to_owned(),
                    db_name: "postgres".to_owned(),
                },
            )]),
        };
        home.save(&profile).unwrap();
        let keys = home.keys(&profile.proxy);
        keys.write_login("KEY", "CERT", "CAS").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.key()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(home.current().unwrap(), Some(profile.clone()));
        home.remove(&profile.proxy).unwrap();
        assert!(home.current().unwrap().is_none());
        assert!(!keys.dir().exists());
    }
}
