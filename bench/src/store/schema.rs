//! The schema: the released migrations, applied in order on open, and the connection's
//! settings (WAL, foreign keys).

use super::{Store, StoreError};

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 5;

/// Migrations, in order: `MIGRATIONS[k]` takes a database from version k to k+1. Released
/// migrations are never edited: a change is a new file.
const MIGRATIONS: &[&str] = &[
    include_str!("schema_v1.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
    include_str!("schema_v5.sql"),
];

impl Store {
    pub(super) fn configure(&mut self) -> Result<(), StoreError> {
        // WAL: readers never block the writer; a commit is one append to the
        // log. synchronous=NORMAL keeps every committed transaction across a
        // process crash (kill -9); only a power loss can drop the last few.
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The file's schema version.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Brings the file to [`SCHEMA_VERSION`], one transaction per migration; refuses a newer
    /// file.
    pub(super) fn migrate(&mut self) -> Result<(), StoreError> {
        let v = self.schema_version()?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: v,
            });
        }
        let e = StoreError::sqlite(&self.path);
        for (k, sql) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            let tx = self.conn.transaction().map_err(e)?;
            tx.execute_batch(sql).map_err(e)?;
            tx.pragma_update(None, "user_version", (k + 1) as i64)
                .map_err(e)?;
            tx.commit().map_err(e)?;
        }
        Ok(())
    }
}
