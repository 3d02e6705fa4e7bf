//! Typed auth state on top of a [`Backend`]: users and roles as JSON under
//! `/users/NAME` and `/roles/NAME`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::backend::{Backend, Expect, Revision};
use crate::role::{Role, check_role_name};
use crate::user::{User, check_user_name};

/// How often a read-modify-write retries after losing a compare-and-swap.
const UPDATE_ATTEMPTS_MAX: usize = 16;

/// Users and roles, stored in a backend.
#[derive(Debug, Clone)]
pub struct State<B> {
    backend: B,
}

fn user_key(name: &str) -> String {
    format!("/users/{name}")
}

fn role_key(name: &str) -> String {
    format!("/roles/{name}")
}

fn decode<T: DeserializeOwned>(what: &str, key: &str, value: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(value).map_err(|error| Error::Corrupt {
        what: format!("{what} at {key}"),
        detail: error.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|error| Error::invalid("value", error.to_string()))
}

impl<B: Backend> State<B> {
    pub fn new(backend: B) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Creates a user; [`Error::AlreadyExists`] if the name is taken.
    pub async fn create_user(&self, user: &User) -> Result<(), Error> {
        check_user_name(&user.name)?;
        user.traits.validate()?;
        for role in &user.roles {
            check_role_name(role).map_err(|reason| Error::invalid("role", reason))?;
        }
        let result = self
            .backend
            .compare_and_swap(&user_key(&user.name), Expect::Absent, &encode(user)?, None)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(Error::Conflict { .. }) => Err(Error::AlreadyExists {
                kind: "user",
                name: user.name.clone(),
            }),
            Err(error) => Err(error),
        }
    }

    async fn user_with_revision(&self, name: &str) -> Result<(User, Revision), Error> {
        check_user_name(name)?;
        let key = user_key(name);
        let item = self
            .backend
            .get(&key)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "user",
                name: name.to_owned(),
            })?;
        Ok((decode("user", &key, &item.value)?, item.revision))
    }

    pub async fn user(&self, name: &str) -> Result<User, Error> {
        Ok(self.user_with_revision(name).await?.0)
    }

    /// Every user, sorted by name.
    pub async fn users(&self) -> Result<Vec<User>, Error> {
        let items = self.backend.list("/users/").await?;
        items
            .iter()
            .map(|item| decode("user", &item.key, &item.value))
            .collect()
    }

    /// Changes a user with `change`, retrying if someone else changed it meanwhile.
    /// Returns the user as stored.
    pub async fn update_user(
        &self,
        name: &str,
        mut change: impl FnMut(&mut User) -> Result<(), Error>,
    ) -> Result<User, Error> {
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            let (mut user, revision) = self.user_with_revision(name).await?;
            change(&mut user)?;
            user.name = name.to_owned();
            user.traits.validate()?;
            let value = encode(&user)?;
            match self
                .backend
                .compare_and_swap(&user_key(name), Expect::Revision(revision), &value, None)
                .await
            {
                Ok(_) => return Ok(user),
                Err(Error::Conflict { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(Error::Conflict {
            key: user_key(name),
        })
    }

    pub async fn delete_user(&self, name: &str) -> Result<(), Error> {
        check_user_name(name)?;
        if self.backend.delete(&user_key(name)).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                kind: "user",
                name: name.to_owned(),
            })
        }
    }

    /// Creates or replaces a role. Returns whether it existed before.
    pub async fn upsert_role(&self, role: &Role) -> Result<bool, Error> {
        role.validate().map_err(|(field, reason)| {
            Error::invalid(format!("role {:?}: {field}", role.name), reason)
        })?;
        let key = role_key(&role.name);
        let existed = self.backend.get(&key).await?.is_some();
        self.backend.put(&key, &encode(role)?, None).await?;
        Ok(existed)
    }

    pub async fn role(&self, name: &str) -> Result<Role, Error> {
        check_role_name(name).map_err(|reason| Error::invalid("role name", reason))?;
        let key = role_key(name);
        let item = self
            .backend
            .get(&key)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "role",
                name: name.to_owned(),
            })?;
        decode("role", &key, &item.value)
    }

    /// Every role, sorted by name.
    pub async fn roles(&self) -> Result<Vec<Role>, Error> {
        let items = self.backend.list("/roles/").await?;
        items
            .iter()
            .map(|item| decode("role", &item.key, &item.value))
            .collect()
    }

    /// The roles a user holds that exist; a role deleted since grants nothing.
    pub async fn roles_of(&self, user: &User) -> Result<Vec<Role>, Error> {
        let mut roles = Vec::with_capacity(user.roles.len());
        for name in &user.roles {
            match self.role(name).await {
                Ok(role) => roles.push(role),
                Err(Error::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(roles)
    }

    pub async fn delete_role(&self, name: &str) -> Result<(), Error> {
        check_role_name(name).map_err(|reason| Error::invalid("role name", reason))?;
        if self.backend.delete(&role_key(name)).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                kind: "role",
                name: name.to_owned(),
            })
        }
    }
}
