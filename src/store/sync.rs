//! Keeping a node's snapshot equal to the database: LISTEN for the
//! version each write NOTIFYs, compare versions every second anyway (a
//! missed notification loses nothing), reconnect with backoff, and save
//! each config loaded to a local file, so a node that starts while the
//! database is down still serves its last good config.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;

use super::{Store, StoreError, CHANNEL};
use crate::config::Config;
use crate::server::Shared;

/// How often versions are compared when no notification comes.
pub const POLL: Duration = Duration::from_secs(1);

/// The local copy of the last good config.
#[derive(Serialize, Deserialize)]
pub struct SavedSnapshot {
    /// The database it came from (see `config_state.instance`).
    #[serde(default)]
    pub instance: Option<String>,
    pub version: u64,
    pub config: Config,
}

/// Writes atomically and durably (a temporary file of its own, synced,
/// then renamed over the old one), readable by this user only: it holds
/// key digests, password hashes and JWT secrets.
pub fn save_snapshot(path: &Path, instance: &str, version: u64, config: &Config) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let saved = SavedSnapshot { instance: Some(instance.to_string()), version, config: config.clone() };
    let text = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn read_snapshot(path: &Path) -> Result<SavedSnapshot, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{} is not a saved snapshot: {e}", path.display()))
}

/// Whether the database's (instance, version) is news to this node: a
/// later version of the same database, or another database altogether (one
/// rebuilt from scratch starts its versions again).
fn is_news(shared: &Shared, instance: &str, version: u64) -> bool {
    let same_db = shared.db_instance.lock().ok().and_then(|i| i.clone()).is_some_and(|i| i == instance);
    !same_db || version > shared.snapshot.load().version
}

/// Loads the database's config into the node when it is news.
pub async fn catch_up(store: &Store, shared: &Shared, snapshot_path: &Path) -> Result<bool, StoreError> {
    let (instance, version) = store.version().await?;
    if !is_news(shared, &instance, version) {
        return Ok(false);
    }
    let (config, instance, version) = store.load_with_instance().await?;
    // Two loads can race (this loop and an admin write's own catch-up):
    // under the lock, only ever move forward.
    let _guard = shared.reload_lock.lock().await;
    if !is_news(shared, &instance, version) {
        return Ok(false);
    }
    shared.replace_config_at(config.clone(), version).map_err(StoreError::Invalid)?;
    crate::config::validate::log_warnings(&config);
    if let Ok(mut i) = shared.db_instance.lock() {
        *i = Some(instance.clone());
    }
    if let Err(e) = save_snapshot(snapshot_path, &instance, version, &config) {
        tracing::warn!(error = %e, path = %snapshot_path.display(), "cannot save the local snapshot");
    }
    tracing::info!(version, "config loaded from the database");
    Ok(true)
}

/// A config this build cannot run (say, written by a newer node) is not a
/// lost database: keep serving the previous one, say so, keep listening.
async fn checked_catch_up(store: &Store, shared: &Shared, snapshot_path: &Path) -> Result<(), StoreError> {
    match catch_up(store, shared, snapshot_path).await {
        Ok(_) => Ok(()),
        Err(e @ (StoreError::Invalid(_) | StoreError::Schema(_))) => {
            tracing::error!(error = %e, "the database's config cannot be loaded; still serving the previous one");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs until the process ends.
pub async fn run(store: Store, shared: Arc<Shared>, snapshot_path: PathBuf) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow(&store, &shared, &snapshot_path).await {
            Ok(()) => {}
            Err(e) => {
                if shared.db_reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "lost the database; serving the last config while reconnecting");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if shared.db_reachable.load(Ordering::Relaxed) {
            backoff = Duration::from_millis(100);
        }
    }
}

async fn follow(store: &Store, shared: &Shared, snapshot_path: &Path) -> Result<(), StoreError> {
    let mut listener = PgListener::connect_with(store.pool()).await?;
    listener.listen(CHANNEL).await?;
    // Anything written while we were not listening is caught up here.
    checked_catch_up(store, shared, snapshot_path).await?;
    if !shared.db_reachable.swap(true, Ordering::Relaxed) {
        tracing::info!("connected to the database");
    }
    loop {
        tokio::select! {
            n = listener.recv() => { n?; }
            _ = tokio::time::sleep(POLL) => {}
        }
        checked_catch_up(store, shared, snapshot_path).await?;
    }
}
