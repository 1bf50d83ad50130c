//! The coordinator's other tables: named records (users, login tokens, join tokens, the realm:
//! `records/TABLE/KEY`) and accounting rows (`usage/vms/ID`, `usage/buckets/ID/START`).

use std::sync::Arc;

use super::{Entry, Expect, Listing, Op, Revision, StateError, StateStore, Txn};

/// The prefix of named records.
pub const RECORDS: &str = "records/";

/// The accounting tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageTable {
    /// Key: VM id.
    Vms,
    /// Key: `VMID/START` (START: zero-padded seconds since the epoch).
    Buckets,
}

impl UsageTable {
    /// The prefix of the table's keys.
    pub fn prefix(self) -> &'static str {
        match self {
            UsageTable::Vms => "usage/vms/",
            UsageTable::Buckets => "usage/buckets/",
        }
    }
}

/// The store key of `key` in accounting table `table`.
pub fn usage_key(table: UsageTable, key: &str) -> String {
    format!("{}{key}", table.prefix())
}

/// The prefix of named table `table` (a name without `/`: `users`, `tokens`, ...).
pub fn record_prefix(table: &str) -> String {
    debug_assert!(!table.contains('/'), "table name {table:?}");
    format!("{RECORDS}{table}/")
}

/// The store key of `key` in named table `table`.
pub fn record_key(table: &str, key: &str) -> String {
    format!("{}{key}", record_prefix(table))
}

/// Strips `prefix` from the keys of `rows`.
fn relative(prefix: &str, rows: Vec<(String, Entry)>) -> Vec<(String, Entry)> {
    rows.into_iter().map(|(k, e)| (k[prefix.len()..].to_string(), e)).collect()
}

/// Named records: values by key in a named table, with revisions.
#[derive(Clone)]
pub struct RecordStore {
    store: Arc<dyn StateStore>,
}

impl RecordStore {
    pub fn new(store: Arc<dyn StateStore>) -> RecordStore {
        RecordStore { store }
    }

    pub async fn get_record(&self, table: &str, key: &str) -> Result<Option<Entry>, StateError> {
        self.store.get(&record_key(table, key)).await
    }

    /// The table's records (keys within the table, in order) and the revision read at.
    pub async fn list_records(&self, table: &str) -> Result<Listing, StateError> {
        let prefix = record_prefix(table);
        let (rows, at) = self.store.range(&prefix).await?;
        Ok((relative(&prefix, rows), at))
    }

    pub async fn put_record(&self, table: &str, key: &str, value: Vec<u8>) -> Result<Revision, StateError> {
        self.store.put(&record_key(table, key), value).await
    }

    /// Writes the record if it meets `expect`, else [`StateError::Conflict`].
    pub async fn put_record_if(&self, table: &str, key: &str, value: Vec<u8>, expect: Expect) -> Result<Revision, StateError> {
        self.store.put_if(&record_key(table, key), value, expect).await
    }

    /// Whether there was such a record.
    pub async fn delete_record(&self, table: &str, key: &str) -> Result<bool, StateError> {
        Ok(self.store.delete(&record_key(table, key)).await?.is_some())
    }

    pub async fn delete_record_if(&self, table: &str, key: &str, expect: Expect) -> Result<Revision, StateError> {
        self.store.delete_if(&record_key(table, key), expect).await
    }

    /// The op writing a record, for a [`Txn`] that spans records.
    pub fn put_op(table: &str, key: &str, value: Vec<u8>) -> Op {
        Op::Put { key: record_key(table, key), value }
    }
}

/// Accounting rows.
#[derive(Clone)]
pub struct UsageStore {
    store: Arc<dyn StateStore>,
}

impl UsageStore {
    pub fn new(store: Arc<dyn StateStore>) -> UsageStore {
        UsageStore { store }
    }

    /// Writes the rows in one transaction.
    pub async fn put_usage(&self, rows: Vec<(UsageTable, String, Vec<u8>)>) -> Result<Revision, StateError> {
        let txn = rows.into_iter().fold(Txn::new(), |t, (table, key, value)| t.op(UsageStore::put_op(table, &key, value)));
        Ok(self.store.batch(txn).await?.revision)
    }

    /// The rows of `table` whose key starts with `prefix`, in key order (keys within the table).
    pub async fn scan_usage(&self, table: UsageTable, prefix: &str) -> Result<Vec<(String, Entry)>, StateError> {
        let (rows, _) = self.store.range(&usage_key(table, prefix)).await?;
        Ok(relative(table.prefix(), rows))
    }

    /// The op writing a row, for a [`Txn`] that spans records.
    pub fn put_op(table: UsageTable, key: &str, value: Vec<u8>) -> Op {
        Op::Put { key: usage_key(table, key), value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{open, StateConfig};

    #[tokio::test]
    async fn tables_are_prefixes_that_do_not_see_each_other() {
        let s = open(&StateConfig::Memory).unwrap();
        let (rec, usage) = (s.records(), s.usage());
        rec.put_record("users", "alice", b"a".to_vec()).await.unwrap();
        rec.put_record("users-old", "bob", b"b".to_vec()).await.unwrap();
        rec.put_record("tokens", "t1", b"t".to_vec()).await.unwrap();
        let (users, _) = rec.list_records("users").await.unwrap();
        assert_eq!(users.iter().map(|(k, e)| (k.as_str(), e.value.as_slice())).collect::<Vec<_>>(), [("alice", &b"a"[..])]);
        assert_eq!(rec.get_record("tokens", "t1").await.unwrap().unwrap().value, b"t");
        assert!(rec.get_record("nonesuch", "t1").await.unwrap().is_none());
        let r = rec.get_record("users", "alice").await.unwrap().unwrap().mod_revision;
        assert!(rec.put_record_if("users", "alice", b"x".to_vec(), Expect::Absent).await.unwrap_err().is_conflict());
        rec.put_record_if("users", "alice", b"x".to_vec(), Expect::ModRevision(r)).await.unwrap();
        assert!(rec.delete_record_if("users", "alice", Expect::ModRevision(r)).await.unwrap_err().is_conflict());
        assert!(rec.delete_record("users", "alice").await.unwrap());
        assert!(!rec.delete_record("users", "alice").await.unwrap());

        usage
            .put_usage(vec![
                (UsageTable::Vms, "vm-1".into(), b"1".to_vec()),
                (UsageTable::Vms, "vm-10".into(), b"10".to_vec()),
                (UsageTable::Buckets, "vm-1/00000000000000000060".into(), b"b".to_vec()),
            ])
            .await
            .unwrap();
        let vms = usage.scan_usage(UsageTable::Vms, "").await.unwrap();
        assert_eq!(vms.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["vm-1", "vm-10"]);
        // One batch: one revision.
        assert_eq!(vms[0].1.mod_revision, vms[1].1.mod_revision);
        let b = usage.scan_usage(UsageTable::Buckets, "vm-1/").await.unwrap();
        assert_eq!(b[0].0, "vm-1/00000000000000000060");
        assert!(usage.scan_usage(UsageTable::Buckets, "vm-10/").await.unwrap().is_empty());
    }
}
