//! The access decision, table-driven, plus properties checked with proptest.

use std::collections::BTreeMap;

use postern_auth::access::{
    AccessRequest, DenialReason, Part, SessionOptions, check_access, may_list,
};
use postern_auth::database::{Database, Protocol};
use postern_auth::role::{Pattern, Role, Rules, parse_role_file};
use postern_auth::user::Traits;
use proptest::prelude::*;

const ROLES: &str = r#"
[[role]]
name = "dev"
options = { max_session_ttl = "8h" }
allow.db_labels = { env = ["dev", "staging"] }
allow.db_users = ["{{internal.db_users}}", "readonly"]
allow.db_names = ["{{internal.db_names}}", "app"]

[[role]]
name = "prod-ro"
options = { max_session_ttl = "1h", disconnect_expired_cert = true }
allow.db_labels = { env = "prod" }
allow.db_users = ["readonly"]
allow.db_names = ["*"]

[[role]]
name = "admin"
allow.db_labels = { "*" = "*" }
allow.db_users = ["*"]
allow.db_names = ["*"]

[[role]]
name = "no-superuser"
deny.db_users = ["postgres", "root"]

[[role]]
name = "no-prod"
deny.db_labels = { env = "prod" }

[[role]]
name = "no-secrets"
deny.db_names = ["secrets"]

[[role]]
name = "team"
allow.db_labels = { team = "{{external.team}}" }
allow.db_users = ["{{external.team}}-rw"]
allow.db_names = ["{{external.team}}"]

[[role]]
name = "multi"
allow.db_labels = { env = "dev", region = ["eu", "us"] }
allow.db_users = ["multi"]
allow.db_names = ["*"]

[[role]]
name = "users-only"
allow.db_labels = { env = "dev" }
allow.db_users = ["alice"]
"#;

fn roles(names: &str) -> Vec<Role> {
    let all = parse_role_file("table.toml", ROLES).unwrap();
    names
        .split(',')
        .filter(|name| !name.is_empty())
        .map(|name| {
            all.iter()
                .find(|role| role.name == name)
                .unwrap_or_else(|| panic!("no role {name}"))
                .clone()
        })
        .collect()
}

fn traits() -> Traits {
    Traits {
        db_users: vec!["alice".into()],
        db_names: vec!["alice_db".into()],
        external: BTreeMap::from([("team".into(), vec!["red".into()])]),
    }
}

