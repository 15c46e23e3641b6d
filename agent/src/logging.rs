//! Logging for the agent and the CLI: text (or JSON) on stdout, with a level filter that the
//! admin API can change while the agent runs (`POST /logging?level=debug`).
use std::sync::OnceLock;

use tracing_subscriber::{
    layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer, Registry,
};

/// Log line format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. The filter comes from `RUST_LOG`, else `info`.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: log files and collectors get plain text.
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal());
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => Box::new(fmt),
        LogFormat::Json => Box::new(fmt.json()),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the level filter (same syntax as `RUST_LOG`, e.g. `debug` or `info,access=debug`).
pub fn set_filter(spec: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(spec).map_err(|e| {
        format!("{spec:?} is not a log filter (e.g. `debug`, `info,audit=debug`): {e}")
    })?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging was not initialised with a reloadable filter".to_string())?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    tracing::info!(target: "audit", event = "log_level_changed", filter = %spec, "log filter changed");
    Ok(())
}
