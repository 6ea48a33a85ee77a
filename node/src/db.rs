//! The metadata schema. One SQLite file in WAL mode, shared by every `fd` process on the store.
//!
//! WAL lets readers (`fd images`, a running `fd serve`) proceed while a pull writes, and a busy
//! timeout makes concurrent writers queue instead of failing. Writes are small and happen only
//! at the end of each import step, so contention stays low.

use std::path::Path;

use rusqlite::Connection;

use crate::{NodeError, Result};

/// Bump when the schema changes incompatibly; older stores are then refused with a clear error
/// rather than misread.
const SCHEMA_VERSION: i64 = 1;

/// How long a writer waits for another process's transaction before giving up. Imports hold
/// the write lock only for a few milliseconds, so this only matters under heavy parallel load.
const BUSY_TIMEOUT_MS: u32 = 60_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per stored blob: OCI blobs under their sha256 digest, fd objects (file indexes,
-- layer indexes) under their blake3 hash. The recipe lists the chunks that rebuild the bytes.
CREATE TABLE IF NOT EXISTS blobs (
    key        TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    recipe     BLOB NOT NULL,
    added      INTEGER NOT NULL
);
-- The file view of one layer, before merging: its entries, whiteouts and opaque markers.
CREATE TABLE IF NOT EXISTS layers (
    digest    TEXT PRIMARY KEY,
    diff_id   TEXT NOT NULL,
    index_key TEXT NOT NULL,
    files     INTEGER NOT NULL,
    unpacked  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    reference       TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    index_digest    TEXT,
    config_digest   TEXT NOT NULL,
    layers          TEXT NOT NULL,
    file_index      TEXT NOT NULL,
    size            INTEGER NOT NULL,
    blob_size       INTEGER NOT NULL,
    chunks          INTEGER NOT NULL,
    pulled          INTEGER NOT NULL
);
-- Images present lazily: their metadata (manifest, config, index, merged file index) is
-- stored and verified, but not their layers; file contents are fetched from team peers on
-- first read. A row here qualifies the images row of the same reference, and goes with it.
-- A separate table rather than a column, so stores made before it need no migration.
CREATE TABLE IF NOT EXISTS lazy_images (
    reference TEXT PRIMARY KEY
);
";

/// Opens (creating if needed) the database and checks its schema version.
pub(crate) fn open(path: &Path) -> Result<Connection> {
    // Several processes may create the same new store at once (parallel pulls into a fresh
    // FD_HOME). Switching a new database to WAL needs the file alone, and SQLite reports a
    // concurrent switch as "database is locked" at once rather than waiting in its busy
    // handler, so the whole opening is retried for a bounded time.
    const OPEN_ATTEMPTS: u32 = 100;
    let mut attempt = 1;
    loop {
        match open_once(path) {
            Err(NodeError::Db { source, .. }) if attempt < OPEN_ATTEMPTS && is_busy(&source) => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn open_once(path: &Path) -> Result<Connection> {
    let err = |e| NodeError::db(path, e);
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS.into()))
        .map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    // NORMAL in WAL mode keeps the database consistent after a crash; the image row is the
    // commit point and the chunk files were synced before it is written.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    conn.execute_batch(SCHEMA).map_err(err)?;
    let version: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(err)?;
    match version {
        None => {
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?1)",
                [SCHEMA_VERSION.to_string()],
            )
            .map_err(err)?;
        }
        Some(v) if v == SCHEMA_VERSION.to_string() => {}
        Some(v) => {
            return Err(NodeError::StoreUnusable {
                path: path.to_path_buf(),
                reason: format!(
                    "schema version {v}, this fd understands {SCHEMA_VERSION}; \
                     use a matching fd or point FD_HOME at a new store"
                ),
            });
        }
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_many_processes_can_create_one_new_store_at_once() -> Result<()> {
        for _ in 0..10 {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("fd.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        open(&path).map(|_| ())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| NodeError::Missing {
                    what: "thread".into(),
                })??;
            }
        }
        Ok(())
    }
}
