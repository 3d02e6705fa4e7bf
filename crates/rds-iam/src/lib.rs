//! IAM database authentication for Amazon RDS and Aurora.
//!
//! An RDS IAM auth token is a SigV4-presigned URL for the action `connect` of service
//! `rds-db` (`host:port/?Action=connect&DBUser=…&X-Amz-…`), valid for 15 minutes, sent
//! as the cleartext password over TLS. A fresh one is made per connection.
//!
//! The signing time comes from the runtime seam's [`WallClock`], so tokens follow a
//! simulation's (or test's) clock. Credentials come from any AWS credentials provider;
//! the agent passes the standard chain ([`chain::DefaultChain`]).

pub mod chain;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_rds::auth_token::{AuthTokenGenerator, Config};
use aws_smithy_async::time::{SharedTimeSource, TimeSource};
use aws_types::region::Region;
use aws_types::sdk_config::SdkConfig;
use postern_rt::WallClock;

/// How long a token is valid; RDS accepts at most 15 minutes.
pub const TOKEN_TTL: Duration = Duration::from_secs(900);

/// Why no token could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No AWS credentials could be found or loaded.
    #[error(
        "no AWS credentials for IAM auth to {host}:{port} as {db_user:?}: {reason}. The agent \
         uses the standard AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
         AWS_PROFILE, web identity, or the instance's IAM role); that identity needs an IAM \
         policy allowing \"rds-db:connect\" on \
         \"arn:aws:rds-db:{region}:<account>:dbuser:<DbiResourceId>/{db_user}\""
    )]
    NoCredentials {
        host: String,
        port: u16,
        db_user: String,
        region: String,
        reason: String,
    },
    /// The request itself was malformed (empty host or user, bad characters).
    #[error("cannot sign an RDS IAM token for {host}:{port} as {db_user:?}: {reason}")]
    InvalidRequest {
        host: String,
        port: u16,
        db_user: String,
        reason: String,
    },
}

/// Makes RDS IAM auth tokens for one AWS region.
#[derive(Clone, Debug)]
pub struct TokenSigner {
    region: String,
    credentials: SharedCredentialsProvider,
    clock: WallClock,
}

impl TokenSigner {
    pub fn new(
        region: impl Into<String>,
        credentials: impl ProvideCredentials + 'static,
        clock: WallClock,
    ) -> Self {
        Self {
            region: region.into(),
            credentials: SharedCredentialsProvider::new(credentials),
            clock,
        }
    }

    /// A token to log in to the database at `host:port` as `db_user`, signed now.
    pub async fn token(&self, host: &str, port: u16, db_user: &str) -> Result<String, Error> {
        let invalid = |reason: &str| Error::InvalidRequest {
            host: host.to_owned(),
            port,
            db_user: db_user.to_owned(),
            reason: reason.to_owned(),
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        {
            return Err(invalid("the host must be a plain DNS name"));
        }
        if db_user.is_empty() {
            return Err(invalid("the database user is empty"));
        }
        // The SDK writes the user into the URL unencoded and panics on characters a URI
        // cannot hold (a space); `&` or `#` would change what is signed. The user comes
        // from a certificate, so refuse anything but plain characters here.
        if !db_user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-~@".contains(&b))
        {
            return Err(invalid(
                "IAM auth supports database user names of letters, digits and _ . - ~ @ only",
            ));
        }
        // Load the credentials here so a failure can be explained; the generator would
        // only say "credentials are required".
        let credentials =
            self.credentials
                .provide_credentials()
                .await
                .map_err(|e| Error::NoCredentials {
                    host: host.to_owned(),
                    port,
                    db_user: db_user.to_owned(),
                    region: self.region.clone(),
                    reason: e.to_string(),
                })?;
        let config = Config::builder()
            .hostname(host)
            .port(u64::from(port))
            .username(db_user)
            .region(Region::new(self.region.clone()))
            .credentials(credentials)
            .expires_in(TOKEN_TTL.as_secs())
            .build()
            .map_err(|e| invalid(&e.to_string()))?;
        let sdk_config = SdkConfig::builder()
            .time_source(SharedTimeSource::new(ClockSource(self.clock.clone())))
            .build();
        AuthTokenGenerator::new(config)
            .auth_token(&sdk_config)
            .await
            .map(|token| token.as_str().to_owned())
            .map_err(|e| invalid(&e.to_string()))
    }
}

/// The seam's wall clock as the AWS SDK's time source.
#[derive(Debug)]
struct ClockSource(WallClock);

impl TimeSource for ClockSource {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0.now_ms())
    }
}
