//! The in-memory backend: an ordered map with revisions and a watch history, gone with the
//! process. For tests and for state that needs no durability.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::history::{History, DEFAULT_KEPT};
use super::local::{apply, InProcess, KvTx, LocalStore};
use super::{Committed, Entry, Listing, Revision, StateError, Txn};

struct Tables {
    map: BTreeMap<String, Entry>,
    revision: Revision,
}

/// The core of [`MemoryStore`].
pub struct Memory {
    tables: Mutex<Tables>,
    history: Arc<History>,
}

/// The in-memory store (cheap to clone: clones share it).
pub type MemoryStore = InProcess<Memory>;

impl InProcess<Memory> {
    pub fn new() -> MemoryStore {
        MemoryStore::keeping(DEFAULT_KEPT)
    }

    /// A store whose watchers can replay the last `kept` changes.
    pub fn keeping(kept: usize) -> MemoryStore {
        let tables = Mutex::new(Tables { map: BTreeMap::new(), revision: 0 });
        InProcess(Arc::new(Memory { tables, history: History::new(0, kept) }))
    }
}

impl Default for InProcess<Memory> {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvTx for BTreeMap<String, Entry> {
    fn read(&self, key: &str) -> Result<Option<Entry>, StateError> {
        Ok(self.get(key).cloned())
    }

    fn first_under(&self, prefix: &str, ok: &dyn Fn(Revision) -> bool) -> Result<Option<(String, Revision)>, StateError> {
        Ok(self
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .find(|(_, e)| !ok(e.mod_revision))
            .map(|(k, e)| (k.clone(), e.mod_revision)))
    }

    fn write(&mut self, key: &str, entry: Entry) -> Result<(), StateError> {
        self.insert(key.to_string(), entry);
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StateError> {
        Ok(BTreeMap::remove(self, key).is_some())
    }
}

impl LocalStore for Memory {
    const BLOCKING: bool = false;

    fn read(&self, key: &str) -> Result<Option<Entry>, StateError> {
        Ok(self.lock().map.get(key).cloned())
    }

    fn scan(&self, prefix: &str) -> Result<Listing, StateError> {
        let t = self.lock();
        let rows = t.map.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, e)| (k.clone(), e.clone()));
        Ok((rows.collect(), t.revision))
    }

    fn commit(&self, txn: &Txn) -> Result<Committed, StateError> {
        let mut t = self.lock();
        // `apply` checks every condition before it writes, and a map write cannot fail: an
        // error leaves the map as it was.
        let current = t.revision;
        let (committed, events) = apply(&mut t.map, txn, current)?;
        if committed.revision != current {
            t.revision = committed.revision;
            self.history.record(committed.revision, events);
        }
        Ok(committed)
    }

    fn history(&self) -> &Arc<History> {
        &self.history
    }
}
