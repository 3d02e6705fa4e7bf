//! Roles: what databases (by labels), database users and database names a user may
//! reach, and session options. Loaded from TOML files; stored as JSON.
//!
//! ```toml
//! [[role]]
//! name = "dev"
//! options = { max_session_ttl = "8h", client_idle_timeout = "30m" }
//! allow.db_labels = { env = ["dev", "staging"] }
//! allow.db_users = ["{{internal.db_users}}", "readonly"]
//! allow.db_names = ["{{internal.db_names}}", "app_*"]   # refused: `*` only stands alone
//! deny.db_labels = { env = "prod" }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::Error;
use crate::duration::parse_duration;
use crate::user::Traits;

/// Largest role file we read.
pub const ROLE_FILE_SIZE_MAX: usize = 1024 * 1024;
/// Most roles in one file.
pub const ROLES_PER_FILE_MAX: usize = 1000;
/// Most entries in one list (`db_users`, `db_names`, values of one label).
pub const ENTRIES_MAX: usize = 1000;
/// Longest name, label, value or template.
pub const NAME_SIZE_MAX: usize = 256;

/// A validated role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    #[serde(default)]
    pub options: RoleOptions,
    #[serde(default)]
    pub allow: Rules,
    #[serde(default)]
    pub deny: Rules,
}

/// Session options; when a user has several roles, the strictest wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleOptions {
    /// Longest certificate this role allows, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_ttl_secs: Option<u64>,
    /// Idle sessions are closed after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_idle_timeout_secs: Option<u64>,
    /// Close sessions when the certificate they opened with expires. On by default.
    #[serde(default = "default_disconnect_expired_cert")]
    pub disconnect_expired_cert: bool,
}

fn default_disconnect_expired_cert() -> bool {
    true
}

impl Default for RoleOptions {
    fn default() -> Self {
        Self {
            max_session_ttl_secs: None,
            client_idle_timeout_secs: None,
            disconnect_expired_cert: default_disconnect_expired_cert(),
        }
    }
}

/// One side (allow or deny) of a role.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub db_labels: BTreeMap<String, Vec<Pattern>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_names: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_users: Vec<Pattern>,
}

/// One entry of a rule: `*`, a literal, or a template filled from the user's traits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Pattern {
    /// `*`: anything.
    Any,
    /// Exactly this string.
    Literal(String),
    /// `prefix{{source}}suffix`: one exact value per trait value.
    Template {
        prefix: String,
        source: TraitSource,
        suffix: String,
    },
}

/// Where a template takes its values from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraitSource {
    /// `{{internal.db_users}}`
    DbUsers,
    /// `{{internal.db_names}}`
    DbNames,
    /// `{{external.NAME}}`: a free-form trait, for example from an identity provider.
    External(String),
}

/// A pattern after templates are filled in: what a value is compared against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Matcher {
    Any,
    Exact(String),
}

impl Matcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => exact == value,
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(exact) => f.write_str(exact),
        }
    }
}

