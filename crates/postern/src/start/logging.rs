//! Logs through `tracing`: text for people, JSON lines for collectors. The level comes
//! from `RUST_LOG` when set, else from `[log] level`, else `info`.

use tracing_subscriber::EnvFilter;

use super::config::{LogFormat, LogSection};

/// Installs the global subscriber. Logs go to standard error.
pub(crate) fn init(section: &LogSection) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) if !text.trim().is_empty() => EnvFilter::try_new(&text)
            .map_err(|error| format!("RUST_LOG={text:?} is not a tracing filter: {error}"))?,
        _ => EnvFilter::try_new(section.level.as_deref().unwrap_or("info"))
            .map_err(|error| format!("log.level: {error}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match section.format {
        LogFormat::Text => builder.with_target(true).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    installed.map_err(|error| format!("cannot install the logger: {error}"))
}
