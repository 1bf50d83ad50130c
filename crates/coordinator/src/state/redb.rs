//! The redb backend: the whole key space in one table of one file (`DATA/state.redb`), each
//! value stored after its two revisions, the store's revision in a meta table.
//!
//! Calls block on the file (a commit waits for fsync), so the async face runs them on tokio's
//! blocking pool. Writes are serialised by a lock held from the start of the write transaction
//! until its changes are recorded for watchers, so watchers see revisions in order.
//!
//! **Migration.** The previous version kept one table per kind of record (`vms`, `usage`,
//! `usage_buckets`, and one per named table: `users`, `tokens`, `join-tokens`, `meta`), values
//! without revisions. Opening such a file copies every row into the key space (`vms/ID`,
//! `usage/vms/ID`, `usage/buckets/KEY`, `records/TABLE/KEY`) at revision 1 in one write
//! transaction, and deletes the old tables in a second one once the first committed; a crash in
//! between leaves old tables that nothing reads. A file of this layout cannot be opened by the
//! previous version's code any more.

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{ReadableTable, TableDefinition, TableHandle};

use super::history::{History, DEFAULT_KEPT};
use super::local::{apply, InProcess, KvTx, LocalStore};
use super::records::{record_key, usage_key};
use super::vms::vm_key;
use super::{BoxError, Committed, Entry, Listing, Revision, StateError, Txn, UsageTable};

/// The key space: key → `create_revision` (u64 LE), `mod_revision` (u64 LE), value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("state.kv");
/// `revision`, `layout`.
const META: TableDefinition<&str, u64> = TableDefinition::new("state.meta");
const REVISION: &str = "revision";
const LAYOUT: &str = "layout";
/// The layout this code writes.
const LAYOUT_VERSION: u64 = 1;
const HEADER: usize = 16;

macro_rules! backend_err {
    ($($t:ty),*) => {$(impl From<$t> for StateError {
        fn from(e: $t) -> Self { StateError::backend(e) }
    })*};
}
backend_err!(redb::Error, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// The core of [`RedbStore`].
pub struct Redb {
    db: redb::Database,
    writer: Mutex<()>,
    history: Arc<History>,
}

/// The redb store (cheap to clone: clones share the open file).
pub type RedbStore = InProcess<Redb>;

impl InProcess<Redb> {
    /// Opens (or creates) the file, migrating a file of the previous layout.
    pub fn open(path: &Path) -> Result<RedbStore, StateError> {
        RedbStore::open_keeping(path, DEFAULT_KEPT)
    }

    /// [`RedbStore::open`] whose watchers can replay the last `kept` changes.
    pub fn open_keeping(path: &Path, kept: usize) -> Result<RedbStore, StateError> {
        let open_err = |source: BoxError| StateError::Open { path: path.display().to_string(), source };
        let db = redb::Database::create(path).map_err(|e| open_err(e.into()))?;
        let revision = prepare(&db, path).map_err(|e| match e {
            StateError::Backend(e) => open_err(e),
            other => open_err(other.into()),
        })?;
        Ok(InProcess(Arc::new(Redb { db, writer: Mutex::new(()), history: History::new(revision, kept) })))
    }
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + e.value.len());
    b.extend_from_slice(&e.create_revision.to_le_bytes());
    b.extend_from_slice(&e.mod_revision.to_le_bytes());
    b.extend_from_slice(&e.value);
    b
}

/// The create and mod revisions of a stored entry.
fn revisions(key: &str, b: &[u8]) -> Result<(Revision, Revision), StateError> {
    if b.len() < HEADER {
        return Err(StateError::backend(format!("entry {key} is truncated ({} bytes)", b.len())));
    }
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(8)))
}

fn decode_entry(key: &str, b: &[u8]) -> Result<Entry, StateError> {
    let (create_revision, mod_revision) = revisions(key, b)?;
    Ok(Entry { value: b[HEADER..].to_vec(), create_revision, mod_revision })
}

/// The rows under `prefix` of a table, decoded, in key order.
fn rows_under(t: &impl ReadableTable<&'static str, &'static [u8]>, prefix: &str) -> Result<Vec<(String, Entry)>, StateError> {
    let mut out = Vec::new();
    for item in t.range(prefix..)? {
        let (k, v) = item?;
        let k = k.value();
        if !k.starts_with(prefix) {
            break;
        }
        out.push((k.to_string(), decode_entry(k, v.value())?));
    }
    Ok(out)
}

