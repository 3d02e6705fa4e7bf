//! The access decision: may this user, with these roles and traits, reach this
//! database as this database user, on this database name?
//!
//! A pure function of its arguments, so the proxy, the agent and the simulator all get
//! the same answer, and every refusal can say exactly which part failed:
//!
//! 1. A deny rule is greedy: a role denies if its `deny.db_labels` match the database,
//!    OR its `deny.db_users` match the db user, OR its `deny.db_names` match the name.
//! 2. Otherwise one role must allow all three at once: labels AND db user AND name.
//! 3. PostgreSQL: an empty db user is refused, an empty database name defaults to the
//!    db user. MySQL: the "database" is only a default schema, checked when given.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::database::{Database, Protocol};
use crate::role::{Matcher, Pattern, Role, Rules};
use crate::user::Traits;

/// What a user asks for.
#[derive(Clone, Copy, Debug)]
pub struct AccessRequest<'a> {
    pub database: &'a Database,
    pub db_user: &'a str,
    /// Empty when the client did not name one.
    pub db_name: &'a str,
}

/// An allowed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The database name to use: the one asked for, or the Postgres default.
    pub db_name: String,
    /// The first role (in the order given) that allowed it.
    pub allowed_by: String,
}

/// A refusal, with the facts a user needs to act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub database: String,
    pub db_user: String,
    pub db_name: String,
    /// The database name was not given and defaulted to the db user (PostgreSQL).
    pub db_name_defaulted: bool,
    pub reason: DenialReason,
}

/// Which part of the request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenialReason {
    /// No database user was given (required for both protocols).
    EmptyDbUser,
    /// A deny rule of `role` matched the `part`.
    DeniedByRole { role: String, part: Part },
    /// No role allows this database's labels.
    LabelsNotAllowed,
    /// Roles allow the database, but not this db user. `allowed` lists the db users
    /// those roles allow (`*` means any).
    DbUserNotAllowed { allowed: Vec<String> },
    /// Roles allow the database and db user, but not this database name; `allowed`
    /// lists the names allowed together with this db user.
    DbNameNotAllowed { allowed: Vec<String> },
}

/// One of the three things a rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Labels,
    DbUser,
    DbName,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Labels => "database labels",
            Self::DbUser => "db user",
            Self::DbName => "database name",
        })
    }
}

