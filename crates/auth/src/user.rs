//! Users: name, roles, traits, argon2id password hash and optional TOTP second factor.

use std::collections::BTreeMap;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::totp::Totp;

/// Shortest password we accept.
pub const PASSWORD_SIZE_MIN: usize = 12;
/// Longest password we hash (argon2 would take more, but nobody types more).
pub const PASSWORD_SIZE_MAX: usize = 1024;
/// Most values of one trait, and most free-form traits.
pub const TRAIT_VALUES_MAX: usize = 1000;

/// Values that role templates draw on: `{{internal.db_users}}`,
/// `{{internal.db_names}}` and `{{external.NAME}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_names: Vec<String>,
    /// Free-form traits, for example from an identity provider.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external: BTreeMap<String, Vec<String>>,
}

impl Traits {
    /// Checks sizes; trait values are data, not patterns, so anything printable goes.
    pub fn validate(&self) -> Result<(), Error> {
        let lists = [("db_users", &self.db_users), ("db_names", &self.db_names)]
            .into_iter()
            .map(|(name, values)| (name.to_owned(), values))
            .chain(
                self.external
                    .iter()
                    .map(|(name, values)| (format!("external.{name}"), values)),
            );
        for name in self.external.keys() {
            let valid = !name.is_empty()
                && name.len() <= 256
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'));
            if !valid || name == "db_users" || name == "db_names" {
                return Err(Error::invalid(
                    "traits",
                    format!(
                        "{name:?} is not a free-form trait name (letters, digits, _ - . : /; not db_users or db_names)"
                    ),
                ));
            }
        }
        if self.external.len() > TRAIT_VALUES_MAX {
            return Err(Error::invalid(
                "traits",
                format!("more than {TRAIT_VALUES_MAX} traits"),
            ));
        }
        for (name, values) in lists {
            if values.len() > TRAIT_VALUES_MAX {
                return Err(Error::invalid(
                    format!("traits.{name}"),
                    format!("more than {TRAIT_VALUES_MAX} values"),
                ));
            }
            if let Some(bad) = values
                .iter()
                .find(|value| value.len() > 256 || value.chars().any(char::is_control))
            {
                return Err(Error::invalid(
                    format!("traits.{name}"),
                    format!("{bad:?} is too long or holds control characters"),
                ));
            }
        }
        Ok(())
    }
}

/// A stored user.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub roles: Vec<String>,
    #[serde(default)]
    pub traits: Traits,
    /// PHC string of the argon2id hash; `None` until a password is set.
    pub password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<Totp>,
    /// The last TOTP step accepted, so each code is good only once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_last_step: Option<u64>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash and the TOTP secret are credentials: never in logs.
        f.debug_struct("User")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("traits", &self.traits)
            .field("has_password", &self.password_hash.is_some())
            .field("has_totp", &self.totp.is_some())
            .finish()
    }
}

/// User names: 1 to 128 of letters, digits and `. _ @ + -`.
pub fn check_user_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "user name",
            format!("{name:?}: use 1 to 128 of letters, digits and . _ @ + -"),
        ))
    }
}

/// Cost of the argon2id hash. The default is OWASP's first recommendation (19 MiB,
/// 2 passes); tests may use a cheaper one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordCost {
    pub memory_kib: u32,
    pub passes: u32,
}

impl Default for PasswordCost {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            passes: 2,
        }
    }
}

impl PasswordCost {
    fn hasher(self) -> Result<Argon2<'static>, Error> {
        let params = Params::new(self.memory_kib, self.passes, 1, None)
            .map_err(|error| Error::invalid("password cost", error.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Hashes `password` with argon2id and a salt drawn from `rng`.
pub fn hash_password(
    password: &str,
    cost: PasswordCost,
    rng: &mut impl rand_core::RngCore,
) -> Result<String, Error> {
    if password.chars().count() < PASSWORD_SIZE_MIN {
        return Err(Error::invalid(
            "password",
            format!("shorter than {PASSWORD_SIZE_MIN} characters"),
        ));
    }
    if password.len() > PASSWORD_SIZE_MAX {
        return Err(Error::invalid(
            "password",
            format!("longer than {PASSWORD_SIZE_MAX} bytes"),
        ));
    }
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)
        .map_err(|error| Error::invalid("password salt", error.to_string()))?;
    let hash = cost
        .hasher()?
        .hash_password(password.as_bytes(), &salt)
        .map_err(|error| Error::invalid("password", error.to_string()))?;
    Ok(hash.to_string())
}

/// Checks `password` against a PHC hash; the cost comes from the hash itself.
pub fn verify_password(password: &str, hash: &str) -> bool {
    if password.len() > PASSWORD_SIZE_MAX {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const CHEAP: PasswordCost = PasswordCost {
        memory_kib: 64,
        passes: 1,
    };

    // A hash verifies its own password only, is argon2id, and salts differ per hash.
    #[test]
    fn hashes_verify_and_are_salted() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let first = hash_password("correct horse battery", CHEAP, &mut rng).unwrap();
        let second = hash_password("correct horse battery", CHEAP, &mut rng).unwrap();
        assert!(first.starts_with("$argon2id$"), "{first}");
        assert_ne!(first, second);
        assert!(verify_password("correct horse battery", &first));
        assert!(!verify_password("correct horse battery!", &first));
        assert!(!verify_password("anything", "not a hash"));
    }

    // The default cost verifies too (the cost travels inside the hash).
    #[test]
    fn default_cost_round_trips() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let hash =
            hash_password("a long enough password", PasswordCost::default(), &mut rng).unwrap();
        assert!(hash.contains("m=19456,t=2,p=1"), "{hash}");
        assert!(verify_password("a long enough password", &hash));
    }

    // Free-form traits may not shadow the internal ones or have odd names.
    #[test]
    fn refuses_bad_trait_names() {
        for name in ["db_users", "db_names", "", "with space"] {
            let traits = Traits {
                external: BTreeMap::from([(name.to_owned(), vec!["x".to_owned()])]),
                ..Traits::default()
            };
            assert!(traits.validate().is_err(), "{name:?}");
        }
        let ok = Traits {
            external: BTreeMap::from([("team".to_owned(), vec!["red".to_owned()])]),
            ..Traits::default()
        };
        ok.validate().unwrap();
    }

    // Short and oversize passwords, and odd user names, are refused.
    #[test]
    fn refuses_bad_passwords_and_names() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        assert!(hash_password("short", CHEAP, &mut rng).is_err());
        assert!(hash_password(&"x".repeat(PASSWORD_SIZE_MAX + 1), CHEAP, &mut rng).is_err());
        for bad in ["", "with space", "semi;colon", &"a".repeat(129)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
        check_user_name("alice.smith@example.com").unwrap();
    }
}
