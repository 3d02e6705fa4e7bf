//! RDS and Aurora IAM authentication: the agent signs a fresh IAM auth token per
//! connection (`crates/rds-iam`, a local SigV4 presign of `rds-db:connect`) and sends it
//! as the cleartext password, over TLS only.

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider};
use postern_rds_iam::TokenSigner;
use postern_rds_iam::chain::DefaultChain;
use postern_rt::Runtime;

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

/// The standard AWS credential chain (environment, shared files, container endpoint,
/// EC2 instance metadata; see [`postern_rds_iam::chain`]) on the runtime's network and
/// clock: what a daemon passes as `AgentServiceConfig::aws_credentials`.
pub fn standard_chain(runtime: &Runtime) -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(DefaultChain::new(*runtime.net(), runtime.clock().clone()))
}

/// AWS credentials from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// optional `AWS_SESSION_TOKEN`), read at each use so rotated values are picked up.
/// The first source of [`standard_chain`], alone.
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