fn database(name: &str) -> Database {
    let (protocol, labels): (Protocol, &[(&str, &str)]) = match name {
        "dev-pg" => (
            Protocol::Postgres,
            &[("env", "dev"), ("team", "red"), ("region", "eu")],
        ),
        "staging-my" => (Protocol::Mysql, &[("env", "staging")]),
        "prod-pg" => (Protocol::Postgres, &[("env", "prod")]),
        "prod-my" => (Protocol::Mysql, &[("env", "prod")]),
        "blue-pg" => (Protocol::Postgres, &[("env", "qa"), ("team", "blue")]),
        "bare-pg" => (Protocol::Postgres, &[]),
        "dev-us" => (Protocol::Postgres, &[("env", "dev"), ("region", "us")]),
        "dev-asia" => (Protocol::Postgres, &[("env", "dev"), ("region", "asia")]),
        other => panic!("no database {other}"),
    };
    Database {
        name: name.into(),
        description: String::new(),
        protocol,
        uri: String::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[derive(Debug, PartialEq)]
enum Expected {
    /// Allowed, connecting to this database name, by this role.
    Allow(&'static str, &'static str),
    EmptyUser,
    DeniedBy(&'static str, Part),
    Labels,
    User,
    Name,
}
use Expected::*;

// Every row: roles held, database, db user, db name asked for, and the decision.
#[test]
fn access_table() {
    let table: &[(&str, &str, &str, &str, Expected)] = &[
        // Templates from internal traits.
        (
            "dev",
            "dev-pg",
            "alice",
            "alice_db",
            Allow("alice_db", "dev"),
        ),
        ("dev", "dev-pg", "readonly", "app", Allow("app", "dev")),
        ("dev", "dev-pg", "bob", "app", User),
        ("dev", "dev-pg", "alice", "other", Name),
        ("dev", "staging-my", "alice", "app", Allow("app", "dev")),
        ("dev", "prod-pg", "alice", "app", Labels),
        ("dev", "bare-pg", "alice", "app", Labels),
        // Postgres: empty database name defaults to the db user.
        ("dev", "dev-pg", "alice", "", Name),
        (
            "prod-ro",
            "prod-pg",
            "readonly",
            "",
            Allow("readonly", "prod-ro"),
        ),
        ("users-only", "dev-pg", "alice", "", Name),
        // MySQL: the database is checked only when given.
        ("dev", "staging-my", "alice", "", Allow("", "dev")),
        ("dev", "staging-my", "alice", "nope", Name),
        ("users-only", "dev-pg", "alice", "x", Name),
        // Empty db user is refused everywhere.
        ("admin", "dev-pg", "", "app", EmptyUser),
        ("admin", "staging-my", "", "", EmptyUser),
        // Wildcards.
        (
            "admin",
            "bare-pg",
            "anyone",
            "anything",
            Allow("anything", "admin"),
        ),
        (
            "prod-ro",
            "prod-pg",
            "readonly",
            "whatever",
            Allow("whatever", "prod-ro"),
        ),
        ("prod-ro", "prod-pg", "writer", "whatever", User),
        // Deny is greedy: labels OR user OR name.
        (
            "admin,no-superuser",
            "dev-pg",
            "postgres",
            "app",
            DeniedBy("no-superuser", Part::DbUser),
        ),
        (
            "admin,no-superuser",
            "dev-pg",
            "app_user",
            "app",
            Allow("app", "admin"),
        ),
        (
            "admin,no-prod",
            "prod-pg",
            "readonly",
            "app",
            DeniedBy("no-prod", Part::Labels),
        ),
        (
            "admin,no-prod",
            "prod-my",
            "readonly",
            "",
            DeniedBy("no-prod", Part::Labels),
        ),
        (
            "admin,no-prod",
            "dev-pg",
            "readonly",
            "app",
            Allow("app", "admin"),
        ),
        (
            "admin,no-secrets",
            "dev-pg",
            "alice",
            "secrets",
            DeniedBy("no-secrets", Part::DbName),
        ),
        (
            "no-secrets,admin",
            "dev-pg",
            "secrets",
            "",
            DeniedBy("no-secrets", Part::DbName),
        ),
        (
            "admin,no-secrets",
            "staging-my",
            "alice",
            "",
            Allow("", "admin"),
        ),
        ("no-superuser", "dev-pg", "alice", "app", Labels),
        // External traits in labels, users and names.
        ("team", "dev-pg", "red-rw", "red", Allow("red", "team")),
        ("team", "dev-pg", "red-rw", "", Name),
        ("team", "blue-pg", "blue-rw", "blue", Labels),
        ("team", "dev-pg", "blue-rw", "red", User),
        // Several label keys must all match; several values are alternatives.
        ("multi", "dev-pg", "multi", "x", Allow("x", "multi")),
        ("multi", "dev-us", "multi", "x", Allow("x", "multi")),
        ("multi", "dev-asia", "multi", "x", Labels),
        ("multi", "staging-my", "multi", "x", Labels),
        // One role must allow all three at once; two half-matching roles do not add up.
        ("prod-ro,dev", "prod-pg", "alice", "app", User),
        (
            "dev,multi",
            "dev-pg",
            "multi",
            "alice_db",
            Allow("alice_db", "multi"),
        ),
        ("dev,team", "dev-pg", "red-rw", "app", Name),
        // No roles, no access.
        ("", "dev-pg", "alice", "app", Labels),
    ];
    assert!(table.len() >= 30);
    for (held, db, db_user, db_name, expected) in table {
        let database = database(db);
        let request = AccessRequest {
            database: &database,
            db_user,
            db_name,
        };
        let got = match check_access(&roles(held), &traits(), request) {
            Ok(access) => {
                let allowed_by: &'static str = Box::leak(access.allowed_by.into_boxed_str());
                let db_name: &'static str = Box::leak(access.db_name.into_boxed_str());
                Allow(db_name, allowed_by)
            }
            Err(denial) => match denial.reason {
                DenialReason::EmptyDbUser => EmptyUser,
                DenialReason::DeniedByRole { role, part } => {
                    DeniedBy(Box::leak(role.into_boxed_str()), part)
                }
                DenialReason::LabelsNotAllowed => Labels,
                DenialReason::DbUserNotAllowed { .. } => User,
                DenialReason::DbNameNotAllowed { .. } => Name,
            },
        };
        assert_eq!(
            &got, expected,
            "roles {held:?} on {db} as {db_user:?}/{db_name:?}"
        );
    }
}

// Refusal messages name the failed part, list what is allowed, and say how to find out more.
#[test]
fn refusals_say_what_failed_and_what_to_do() {
    let dev_pg = database("dev-pg");
    let message = |held: &str, db: &Database, user: &str, name: &str| {
        check_access(
            &roles(held),
            &traits(),
            AccessRequest {
                database: db,
                db_user: user,
                db_name: name,
            },
        )
        .unwrap_err()
        .to_string()
    };
    let text = message("dev", &dev_pg, "bob", "app");
    assert_eq!(
        text,
        "access to database \"dev-pg\" denied: your roles do not allow db user \"bob\" here; allowed db users: \"alice\", \"readonly\""
    );
    let text = message("dev", &dev_pg, "alice", "other");
    assert!(
        text.contains(
            "database name \"other\" as db user \"alice\"; allowed names: \"alice_db\", \"app\""
        ),
        "{text}"
    );
    let text = message("dev", &dev_pg, "alice", "");
    assert!(
        text.contains("database name \"alice\"") && text.contains("pass --db-name"),
        "{text}"
    );
    let text = message("dev", &database("prod-pg"), "alice", "app");
    assert!(text.contains("`postern db ls`"), "{text}");
    let text = message("admin,no-superuser", &dev_pg, "postgres", "app");
    assert!(
        text.contains("role \"no-superuser\" denies the db user \"postgres\""),
        "{text}"
    );
    let text = message("admin", &dev_pg, "", "");
    assert!(text.contains("--db-user"), "{text}");
    let text = message("prod-ro", &database("prod-pg"), "w", "");
    assert!(text.contains("allowed db users: \"readonly\""), "{text}");
    let text = message("admin,no-secrets", &dev_pg, "x", "secrets");
    assert!(
        text.contains("denies the database name \"secrets\""),
        "{text}"
    );
}

// Listing shows databases whose labels a role allows and no role denies.
#[test]
fn listing_filters_by_labels() {
    let visible = |held: &str| -> Vec<&str> {
        ["dev-pg", "staging-my", "prod-pg", "blue-pg", "bare-pg"]
            .into_iter()
            .filter(|db| may_list(&roles(held), &traits(), &database(db)))
            .collect()
    };
    assert_eq!(visible("dev"), ["dev-pg", "staging-my"]);
    assert_eq!(
        visible("admin"),
        ["dev-pg", "staging-my", "prod-pg", "blue-pg", "bare-pg"]
    );
    assert_eq!(
        visible("admin,no-prod"),
        ["dev-pg", "staging-my", "blue-pg", "bare-pg"]
    );
    assert_eq!(visible("team"), ["dev-pg"]);
    assert_eq!(visible(""), Vec::<&str>::new());
}

// Session options take the strictest value over all roles.
#[test]
fn session_options_are_the_strictest() {
    let options = SessionOptions::of(&roles("dev,prod-ro,admin"));
    assert_eq!(
        options.max_session_ttl,
        Some(std::time::Duration::from_secs(3600))
    );
    assert!(options.disconnect_expired_cert);
    // A role that sets no options imposes no limits, but sessions still end at cert
    // expiry: `disconnect_expired_cert` is on unless a role turns it off.
    assert_eq!(
        SessionOptions::of(&roles("admin")),
        SessionOptions {
            disconnect_expired_cert: true,
            ..SessionOptions::default()
        }
    );
}

// --- Properties --------------------------------------------------------------------

const VALUES: [&str; 4] = ["a", "b", "c", "*"];

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        Just(Pattern::Any),
        prop::sample::select(&["a", "b", "c"][..]).prop_map(|v| Pattern::Literal(v.into())),
        Just(Pattern::parse("{{internal.db_users}}").unwrap()),
        Just(Pattern::parse("{{internal.db_names}}").unwrap()),
        Just(Pattern::parse("{{external.x}}").unwrap()),
    ]
}

fn rules() -> impl Strategy<Value = Rules> {
    (
        prop::collection::btree_map(
            prop::sample::select(&["env", "team", "*"][..]),
            prop::collection::vec(pattern(), 1..3),
            0..3,
        ),
        prop::collection::vec(pattern(), 0..3),
        prop::collection::vec(pattern(), 0..3),
    )
        .prop_map(|(labels, db_names, db_users)| Rules {
            db_labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), if k == "*" { vec![Pattern::Any] } else { v }))
                .collect(),
            db_names,
            db_users,
        })
}

