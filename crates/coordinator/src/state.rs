//! Durable coordinator state: VM records in an embedded redb file.
//!
//! Kept behind [`StateStore`] so that a shared etcd backend can replace it when several
//! coordinators share the load.

use std::path::Path;

use redb::ReadableTable;
use vgrid_api::vm::VmRecord;

const VMS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("vms");
/// Accounting: per-VM totals, and per-VM time buckets (see `accounting.rs`).
const USAGE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("usage");
const USAGE_BUCKETS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("usage_buckets");

/// The accounting tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageTable {
    /// Key: VM id.
    Vms,
    /// Key: `VMID/START` (START: zero-padded seconds since the epoch).
    Buckets,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {cause}")]
    Open { path: String, cause: String },
    #[error("state database: {0}")]
    Db(String),
    #[error("state record of VM {id} is unreadable: {cause}")]
    Corrupt { id: String, cause: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for StateError {
        fn from(e: $t) -> Self { StateError::Db(e.to_string()) }
    })*};
}
db_err!(redb::Error, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// What the coordinator needs from a state backend.
pub trait StateStore: Send + Sync {
    fn put_vm(&self, vm: &VmRecord) -> Result<(), StateError>;
    fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StateError>;
    fn list_vms(&self) -> Result<Vec<VmRecord>, StateError>;
    fn delete_vm(&self, id: &str) -> Result<bool, StateError>;

    /// Other records (users, tokens, ...): JSON values by key in a named table.
    fn put_record(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StateError>;
    fn get_record(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    fn list_records(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StateError>;
    fn delete_record(&self, table: &str, key: &str) -> Result<bool, StateError>;
    /// Accounting rows written in one transaction.
    fn put_usage(&self, rows: &[(UsageTable, String, Vec<u8>)]) -> Result<(), StateError>;
    /// Accounting rows whose key starts with `prefix`, in key order.
    fn scan_usage(&self, table: UsageTable, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError>;
}

fn records(table: &str) -> redb::TableDefinition<'_, &'static str, &'static [u8]> {
    redb::TableDefinition::new(table)
}

fn usage_def(t: UsageTable) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    match t {
        UsageTable::Vms => USAGE,
        UsageTable::Buckets => USAGE_BUCKETS,
    }
}

/// The default backend: one redb file under the data directory.
pub struct RedbState {
    db: redb::Database,
}

impl RedbState {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = redb::Database::create(path).map_err(|e| StateError::Open { path: path.display().to_string(), cause: e.to_string() })?;
        let tx = db.begin_write()?;
        tx.open_table(VMS)?;
        tx.open_table(USAGE)?;
        tx.open_table(USAGE_BUCKETS)?;
        tx.commit()?;
        Ok(RedbState { db })
    }
}

impl StateStore for RedbState {
    fn put_vm(&self, vm: &VmRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(vm).map_err(|e| StateError::Db(e.to_string()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(VMS)?.insert(vm.id.as_str(), bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StateError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VMS)?;
        let Some(v) = table.get(id)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(|e| StateError::Corrupt { id: id.to_string(), cause: e.to_string() })
    }

    fn list_vms(&self) -> Result<Vec<VmRecord>, StateError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VMS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let rec =
                serde_json::from_slice(v.value()).map_err(|e| StateError::Corrupt { id: k.value().to_string(), cause: e.to_string() })?;
            out.push(rec);
        }
        Ok(out)
    }

    fn delete_vm(&self, id: &str) -> Result<bool, StateError> {
        let tx = self.db.begin_write()?;
        let existed = tx.open_table(VMS)?.remove(id)?.is_some();
        tx.commit()?;
        Ok(existed)
    }

    fn put_record(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StateError> {
        let tx = self.db.begin_write()?;
        tx.open_table(records(table))?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    fn get_record(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(records(table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list_records(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(records(table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn delete_record(&self, table: &str, key: &str) -> Result<bool, StateError> {
        let tx = self.db.begin_write()?;
        let existed = tx.open_table(records(table))?.remove(key)?.is_some();
        tx.commit()?;
        Ok(existed)
    }

    fn put_usage(&self, rows: &[(UsageTable, String, Vec<u8>)]) -> Result<(), StateError> {
        let tx = self.db.begin_write()?;
        for (t, k, v) in rows {
            tx.open_table(usage_def(*t))?.insert(k.as_str(), v.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn scan_usage(&self, table: UsageTable, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(usage_def(table))?;
        let mut out = Vec::new();
        for entry in t.range(prefix..)? {
            let (k, v) = entry?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgrid_api::vm::VmState;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let config = vgrid_api::vm::VmConfig::new(vgrid_api::ImageRef { name: "sample".into(), version: Some(1) }).with_memory_mib(128);
        let mut rec = VmRecord::new("vm-1", "a", "alice", config, 1);
        rec.state = VmState::Running;
        {
            let s = RedbState::open(&path).unwrap();
            s.put_vm(&rec).unwrap();
        }
        let s = RedbState::open(&path).unwrap();
        assert_eq!(s.get_vm("vm-1").unwrap().unwrap().state, VmState::Running);
        assert_eq!(s.list_vms().unwrap().len(), 1);
        assert!(s.delete_vm("vm-1").unwrap());
        assert!(s.get_vm("vm-1").unwrap().is_none());
    }
}