impl KvTx for redb::Table<'_, &'static str, &'static [u8]> {
    fn read(&self, key: &str) -> Result<Option<Entry>, StateError> {
        self.get(key)?.map(|v| decode_entry(key, v.value())).transpose()
    }

    fn first_under(&self, prefix: &str, ok: &dyn Fn(Revision) -> bool) -> Result<Option<(String, Revision)>, StateError> {
        for item in self.range(prefix..)? {
            let (k, v) = item?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            let (_, modified) = revisions(k, v.value())?;
            if !ok(modified) {
                return Ok(Some((k.to_string(), modified)));
            }
        }
        Ok(None)
    }

    fn write(&mut self, key: &str, entry: Entry) -> Result<(), StateError> {
        self.insert(key, encode_entry(&entry).as_slice())?;
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StateError> {
        Ok(redb::Table::remove(self, key)?.is_some())
    }
}

impl LocalStore for Redb {
    const BLOCKING: bool = true;

    fn read(&self, key: &str) -> Result<Option<Entry>, StateError> {
        self.db.begin_read()?.open_table(KV)?.get(key)?.map(|v| decode_entry(key, v.value())).transpose()
    }

    fn scan(&self, prefix: &str) -> Result<Listing, StateError> {
        let tx = self.db.begin_read()?;
        let revision = tx.open_table(META)?.get(REVISION)?.map(|v| v.value()).unwrap_or(0);
        Ok((rows_under(&tx.open_table(KV)?, prefix)?, revision))
    }

    fn commit(&self, txn: &Txn) -> Result<Committed, StateError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.db.begin_write()?;
        let current = tx.open_table(META)?.get(REVISION)?.map(|v| v.value()).unwrap_or(0);
        // On an error the transaction is dropped, which aborts it: nothing is written.
        let (committed, events) = apply(&mut tx.open_table(KV)?, txn, current)?;
        if committed.revision == current {
            tx.abort()?;
            return Ok(committed);
        }
        tx.open_table(META)?.insert(REVISION, committed.revision)?;
        tx.commit()?;
        self.history.record(committed.revision, events);
        Ok(committed)
    }

    fn history(&self) -> &Arc<History> {
        &self.history
    }
}

/// The key an old table's row moves to.
fn migrated_key(table: &str, key: &str) -> String {
    match table {
        "vms" => vm_key(key),
        "usage" => usage_key(UsageTable::Vms, key),
        "usage_buckets" => usage_key(UsageTable::Buckets, key),
        named => record_key(named, key),
    }
}

