//! What the auth service knows about a database: its name, protocol and labels.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The wire protocol a database speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
    Mysql,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        })
    }
}

/// A database as agents announce it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}
