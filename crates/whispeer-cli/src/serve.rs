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
use whispeer::server::cluster::ClusterStats;
use whispeer::server::{AdminServer, Chat, Cluster, ClusterStatus};

/// The listen addresses given on the command line, over the configuration's.
pub(crate) struct Listen {
    pub(crate) listen: Option<String>,
    pub(crate) ws_listen: Option<String>,
    pub(crate) admin_listen: Option<String>,
    pub(crate) chat_listen: Option<String>,
    pub(crate) chat_page: Option<PathBuf>,
    pub(crate) mqtt_listen: Option<String>,
    pub(crate) relay: bool,
}

pub(crate) fn run(addresses: Listen, config_path: Option<PathBuf>) -> ExitCode {
    let Listen { listen, ws_listen, admin_listen, chat_listen, chat_page, mqtt_listen, relay } =
        addresses;
    let explicit = config_path.is_some();
    let path = config_path.unwrap_or_else(|| PathBuf::from("whispeer.toml"));
    let (mut config, ignored) = match Config::load(&path, explicit) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("whispeer: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if ws_listen.is_some() {
        config.ws_listen = ws_listen;
    }
    if admin_listen.is_some() {
        config.admin_listen = admin_listen;
    }
    if chat_listen.is_some() {
        config.chat.listen = chat_listen;
    }
    if chat_page.is_some() {
        config.chat.page_dir = chat_page;
    }
    if mqtt_listen.is_some() {
        config.mqtt.listen = mqtt_listen;
    }
    if relay {
        config.relay.enabled = true;
    }
    init_logging(&config);
    for variable in ignored {
        tracing::warn!(%variable, "ignored: no configuration key of this name (see whispeer.example.toml)");
    }
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

/// Resolves and binds a listen address. With `open_because`, a non-loopback address is refused
/// with that reason: the listener would be open to anyone.
async fn bind(address: &str, open_because: Option<String>) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("cannot resolve listen address {address:?}"))?
        .next()
        .with_context(|| format!("listen address {address:?} resolves to nothing"))?;
    if let Some(why) = open_because
        && !addr.ip().is_loopback()
    {
        bail!(ConfigError(format!("refusing to listen on {addr} {why}")));
    }
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// Refuses a non-loopback `address` with `open_because` (a listener that binds itself).
async fn refuse_open(address: &str, open_because: Option<String>) -> anyhow::Result<()> {
    let Some(why) = open_because else { return Ok(()) };
    let addr: SocketAddr = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("cannot resolve listen address {address:?}"))?
        .next()
        .with_context(|| format!("listen address {address:?} resolves to nothing"))?;
    if !addr.ip().is_loopback() {
        bail!(ConfigError(format!("refusing to listen on {addr} {why}")));
    }
    Ok(())
}