impl Pattern {
    /// Parses one entry; the error is a sentence for the user.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > NAME_SIZE_MAX {
            return Err(format!("longer than {NAME_SIZE_MAX} bytes"));
        }
        if text.trim().is_empty() {
            return Err("empty; use \"*\" for anything".to_owned());
        }
        if text == "*" {
            return Ok(Self::Any);
        }
        let Some(open) = text.find("{{") else {
            if text.contains("}}") {
                return Err(format!("{text:?} has `}}}}` without `{{{{`"));
            }
            check_literal(text)?;
            return Ok(Self::Literal(text.to_owned()));
        };
        let close = text[open..]
            .find("}}")
            .map(|i| open + i)
            .ok_or_else(|| format!("{text:?} has `{{{{` without `}}}}`"))?;
        let (prefix, inner, suffix) = (&text[..open], &text[open + 2..close], &text[close + 2..]);
        if suffix.contains("{{") || suffix.contains("}}") || prefix.contains("}}") {
            return Err(format!(
                "{text:?}: only one {{{{...}}}} expression is allowed"
            ));
        }
        check_literal(prefix)?;
        check_literal(suffix)?;
        let source = match inner.trim().split_once('.') {
            Some(("internal", "db_users")) => TraitSource::DbUsers,
            Some(("internal", "db_names")) => TraitSource::DbNames,
            Some(("internal", other)) => {
                return Err(format!(
                    "{text:?}: unknown trait internal.{other}; use internal.db_users or internal.db_names"
                ));
            }
            Some(("external", name)) if is_trait_name(name) => {
                TraitSource::External(name.to_owned())
            }
            Some(("external", name)) => {
                return Err(format!(
                    "{text:?}: {name:?} is not a trait name (letters, digits, _ - . :)"
                ));
            }
            _ => {
                return Err(format!(
                    "{text:?}: unknown template; use {{{{internal.db_users}}}}, {{{{internal.db_names}}}} or {{{{external.NAME}}}}"
                ));
            }
        };
        Ok(Self::Template {
            prefix: prefix.to_owned(),
            source,
            suffix: suffix.to_owned(),
        })
    }

    /// What this entry matches for a user with `traits`. A template expands to one
    /// exact value per trait value, so it never matches more than the traits name: a
    /// trait value of `*` is the literal string `*`, not a wildcard.
    pub fn expand(&self, traits: &Traits) -> Vec<Matcher> {
        match self {
            Self::Any => vec![Matcher::Any],
            Self::Literal(literal) => vec![Matcher::Exact(literal.clone())],
            Self::Template {
                prefix,
                source,
                suffix,
            } => {
                let values: &[String] = match source {
                    TraitSource::DbUsers => &traits.db_users,
                    TraitSource::DbNames => &traits.db_names,
                    TraitSource::External(name) => {
                        traits.external.get(name).map_or(&[], Vec::as_slice)
                    }
                };
                values
                    .iter()
                    .filter(|value| !value.is_empty())
                    .map(|value| Matcher::Exact(format!("{prefix}{value}{suffix}")))
                    .collect()
            }
        }
    }
}

fn check_literal(text: &str) -> Result<(), String> {
    if text.contains('*') {
        return Err(format!("{text:?}: `*` only stands alone, as \"*\""));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!("{text:?} holds control character {c:?}"));
    }
    Ok(())
}

fn is_trait_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_SIZE_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'))
}

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<Pattern> for String {
    fn from(pattern: Pattern) -> Self {
        pattern.to_string()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Literal(literal) => f.write_str(literal),
            Self::Template {
                prefix,
                source,
                suffix,
            } => {
                let source = match source {
                    TraitSource::DbUsers => "internal.db_users".to_owned(),
                    TraitSource::DbNames => "internal.db_names".to_owned(),
                    TraitSource::External(name) => format!("external.{name}"),
                };
                write!(f, "{prefix}{{{{{source}}}}}{suffix}")
            }
        }
    }
}

/// Role names: 1 to 64 of `a-z 0-9 _ - .`.
pub fn check_role_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?}: use 1 to 64 of a-z, 0-9, _ - ."))
    }
}

/// Label keys: 1 to 256 of letters, digits and `_ - . / :`, or `*` (any database).
fn check_label_key(key: &str) -> Result<(), String> {
    if key == "*" || is_trait_name(key) {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a label name (letters, digits, _ - . / :) or \"*\""
        ))
    }
}

impl Role {
    /// The maximum session TTL option as a duration.
    pub fn max_session_ttl(&self) -> Option<Duration> {
        self.options.max_session_ttl_secs.map(Duration::from_secs)
    }

    /// The client idle timeout option as a duration.
    pub fn client_idle_timeout(&self) -> Option<Duration> {
        self.options
            .client_idle_timeout_secs
            .map(Duration::from_secs)
    }

    /// Checks what serde cannot: names, label keys, `*` label values and list sizes.
    /// Used for roles read back from storage too.
    pub fn validate(&self) -> Result<(), (String, String)> {
        check_role_name(&self.name).map_err(|reason| ("name".to_owned(), reason))?;
        for (side, rules) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (key, values) in &rules.db_labels {
                let field = format!("{side}.db_labels.{key}");
                check_label_key(key).map_err(|reason| (field.clone(), reason))?;
                if key == "*" && values != &[Pattern::Any] {
                    return Err((
                        field,
                        "the \"*\" label only takes \"*\" (any database)".to_owned(),
                    ));
                }
                if values.is_empty() || values.len() > ENTRIES_MAX {
                    return Err((field, format!("give 1 to {ENTRIES_MAX} values")));
                }
            }
            for (name, list) in [("db_names", &rules.db_names), ("db_users", &rules.db_users)] {
                if list.len() > ENTRIES_MAX {
                    return Err((
                        format!("{side}.{name}"),
                        format!("more than {ENTRIES_MAX} entries"),
                    ));
                }
            }
        }
        Ok(())
    }
}

