//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "postern",
    version,
    about = "Identity-aware access to databases"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) state: StateArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the auth state and audit log live.
#[derive(Debug, Args)]
pub(crate) struct StateArgs {
    /// Folder of the embedded state (`state.db`) and audit log (`audit/`).
    #[arg(
        long,
        global = true,
        env = "POSTERN_DATA_DIR",
        default_value = "/var/lib/postern"
    )]
    pub(crate) data_dir: PathBuf,
    /// Use PostgreSQL for state and audit instead (libpq-style: `host=... dbname=...`).
    #[arg(long, global = true, env = "POSTERN_POSTGRES")]
    pub(crate) postgres: Option<String>,
    /// PostgreSQL schema that holds the state and audit tables.
    #[arg(
        long,
        global = true,
        env = "POSTERN_POSTGRES_SCHEMA",
        default_value = "postern"
    )]
    pub(crate) postgres_schema: String,
    /// Cluster name written into certificates.
    #[arg(
        long,
        global = true,
        env = "POSTERN_CLUSTER",
        default_value = "postern"
    )]
    pub(crate) cluster: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the roles a config file names (auth, proxy, db) in this process.
    Start(crate::start::StartArgs),
    /// The user's commands: login, status, logout, db, proxy.
    #[command(flatten)]
    User(crate::client_cmd::UserCommand),
    /// Administer users, roles, tokens, certificate authorities and databases.
    #[command(subcommand)]
    Admin(Admin),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(Audit),
}

#[derive(Debug, Subcommand)]
pub(crate) enum Admin {
    #[command(subcommand)]
    Users(Users),
    #[command(subcommand)]
    Roles(Roles),
    #[command(subcommand)]
    Tokens(Tokens),
    #[command(subcommand)]
    Auth(AuthCommand),
    #[command(subcommand)]
    Db(Db),
}

#[derive(Debug, Subcommand)]
pub(crate) enum Users {
    /// Create a user. Prints a generated password unless --password-stdin is given.
    Add {
        name: String,
        /// Roles, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Values of the `db_users` trait, comma-separated.
        #[arg(long, value_delimiter = ',')]
        db_users: Vec<String>,
        /// Values of the `db_names` trait, comma-separated.
        #[arg(long, value_delimiter = ',')]
        db_names: Vec<String>,
        /// A free-form trait, `NAME=VALUE`; repeat for more values.
        #[arg(long = "trait", value_name = "NAME=VALUE")]
        traits: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Require a TOTP second factor; prints its secret once.
        #[arg(long)]
        totp: bool,
    },
    /// List users.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete a user.
    Rm { name: String },
    /// Set a new password (generated unless --password-stdin is given).
    ResetPassword {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        /// Also replace the TOTP secret; prints it once.
        #[arg(long)]
        totp: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Roles {
    /// Create or replace the roles defined in a TOML file.
    Apply { file: PathBuf },
    /// List roles.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete a role.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Tokens {
    /// Create a single-use join token for a database service (db) or a proxy.
    Add {
        #[arg(long = "type", value_enum)]
        kind: TokenType,
        /// Lifetime, e.g. 30m or 1h.
        #[arg(long, default_value = "30m")]
        ttl: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum TokenType {
    Db,
    Proxy,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuthCommand {
    /// Sign a server certificate for a self-hosted database.
    Sign {
        #[arg(long, value_enum)]
        format: SignFormat,
        /// Host names or IP addresses the database is reached by, comma-separated.
        #[arg(long = "host", value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        /// Writes PREFIX.crt, PREFIX.key and PREFIX.cas.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 2190h.
        #[arg(long, default_value = "2190h")]
        ttl: String,
    },
    /// Move a CA rotation one phase on: standby → init → update_clients →
    /// update_servers → standby.
    Rotate {
        #[arg(long = "type", value_enum, default_value_t = CaType::All)]
        kind: CaType,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum SignFormat {
    Db,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CaType {
    User,
    Host,
    Db,
    All,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Db {
    /// List databases announced by agents, with the agents serving each.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Audit {
    /// Search audit events; prints them as JSON lines, oldest first.
    Search {
        /// Start of the range, RFC 3339 (default: --since before now).
        #[arg(long)]
        from: Option<String>,
        /// End of the range, RFC 3339 (default: now).
        #[arg(long)]
        to: Option<String>,
        /// With no --from: how far back to look, e.g. 24h or 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only this event, e.g. auth.login or db.session.start.
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        session: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    // The clap definition is consistent (no duplicate flags, valid defaults).
    #[test]
    fn cli_definition_is_valid() {
        super::Cli::command().debug_assert();
    }
}
