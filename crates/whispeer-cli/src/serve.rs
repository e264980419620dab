//! `whispeer serve`: configuration, logging, the listener and signals around `server::serve`.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use whispeer::Broker;

use crate::config::{Config, LogFormat};

pub(crate) fn run(listen: Option<String>, config_path: Option<PathBuf>) -> ExitCode {
    let explicit = config_path.is_some();
    let path = config_path.unwrap_or_else(|| PathBuf::from("whispeer.toml"));
    let mut config = match Config::load(&path, explicit) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("whispeer: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("whispeer: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, &path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("whispeer: {err:#}");
            if err.is::<ConfigError>() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// A configuration mistake found after loading (exit code 2).
#[derive(Debug)]
struct ConfigError(String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_env("WHISPEER_LOG")
        .unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn serve(config: Config, path: &Path) -> anyhow::Result<()> {
    let server_config =
        config.server_config().map_err(|e| ConfigError(format!("api_keys: {e}")))?;
    let addr: SocketAddr = tokio::net::lookup_host(&config.listen)
        .await
        .with_context(|| format!("cannot resolve listen address {:?}", config.listen))?
        .next()
        .with_context(|| format!("listen address {:?} resolves to nothing", config.listen))?;
    if !server_config.api_keys.required() && !addr.ip().is_loopback() {
        bail!(ConfigError(format!(
            "refusing to listen on {addr} without api_keys: anyone could connect. Set api_keys in {} \
             (or WHISPEER_API_KEYS), or listen on a loopback address",
            path.display()
        )));
    }
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    if !server_config.api_keys.required() {
        tracing::warn!(%local, "no api_keys configured: the server is OPEN to every local process");
    }
    tracing::info!(%local, name = %server_config.name, "listening");
    // A plain line on stdout for scripts and tests that need the chosen port.
    println!("whispeer: listening on {local}");
    let _ = std::io::stdout().flush();
    let broker = Broker::builder(config.broker_options()).build();
    whispeer::server::serve(listener, broker, server_config, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