fn role(name: &'static str, with_deny: bool) -> impl Strategy<Value = Role> {
    (rules(), rules()).prop_map(move |(allow, deny)| Role {
        name: name.into(),
        options: Default::default(),
        allow,
        deny: if with_deny { deny } else { Rules::default() },
    })
}

fn value_list() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(&VALUES[..]).prop_map(String::from),
        0..3,
    )
}

fn any_traits() -> impl Strategy<Value = Traits> {
    (value_list(), value_list(), value_list()).prop_map(|(db_users, db_names, x)| Traits {
        db_users,
        db_names,
        external: BTreeMap::from([("x".to_owned(), x)]),
    })
}

fn any_database() -> impl Strategy<Value = Database> {
    (
        prop::bool::ANY,
        prop::option::of(prop::sample::select(&VALUES[..3])),
        prop::option::of(prop::sample::select(&VALUES[..3])),
    )
        .prop_map(|(postgres, env, team)| {
            let mut labels = BTreeMap::new();
            if let Some(env) = env {
                labels.insert("env".to_owned(), env.to_owned());
            }
            if let Some(team) = team {
                labels.insert("team".to_owned(), team.to_owned());
            }
            Database {
                name: "db".into(),
                description: String::new(),
                protocol: if postgres {
                    Protocol::Postgres
                } else {
                    Protocol::Mysql
                },
                uri: String::new(),
                labels,
            }
        })
}