fn list(values: &[String]) -> String {
    if values.is_empty() {
        return "none".to_owned();
    }
    values
        .iter()
        .map(|value| {
            if value == "*" {
                "any (*)".to_owned()
            } else {
                format!("{value:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let database = &self.database;
        write!(f, "access to database {database:?} denied: ")?;
        match &self.reason {
            DenialReason::EmptyDbUser => write!(
                f,
                "no db user given; pass one with `postern db login {database} --db-user NAME`"
            ),
            DenialReason::DeniedByRole { role, part } => {
                let value = match part {
                    Part::Labels => String::new(),
                    Part::DbUser => format!(" {:?}", self.db_user),
                    Part::DbName => format!(" {:?}", self.db_name),
                };
                write!(
                    f,
                    "role {role:?} denies the {part}{value}; ask an administrator to change role {role:?}"
                )
            }
            DenialReason::LabelsNotAllowed => write!(
                f,
                "none of your roles allow this database's labels; `postern db ls` lists the databases you may use"
            ),
            DenialReason::DbUserNotAllowed { allowed } => write!(
                f,
                "your roles do not allow db user {:?} here; allowed db users: {}",
                self.db_user,
                list(allowed)
            ),
            DenialReason::DbNameNotAllowed { allowed } => {
                write!(
                    f,
                    "your roles do not allow database name {:?} as db user {:?}; allowed names: {}",
                    self.db_name,
                    self.db_user,
                    list(allowed)
                )?;
                if self.db_name_defaulted {
                    write!(
                        f,
                        " (no database name was given, so PostgreSQL's default, the db user's name, was used; pass --db-name)"
                    )?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Denial {}

/// A role's rules with templates filled in from the user's traits.
struct Expanded {
    labels: BTreeMap<String, Vec<Matcher>>,
    db_users: Vec<Matcher>,
    db_names: Vec<Matcher>,
}

fn expand_all(patterns: &[Pattern], traits: &Traits) -> Vec<Matcher> {
    patterns
        .iter()
        .flat_map(|pattern| pattern.expand(traits))
        .collect()
}

impl Expanded {
    fn new(rules: &Rules, traits: &Traits) -> Self {
        Self {
            labels: rules
                .db_labels
                .iter()
                .map(|(key, patterns)| (key.clone(), expand_all(patterns, traits)))
                .collect(),
            db_users: expand_all(&rules.db_users, traits),
            db_names: expand_all(&rules.db_names, traits),
        }
    }

    /// Every key of the selector must match; `"*": "*"` matches any database. An
    /// empty selector matches nothing.
    fn labels_match(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.labels.is_empty()
            && self.labels.iter().all(|(key, matchers)| {
                if key == "*" {
                    matchers.contains(&Matcher::Any)
                } else {
                    labels
                        .get(key)
                        .is_some_and(|value| matchers.iter().any(|m| m.matches(value)))
                }
            })
    }
}

fn any_matches(matchers: &[Matcher], value: &str) -> bool {
    matchers.iter().any(|m| m.matches(value))
}

fn names(matchers: &[Matcher]) -> BTreeSet<String> {
    matchers.iter().map(Matcher::to_string).collect()
}

/// The access decision. See the module documentation for the rules.
pub fn check_access(
    roles: &[Role],
    traits: &Traits,
    request: AccessRequest<'_>,
) -> Result<Access, Denial> {
    let database = request.database;
    let db_user = request.db_user;
    // Postgres connects to the database named like the user when none is given.
    let db_name = match (database.protocol, request.db_name) {
        (Protocol::Postgres, "") => db_user,
        (_, name) => name,
    };
    // MySQL without a schema: there is nothing to check the name against.
    let check_name = !db_name.is_empty();
    let deny = |reason| Denial {
        database: database.name.clone(),
        db_user: db_user.to_owned(),
        db_name: db_name.to_owned(),
        db_name_defaulted: request.db_name.is_empty() && !db_name.is_empty(),
        reason,
    };
    if db_user.is_empty() {
        return Err(deny(DenialReason::EmptyDbUser));
    }

    for role in roles {
        let rules = Expanded::new(&role.deny, traits);
        let part = if rules.labels_match(&database.labels) {
            Some(Part::Labels)
        } else if any_matches(&rules.db_users, db_user) {
            Some(Part::DbUser)
        } else if check_name && any_matches(&rules.db_names, db_name) {
            Some(Part::DbName)
        } else {
            None
        };
        if let Some(part) = part {
            return Err(deny(DenialReason::DeniedByRole {
                role: role.name.clone(),
                part,
            }));
        }
    }

    let mut labels_matched = false;
    let mut user_matched = false;
    let mut allowed_users = BTreeSet::new();
    let mut allowed_names = BTreeSet::new();
    for role in roles {
        let rules = Expanded::new(&role.allow, traits);
        if !rules.labels_match(&database.labels) {
            continue;
        }
        labels_matched = true;
        allowed_users.extend(names(&rules.db_users));
        if !any_matches(&rules.db_users, db_user) {
            continue;
        }
        user_matched = true;
        allowed_names.extend(names(&rules.db_names));
        if !check_name || any_matches(&rules.db_names, db_name) {
            return Ok(Access {
                db_name: db_name.to_owned(),
                allowed_by: role.name.clone(),
            });
        }
    }
    let reason = if !labels_matched {
        DenialReason::LabelsNotAllowed
    } else if !user_matched {
        DenialReason::DbUserNotAllowed {
            allowed: allowed_users.into_iter().collect(),
        }
    } else {
        DenialReason::DbNameNotAllowed {
            allowed: allowed_names.into_iter().collect(),
        }
    };
    Err(deny(reason))
}

/// Whether a user may see `database` in listings: some role allows its labels and no
/// role denies them. (Which db users and names work is decided at login.)
pub fn may_list(roles: &[Role], traits: &Traits, database: &Database) -> bool {
    let denied = roles
        .iter()
        .any(|role| Expanded::new(&role.deny, traits).labels_match(&database.labels));
    !denied
        && roles
            .iter()
            .any(|role| Expanded::new(&role.allow, traits).labels_match(&database.labels))
}

/// Session options for a set of roles: the strictest of each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionOptions {
    pub max_session_ttl: Option<Duration>,
    pub client_idle_timeout: Option<Duration>,
    pub disconnect_expired_cert: bool,
}

impl SessionOptions {
    pub fn of(roles: &[Role]) -> Self {
        let min = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        roles.iter().fold(Self::default(), |options, role| Self {
            max_session_ttl: min(options.max_session_ttl, role.max_session_ttl()),
            client_idle_timeout: min(options.client_idle_timeout, role.client_idle_timeout()),
            disconnect_expired_cert: options.disconnect_expired_cert
                || role.options.disconnect_expired_cert,
        })
    }
}