// --- Role files -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    role: Vec<Spanned<RawRole>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: Spanned<String>,
    #[serde(default)]
    options: RawOptions,
    #[serde(default)]
    allow: RawRules,
    #[serde(default)]
    deny: RawRules,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    max_session_ttl: Option<Spanned<String>>,
    client_idle_timeout: Option<Spanned<String>>,
    disconnect_expired_cert: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    db_labels: BTreeMap<String, Spanned<toml::Value>>,
    db_names: Option<Spanned<Vec<Spanned<String>>>>,
    db_users: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Parses and validates a role file. `file` names it in error messages, which also
/// give the line and the field (`allow.db_users[1]`) of the first problem.
pub fn parse_role_file(file: &str, text: &str) -> Result<Vec<Role>, Error> {
    let at = |span: Option<Range<usize>>, field: Option<String>, message: String| Error::RoleFile {
        file: file.to_owned(),
        line: span.map(|span| line_of(text, span.start)),
        field,
        message,
    };
    if text.len() > ROLE_FILE_SIZE_MAX {
        return Err(at(
            None,
            None,
            format!("larger than {ROLE_FILE_SIZE_MAX} bytes"),
        ));
    }
    let raw: RawFile = toml::from_str(text)
        .map_err(|error| at(error.span(), None, error.message().trim_end().to_owned()))?;
    if raw.role.is_empty() {
        return Err(at(
            None,
            None,
            "no roles; define them as [[role]] tables".to_owned(),
        ));
    }
    if raw.role.len() > ROLES_PER_FILE_MAX {
        return Err(at(
            None,
            None,
            format!("more than {ROLES_PER_FILE_MAX} roles"),
        ));
    }
    let mut names = BTreeSet::new();
    let mut roles = Vec::with_capacity(raw.role.len());
    for raw_role in raw.role {
        let raw_role = raw_role.into_inner();
        let name_span = raw_role.name.span();
        let name = raw_role.name.into_inner();
        let in_role = |field: &str| Some(format!("role {name:?}: {field}"));
        check_role_name(&name)
            .map_err(|reason| at(Some(name_span.clone()), Some("name".to_owned()), reason))?;
        if !names.insert(name.clone()) {
            return Err(at(
                Some(name_span),
                Some("name".to_owned()),
                format!("role {name:?} defined twice"),
            ));
        }
        let duration =
            |value: Option<Spanned<String>>, field: &str| -> Result<Option<u64>, Error> {
                value
                    .map(|value| {
                        let span = value.span();
                        match parse_duration(value.get_ref()) {
                            Ok(duration) if duration.is_zero() => Err(at(
                                Some(span),
                                in_role(field),
                                "must be longer than 0s".to_owned(),
                            )),
                            Ok(duration) => Ok(duration.as_secs()),
                            Err(reason) => Err(at(Some(span), in_role(field), reason)),
                        }
                    })
                    .transpose()
            };
        let options = RoleOptions {
            max_session_ttl_secs: duration(
                raw_role.options.max_session_ttl,
                "options.max_session_ttl",
            )?,
            client_idle_timeout_secs: duration(
                raw_role.options.client_idle_timeout,
                "options.client_idle_timeout",
            )?,
            disconnect_expired_cert: raw_role
                .options
                .disconnect_expired_cert
                .unwrap_or_else(default_disconnect_expired_cert),
        };
        let mut sides = Vec::with_capacity(2);
        for (side, raw_rules) in [("allow", raw_role.allow), ("deny", raw_role.deny)] {
            let mut rules = Rules::default();
            for (key, value) in raw_rules.db_labels {
                let field = format!("{side}.db_labels.{key}");
                let span = value.span();
                check_label_key(&key)
                    .map_err(|reason| at(Some(span.clone()), in_role(&field), reason))?;
                let texts: Vec<String> = match value.into_inner() {
                    toml::Value::String(text) => vec![text],
                    toml::Value::Array(values) => values
                        .into_iter()
                        .map(|value| match value {
                            toml::Value::String(text) => Ok(text),
                            other => Err(at(
                                Some(span.clone()),
                                in_role(&field),
                                format!("expected a string, found {}", other.type_str()),
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                    other => {
                        return Err(at(
                            Some(span),
                            in_role(&field),
                            format!(
                                "expected a string or a list of strings, found {}",
                                other.type_str()
                            ),
                        ));
                    }
                };
                let patterns = texts
                    .iter()
                    .map(|text| {
                        Pattern::parse(text)
                            .map_err(|reason| at(Some(span.clone()), in_role(&field), reason))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if key == "*" && patterns != [Pattern::Any] {
                    let reason = "the \"*\" label only takes \"*\" (any database)".to_owned();
                    return Err(at(Some(span), in_role(&field), reason));
                }
                if patterns.is_empty() || patterns.len() > ENTRIES_MAX {
                    return Err(at(
                        Some(span),
                        in_role(&field),
                        format!("give 1 to {ENTRIES_MAX} values"),
                    ));
                }
                rules.db_labels.insert(key, patterns);
            }
            for (name, list, out) in [
                ("db_names", raw_rules.db_names, &mut rules.db_names),
                ("db_users", raw_rules.db_users, &mut rules.db_users),
            ] {
                let Some(list) = list else { continue };
                let list_span = list.span();
                let list = list.into_inner();
                if list.len() > ENTRIES_MAX {
                    return Err(at(
                        Some(list_span),
                        in_role(&format!("{side}.{name}")),
                        format!("more than {ENTRIES_MAX} entries"),
                    ));
                }
                for (index, entry) in list.into_iter().enumerate() {
                    let span = entry.span();
                    let pattern = Pattern::parse(entry.get_ref()).map_err(|reason| {
                        at(
                            Some(span),
                            in_role(&format!("{side}.{name}[{index}]")),
                            reason,
                        )
                    })?;
                    out.push(pattern);
                }
            }
            sides.push(rules);
        }
        let deny = sides.pop().unwrap_or_default();
        let allow = sides.pop().unwrap_or_default();
        let role = Role {
            name: name.clone(),
            options,
            allow,
            deny,
        };
        role.validate()
            .map_err(|(field, reason)| at(Some(name_span.clone()), in_role(&field), reason))?;
        roles.push(role);
    }
    Ok(roles)
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        match parse_role_file("roles.toml", text) {
            Ok(roles) => panic!("accepted: {roles:?}"),
            Err(error) => error.to_string(),
        }
    }

    // A complete role file parses into the roles it describes, templates included.
    #[test]
    fn parses_a_complete_file() {
        let text = r#"
[[role]]
name = "dev"
options = { max_session_ttl = "8h", client_idle_timeout = "30m", disconnect_expired_cert = true }
allow.db_labels = { env = ["dev", "staging"], team = "db-{{external.team}}" }
allow.db_users = ["{{internal.db_users}}", "readonly"]
allow.db_names = ["{{ internal.db_names }}", "*"]
deny.db_users = ["postgres"]

[[role]]
name = "all"
allow.db_labels = { "*" = "*" }
"#;
        let roles = parse_role_file("roles.toml", text).unwrap();
        assert_eq!(roles.len(), 2);
        let dev = &roles[0];
        assert_eq!(dev.max_session_ttl(), Some(Duration::from_secs(8 * 3600)));
        assert_eq!(dev.client_idle_timeout(), Some(Duration::from_secs(1800)));
        assert!(dev.options.disconnect_expired_cert);
        assert_eq!(
            dev.allow.db_users[0],
            Pattern::Template {
                prefix: String::new(),
                source: TraitSource::DbUsers,
                suffix: String::new()
            }
        );
        assert_eq!(dev.allow.db_names[1], Pattern::Any);
        assert_eq!(
            dev.allow.db_labels["team"][0].to_string(),
            "db-{{external.team}}"
        );
        assert_eq!(dev.deny.db_users, [Pattern::Literal("postgres".into())]);
        assert_eq!(roles[1].allow.db_labels["*"], [Pattern::Any]);
        // Stored form round-trips.
        let json = serde_json::to_string(dev).unwrap();
        assert_eq!(&serde_json::from_str::<Role>(&json).unwrap(), dev);
    }

    // Unknown fields are refused with their line and name.
    #[test]
    fn unknown_fields_name_line_and_field() {
        let message = error_of("[[role]]\nname = \"a\"\nallow.db_userz = [\"x\"]\n");
        assert!(message.starts_with("roles.toml:3"), "{message}");
        assert!(message.contains("db_userz"), "{message}");
        let message = error_of("[[role]]\nname = \"a\"\n\noptions.max_ttl = \"1h\"\n");
        assert!(message.starts_with("roles.toml:4"), "{message}");
        assert!(message.contains("max_ttl"), "{message}");
    }

    // Invalid templates are refused with line, field path and what is allowed.
    #[test]
    fn invalid_templates_name_line_and_field() {
        let cases = [
            (
                "allow.db_users = [\"ok\", \"{{internal.logins}}\"]",
                "allow.db_users[1]",
                "internal.db_users",
            ),
            (
                "allow.db_names = [\"{{external.team\"]",
                "allow.db_names[0]",
                "without",
            ),
            (
                "deny.db_users = [\"{{foo.bar}}\"]",
                "deny.db_users[0]",
                "unknown template",
            ),
            (
                "allow.db_users = [\"{{external.a}}{{external.b}}\"]",
                "allow.db_users[0]",
                "only one",
            ),
            (
                "allow.db_names = [\"app_*\"]",
                "allow.db_names[0]",
                "stands alone",
            ),
            (
                "allow.db_labels = { env = \"{{external.}}\" }",
                "allow.db_labels.env",
                "not a trait name",
            ),
            (
                "allow.db_labels = { \"*\" = \"prod\" }",
                "allow.db_labels.*",
                "only takes",
            ),
        ];
        for (line, field, reason) in cases {
            let message = error_of(&format!("[[role]]\nname = \"r\"\n{line}\n"));
            assert!(message.starts_with("roles.toml:3"), "{line}: {message}");
            assert!(
                message.contains(&format!("role \"r\": {field}")),
                "{line}: {message}"
            );
            assert!(message.contains(reason), "{line}: {message}");
        }
    }

    // Malformed TOML, bad types, bad durations, bad and duplicate names are refused.
    #[test]
    fn malformed_files_are_refused() {
        let cases = [
            ("[[role]\nname = \"a\"", "roles.toml:1"),
            ("[[role]]\nname = 5", "roles.toml:2"),
            (
                "[[role]]\nname = \"a\"\noptions.max_session_ttl = \"12\"",
                "without a unit",
            ),
            (
                "[[role]]\nname = \"a\"\noptions.client_idle_timeout = \"0s\"",
                "longer than 0s",
            ),
            ("[[role]]\nname = \"Bad Name\"", "use 1 to 64"),
            (
                "[[role]]\nname = \"a\"\n[[role]]\nname = \"a\"",
                "roles.toml:4: name: role \"a\" defined twice",
            ),
            (
                "[[role]]\nname = \"a\"\nallow.db_labels = { env = 5 }",
                "expected a string",
            ),
            ("", "no roles"),
            (
                "[[role]]\nname = \"a\"\nallow.db_users = \"x\"",
                "roles.toml:3",
            ),
        ];
        for (text, expected) in cases {
            let message = error_of(text);
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    // Templates expand to exact values only, with prefix and suffix, and to nothing without the trait.
    #[test]
    fn templates_expand_to_exact_trait_values() {
        let traits = Traits {
            db_users: vec!["alice".into(), "*".into()],
            db_names: vec![],
            external: BTreeMap::from([("team".into(), vec!["red".into()])]),
        };
        let users = Pattern::parse("{{internal.db_users}}")
            .unwrap()
            .expand(&traits);
        assert_eq!(
            users,
            [Matcher::Exact("alice".into()), Matcher::Exact("*".into())]
        );
        assert!(
            !users.iter().any(|m| m.matches("bob")),
            "a `*` trait value is no wildcard"
        );
        let team = Pattern::parse("db-{{external.team}}-rw")
            .unwrap()
            .expand(&traits);
        assert_eq!(team, [Matcher::Exact("db-red-rw".into())]);
        assert_eq!(
            Pattern::parse("{{internal.db_names}}")
                .unwrap()
                .expand(&traits),
            []
        );
        assert_eq!(
            Pattern::parse("{{external.missing}}")
                .unwrap()
                .expand(&traits),
            []
        );
    }
}