fn request_value() -> impl Strategy<Value = String> {
    prop::sample::select(&["", "a", "b", "c", "*", "d"][..]).prop_map(String::from)
}

proptest! {
    // A role whose deny rule matches the request refuses it, whatever else is held.
    #[test]
    fn a_deny_always_wins(
        held in prop::collection::vec(role("r", true), 0..4),
        traits in any_traits(),
        database in any_database(),
        db_user in request_value(),
        db_name in request_value(),
        part in 0..3u8,
    ) {
        let mut deny = Rules::default();
        match part {
            0 => deny.db_labels = BTreeMap::from([("*".to_owned(), vec![Pattern::Any])]),
            1 => deny.db_users = vec![Pattern::Literal(db_user.clone())],
            _ => deny.db_names = vec![Pattern::Any],
        }
        let denier = Role { name: "denier".into(), options: Default::default(), allow: Rules::default(), deny };
        for position in [0, held.len()] {
            let mut roles = held.clone();
            roles.insert(position, denier.clone());
            let request = AccessRequest { database: &database, db_user: &db_user, db_name: &db_name };
            let result = check_access(&roles, &traits, request);
            // A name deny cannot apply to a MySQL request without a database name.
            let name_unchecked = part == 2 && database.protocol == Protocol::Mysql && db_name.is_empty();
            if !name_unchecked && !db_user.is_empty() {
                prop_assert!(result.is_err(), "{roles:?} allowed {db_user:?}/{db_name:?}");
            }
            prop_assert!(!may_list(&roles, &traits, &database) || part != 0);
        }
    }

    // Adding a role with only allow rules never takes access away.
    #[test]
    fn adding_an_allow_role_never_removes_access(
        held in prop::collection::vec(role("r", true), 0..4),
        extra in role("extra", false),
        traits in any_traits(),
        database in any_database(),
        db_user in request_value(),
        db_name in request_value(),
    ) {
        let request = AccessRequest { database: &database, db_user: &db_user, db_name: &db_name };
        let before = check_access(&held, &traits, request).is_ok();
        let listed_before = may_list(&held, &traits, &database);
        let mut more = held.clone();
        more.push(extra);
        prop_assert!(!before || check_access(&more, &traits, request).is_ok());
        prop_assert!(!listed_before || may_list(&more, &traits, &database));
    }

    // A role that grants db users and names only through templates grants no value the traits lack.
    #[test]
    fn templates_never_grant_more_than_the_traits(
        traits in any_traits(),
        database in any_database(),
        db_user in request_value(),
        db_name in request_value(),
    ) {
        let role = parse_role_file("p.toml", "[[role]]\nname = \"t\"\nallow.db_labels = { \"*\" = \"*\" }\nallow.db_users = [\"{{internal.db_users}}\"]\nallow.db_names = [\"{{internal.db_names}}\"]\n").unwrap();
        let request = AccessRequest { database: &database, db_user: &db_user, db_name: &db_name };
        if let Ok(access) = check_access(&role, &traits, request) {
            prop_assert!(traits.db_users.contains(&db_user), "{db_user:?} not in {:?}", traits.db_users);
            prop_assert!(
                access.db_name.is_empty() || traits.db_names.contains(&access.db_name),
                "{:?} not in {:?}", access.db_name, traits.db_names
            );
        }
    }
}