async fn serve(config: Config, path: &Path) -> anyhow::Result<()> {
    let mut server_config = config.server_config().map_err(|e| ConfigError(format!("{e:#}")))?;
    let broker_options = config.broker_options().map_err(|e| ConfigError(format!("{e:#}")))?;
    // Before listening: recovering the write-ahead log restores the durable history first.
    let started = std::time::Instant::now();
    let cluster = config.cluster_settings().map_err(|e| ConfigError(format!("{e:#}")))?;
    let mut builder = Broker::builder(broker_options);
    let open = !server_config.auth_required();
    let open_because = || {
        open.then(|| {
            format!(
                "without api_keys: anyone could connect. Set api_keys in {} (or \
                 WHISPEER_API_KEYS), or listen on a loopback address",
                path.display()
            )
        })
    };
    let cluster = match cluster {
        Some(settings) => {
            let cluster = Cluster::new(settings).map_err(|e| ConfigError(e.to_string()))?;
            Some(cluster.share_retained(&server_config))
        }
        None => None,
    };
    let cluster_status = cluster.as_ref().map(Cluster::status);
    let chat_settings =
        config.chat_settings(server_config.clone()).map_err(|e| ConfigError(format!("{e:#}")))?;
    let mut chat_status = None;
    if let (Some(settings), Some(address)) = (chat_settings, &config.chat.listen) {
        refuse_open(address, open_because()).await?;
        let mut chat = Chat::new(address.clone());
        match &cluster_status {
            // Its state and its topics are the cluster engine's.
            Some(status) => chat = chat.on_cluster(status.clone()),
            None if settings.dir.is_none() => tracing::warn!(
                "chat keeps its groups and offline messages in memory: set storage.dir to keep them across restarts"
            ),
            None => {}
        }
        let chat = chat.config(settings);
        chat_status = Some(chat.status());
        builder = builder.with(chat);
    }
    if let Some(cluster) = cluster {
        builder = builder.with(cluster);
    }
    let broker = builder.try_build()?;
    if config.storage.dir.is_some() {
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "storage opened");
    }
    let listener = bind(&config.listen, open_because()).await?;
    let ws_listener = match &config.ws_listen {
        Some(address) => Some(bind(address, open_because()).await?),
        None => None,
    };
    let mqtt_listener = match &config.mqtt.listen {
        Some(address) => Some(bind(address, open_because()).await?),
        None => None,
    };
    server_config.websocket_path.clone_from(&config.ws_path);
    let relay = config.relay.settings().map_err(|e| ConfigError(format!("{e:#}")))?;
    if let Some(relay) = relay {
        if ws_listener.is_none() {
            bail!(ConfigError(
                "the relay is served on the WebSocket listener: set ws_listen (--ws-listen)".into()
            ));
        }
        server_config.relay = Some(std::sync::Arc::new(whispeer::server::Relay::new(relay)));
    }
    let local = listener.local_addr()?;
    if open {
        tracing::warn!(%local, "no api_keys configured: the server is OPEN to every local process");
    }
    tracing::info!(%local, name = %server_config.name, "listening");
    // Plain lines on stdout for scripts and tests that need the chosen ports.
    let secure = server_config.tls.is_some();
    println!("whispeer: listening on {}{local}", if secure { "tls://" } else { "" });
    let mut advertised = vec![format!("{}{local}", if secure { "tls://" } else { "" })];
    if let Some(ws) = &ws_listener {
        let ws_local = ws.local_addr()?;
        let scheme = if secure { "wss" } else { "ws" };
        tracing::info!(%ws_local, path = %config.ws_path, "listening for WebSocket clients");
        println!("whispeer: websocket listening on {scheme}://{ws_local}{}", config.ws_path);
        if server_config.relay.is_some() {
            println!("whispeer: relay listening on {scheme}://{ws_local}/relay");
        }
        advertised.push(format!("{scheme}://{ws_local}{}", config.ws_path));
    }
    if let Some(mqtt) = &mqtt_listener {
        let mqtt_local = mqtt.local_addr()?;
        let scheme = if secure { "mqtts" } else { "mqtt" };
        tracing::info!(%mqtt_local, "listening for MQTT clients");
        println!("whispeer: mqtt listening on {scheme}://{mqtt_local}");
    }
    if let Some(chat) = chat_status.as_ref().and_then(whispeer::server::ChatStatus::local_addr) {
        let scheme = if secure { "wss" } else { "ws" };
        tracing::info!(%chat, path = %config.chat.path, "listening for chat clients");
        println!("whispeer: chat listening on {scheme}://{chat}{}", config.chat.path);
        if config.chat.page_dir.is_some() {
            println!("whispeer: chat page on {}://{chat}/", if secure { "https" } else { "http" });
        }
    }
    if let Some(status) = &cluster_status {
        status.advertise(advertised);
        status.watch_connections(std::sync::Arc::clone(&server_config.connections));
    }
    let admin = match &config.admin_listen {
        Some(address) => {
            let admin_open = config.admin_token.is_none().then(|| {
                "for the admin port without admin_token: anyone could read the metrics. Set \
                 admin_token (or WHISPEER_ADMIN_TOKEN), or use a loopback address"
                    .to_string()
            });
            let admin_listener = bind(address, admin_open).await?;
            let admin_local = admin_listener.local_addr()?;
            let admin =
                AdminServer::new(broker.clone(), &server_config, config.admin_token.as_deref())?;
            if let Some(status) = &cluster_status {
                watch_cluster(&admin, status.clone());
            }
            tokio::spawn(admin.clone().serve(admin_listener));
            tracing::info!(%admin_local, "admin port: /healthz /readyz /metrics");
            println!("whispeer: admin listening on http://{admin_local}");
            Some(admin)
        }
        None => None,
    };
    let _ = std::io::stdout().flush();
    if let Some(admin) = &admin {
        admin.set_ready(true);
    }
    // One signal stops both listeners.
    let (trigger, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        if let Some(admin) = &admin {
            admin.set_ready(false);
        }
        let _ = trigger.send(true);
    });
    let stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    // The MQTT listener stops on the same signal; it is waited for with the others.
    let mqtt_task = mqtt_listener.map(|mqtt| {
        tokio::spawn(whispeer::server::serve_mqtt(
            mqtt,
            broker.clone(),
            server_config.clone(),
            stop(stopped.clone()),
        ))
    });
    let tcp = whispeer::server::serve(
        listener,
        broker.clone(),
        server_config.clone(),
        stop(stopped.clone()),
    );
    match ws_listener {
        Some(ws) => {
            let websocket =
                whispeer::server::serve_websocket(ws, broker.clone(), server_config, stop(stopped));
            let (tcp, websocket) = tokio::join!(tcp, websocket);
            tcp?;
            websocket?;
        }
        None => tcp.await?,
    }
    if let Some(task) = mqtt_task {
        task.await.map_err(std::io::Error::other)??;
    }
    broker.close_transports();
    tracing::info!("stopped");
    Ok(())
}

/// Adds the cluster link to `/readyz` (not ready while the engine is unreachable) and its
/// counters to `/metrics`.
fn watch_cluster(admin: &AdminServer, status: ClusterStatus) {
    let view = status.clone();
    admin.cluster_view(move || view.view());
    let presence = status.clone();
    admin.presence_view(move || presence.presence());
    let ready = status.clone();
    admin.ready_when(move || {
        if !ready.connected() {
            Err("cluster engine unreachable".into())
        } else if !ready.history_loaded() {
            Err("cluster history still loading".into())
        } else {
            Ok(())
        }
    });
    admin.on_scrape(move || {
        let stats: ClusterStats = status.stats();
        metrics::gauge!("whispeer_cluster_connected").set(f64::from(u8::from(stats.connected)));
        let counters = [
            ("whispeer_cluster_forwarded_total", stats.forwarded),
            ("whispeer_cluster_received_total", stats.received),
            ("whispeer_cluster_duplicates_total", stats.duplicates),
            ("whispeer_cluster_malformed_total", stats.malformed),
            ("whispeer_cluster_refused_here_total", stats.refused_here),
        ];
        for (name, value) in counters {
            metrics::counter!(name).absolute(value);
        }
        let lost = [("unreachable", stats.lost_unreachable), ("full", stats.lost_full)];
        for (reason, value) in lost {
            metrics::counter!("whispeer_cluster_lost_total", "reason" => reason).absolute(value);
        }
        metrics::gauge!("whispeer_cluster_backlog").set(stats.backlog as f64);
        metrics::gauge!("whispeer_cluster_nodes").set(status.membership().nodes.len() as f64);
    });
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