/// Makes the file's layout this code's (migrating the previous one); its revision.
fn prepare(db: &redb::Database, path: &Path) -> Result<Revision, StateError> {
    let tx = db.begin_write()?;
    let layout = tx.open_table(META)?.get(LAYOUT)?.map(|v| v.value());
    match layout {
        Some(LAYOUT_VERSION) => {
            let revision = tx.open_table(META)?.get(REVISION)?.map(|v| v.value()).unwrap_or(0);
            tx.abort()?;
            return Ok(revision);
        }
        Some(other) => {
            return Err(StateError::backend(format!("layout {other} is not one this version knows ({LAYOUT_VERSION}); use a newer vgrid")));
        }
        None => {}
    }
    let ours = [KV.name(), META.name()];
    let old: Vec<String> = tx.list_tables()?.map(|t| t.name().to_string()).filter(|n| !ours.contains(&n.as_str())).collect();
    let mut rows = 0usize;
    {
        let mut kv = tx.open_table(KV)?;
        let first = Entry { value: Vec::new(), create_revision: 1, mod_revision: 1 };
        for name in &old {
            let table = tx.open_table(TableDefinition::<&str, &[u8]>::new(name))?;
            for item in table.iter()? {
                let (k, v) = item?;
                kv.write(&migrated_key(name, k.value()), Entry { value: v.value().to_vec(), ..first.clone() })?;
                rows += 1;
            }
        }
        let mut meta = tx.open_table(META)?;
        meta.insert(LAYOUT, LAYOUT_VERSION)?;
        meta.insert(REVISION, u64::from(rows > 0))?;
    }
    tx.commit()?;
    if !old.is_empty() {
        let tx = db.begin_write()?;
        for name in &old {
            tx.delete_table(TableDefinition::<&str, &[u8]>::new(name))?;
        }
        tx.commit()?;
        tracing::info!(path = %path.display(), rows, tables = ?old, "state database moved to the revisioned layout");
    }
    Ok(u64::from(rows > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::vms::tests::record;
    use crate::state::{open, StateConfig, StateStore};

    /// Writes a file the way the previous version did: one table per kind, bare values.
    fn write_old_layout(path: &Path, rows: &[(&str, &str, Vec<u8>)]) {
        let db = redb::Database::create(path).unwrap();
        let tx = db.begin_write().unwrap();
        for t in ["vms", "usage", "usage_buckets"] {
            tx.open_table(TableDefinition::<&str, &[u8]>::new(t)).unwrap();
        }
        for (table, key, value) in rows {
            tx.open_table(TableDefinition::<&str, &[u8]>::new(table)).unwrap().insert(*key, value.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }

    #[tokio::test]
    async fn a_file_of_the_previous_layout_is_migrated_once_and_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let vm = record("vm-1", "running");
        write_old_layout(
            &path,
            &[
                ("vms", "vm-1", serde_json::to_vec(&vm).unwrap()),
                ("usage", "vm-1", b"{\"vm\":\"vm-1\"}".to_vec()),
                ("usage_buckets", "vm-1/00000000000000000060", b"{}".to_vec()),
                ("users", "alice", b"{\"name\":\"alice\"}".to_vec()),
                ("tokens", "abc", b"{\"user\":\"alice\"}".to_vec()),
                ("join-tokens", "j1", b"{}".to_vec()),
                ("meta", "realm", b"0123abcd".to_vec()),
            ],
        );
        for round in 0..2 {
            let s = open(&StateConfig::Redb(path.clone())).unwrap();
            let (got, rev) = s.vms().get_vm("vm-1").await.unwrap().unwrap();
            assert_eq!((got.id.as_str(), got.state, rev), ("vm-1", vm.state, 1), "round {round}");
            assert_eq!(s.records().get_record("meta", "realm").await.unwrap().unwrap().value, b"0123abcd");
            assert_eq!(s.records().list_records("users").await.unwrap().0[0].0, "alice");
            assert_eq!(s.records().get_record("join-tokens", "j1").await.unwrap().unwrap().create_revision, 1);
            assert_eq!(s.records().get_record("tokens", "abc").await.unwrap().unwrap().value, b"{\"user\":\"alice\"}");
            assert_eq!(s.usage().scan_usage(UsageTable::Vms, "vm-1").await.unwrap()[0].1.value, b"{\"vm\":\"vm-1\"}");
            assert_eq!(s.usage().scan_usage(UsageTable::Buckets, "vm-1/").await.unwrap().len(), 1);
            // The second opening finds nothing to migrate: the revision moves on from the first.
            assert_eq!(s.store().revision().await.unwrap(), 1 + round, "round {round}");
            s.store().put("records/meta/touched", vec![]).await.unwrap();
        }
        // The old tables are gone.
        let db = redb::Database::create(&path).unwrap();
        let names: Vec<String> = db.begin_read().unwrap().list_tables().unwrap().map(|t| t.name().to_string()).collect();
        assert_eq!(names, ["state.kv", "state.meta"]);
    }

    #[tokio::test]
    async fn a_new_file_starts_at_revision_zero_and_an_unknown_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.revision().await.unwrap(), 0);
        assert!(s.range("").await.unwrap().0.is_empty());
        drop(s);
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert(LAYOUT, 9).unwrap();
        tx.commit().unwrap();
        drop(db);
        let e = RedbStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("layout 9 is not one this version knows"), "{e}");
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_revision_and_old_watch_revisions_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put("a", b"1".to_vec()).await.unwrap();
            s.put("a", b"2".to_vec()).await.unwrap();
            s.put("b", b"3".to_vec()).await.unwrap();
            assert_eq!(s.delete("b").await.unwrap(), Some(4));
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.revision().await.unwrap(), 4);
        let a = s.get("a").await.unwrap().unwrap();
        assert_eq!((a.value.as_slice(), a.create_revision, a.mod_revision), (&b"2"[..], 1, 2));
        assert!(s.get("b").await.unwrap().is_none());
        assert_eq!(s.put("c", vec![]).await.unwrap(), 5);
        // History starts at the opening: revisions before it are gone for watchers.
        assert!(matches!(s.watch("", 4).await.err(), Some(StateError::Compacted { requested: 4, oldest: 5 })));
    }
}
