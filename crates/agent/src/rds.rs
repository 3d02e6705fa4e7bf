//! RDS and Aurora IAM authentication: the agent signs a fresh IAM auth token per
//! connection (`crates/rds-iam`, a local SigV4 presign of `rds-db:connect`) and sends it
//! as the cleartext password, over TLS only.

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials};
use postern_rds_iam::TokenSigner;

use crate::session::{CredentialSource, LookupError, ServedDatabase};
use crate::upstream::postgres::Credential;

/// IAM auth tokens for one database's region, signed with the credentials the signer
/// was built with.
#[derive(Clone, Debug)]
pub struct RdsIam {
    signer: TokenSigner,
}

impl RdsIam {
    pub fn new(signer: TokenSigner) -> Self {
        Self { signer }
    }
}

impl CredentialSource for RdsIam {
    async fn credential(
        &self,
        database: &ServedDatabase,
        db_user: &str,
    ) -> Result<Credential, LookupError> {
        iam_credential(&self.signer, database, db_user).await
    }
}

/// A token for `db_user` on `database` (its host and port as the agent connects).
pub async fn iam_credential(
    signer: &TokenSigner,
    database: &ServedDatabase,
    db_user: &str,
) -> Result<Credential, LookupError> {
    signer
        .token(&database.target.host, database.target.port, db_user)
        .await
        .map(Credential::Password)
        .map_err(|e| LookupError {
            reason: e.to_string(),
        })
}

/// AWS credentials from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// optional `AWS_SESSION_TOKEN`), read at each use so rotated values are picked up.
/// The part of the standard AWS credential chain the agent implements itself; a
/// daemon that links `aws-config` passes its default chain instead.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvironmentCredentials;

impl ProvideCredentials for EnvironmentCredentials {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let read = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let result = match (read("AWS_ACCESS_KEY_ID"), read("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => Ok(Credentials::new(
                key,
                secret,
                read("AWS_SESSION_TOKEN"),
                None,
                "environment",
            )),
            _ => Err(CredentialsError::not_loaded(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set",
            )),
        };
        provider::future::ProvideCredentials::ready(result)
    }
}
