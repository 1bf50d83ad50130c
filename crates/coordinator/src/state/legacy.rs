//! The synchronous view of the state that the coordinator used before the async
//! [`StateStore`](super::StateStore) (no revisions, no conditions), served by the in-process
//! backends from the same keys, revisions and watches as the async store. It goes away once
//! every caller uses the async store and its typed layer.

use vgrid_api::vm::VmRecord;

use super::local::{InProcess, LocalStore};
use super::records::{record_key, record_prefix, usage_key};
use super::vms::{vm_key, VMS};
use super::{decode, encode, StateError, Txn, UsageTable};

/// What the coordinator needs from a state backend, synchronously.
pub trait LegacyStore: Send + Sync {
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

/// The values under `prefix`, keys relative to it.
fn scan_relative<B: LocalStore>(b: &B, scan: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
    Ok(b.scan(scan)?.0.into_iter().map(|(k, e)| (k[prefix.len()..].to_string(), e.value)).collect())
}

impl<B: LocalStore> LegacyStore for InProcess<B> {
    fn put_vm(&self, vm: &VmRecord) -> Result<(), StateError> {
        self.core().commit(&Txn::new().put(vm_key(&vm.id), encode(vm)))?;
        Ok(())
    }

    fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StateError> {
        let key = vm_key(id);
        self.core().read(&key)?.map(|e| decode(&key, &e.value)).transpose()
    }

    fn list_vms(&self) -> Result<Vec<VmRecord>, StateError> {
        self.core().scan(VMS)?.0.iter().map(|(k, e)| decode(k, &e.value)).collect()
    }

    fn delete_vm(&self, id: &str) -> Result<bool, StateError> {
        Ok(self.core().commit(&Txn::new().delete(vm_key(id)))?.deleted > 0)
    }

    fn put_record(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.core().commit(&Txn::new().put(record_key(table, key), value.to_vec()))?;
        Ok(())
    }

    fn get_record(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.core().read(&record_key(table, key))?.map(|e| e.value))
    }

    fn list_records(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let prefix = record_prefix(table);
        scan_relative(self.core(), &prefix, &prefix)
    }

    fn delete_record(&self, table: &str, key: &str) -> Result<bool, StateError> {
        Ok(self.core().commit(&Txn::new().delete(record_key(table, key)))?.deleted > 0)
    }

    fn put_usage(&self, rows: &[(UsageTable, String, Vec<u8>)]) -> Result<(), StateError> {
        let txn = rows.iter().fold(Txn::new(), |t, (table, key, value)| t.put(usage_key(*table, key), value.clone()));
        self.core().commit(&txn)?;
        Ok(())
    }

    fn scan_usage(&self, table: UsageTable, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        scan_relative(self.core(), &usage_key(table, prefix), table.prefix())
    }
}

#[cfg(test)]
mod tests {
    use crate::state::vms::tests::record;
    use crate::state::{open, StateConfig};
    use vgrid_api::vm::VmState;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let rec = record("vm-1", "running");
        {
            let s = open(&StateConfig::Redb(path.clone())).unwrap().legacy();
            s.put_vm(&rec).unwrap();
        }
        let s = open(&StateConfig::Redb(path)).unwrap().legacy();
        assert_eq!(s.get_vm("vm-1").unwrap().unwrap().state, VmState::Running);
        assert_eq!(s.list_vms().unwrap().len(), 1);
        assert!(s.delete_vm("vm-1").unwrap());
        assert!(s.get_vm("vm-1").unwrap().is_none());
    }

    #[tokio::test]
    async fn the_legacy_view_and_the_async_store_share_keys_and_revisions() {
        let s = open(&StateConfig::Memory).unwrap();
        let legacy = s.legacy();
        legacy.put_vm(&record("vm-1", "running")).unwrap();
        let (v, rev) = s.vms().get_vm("vm-1").await.unwrap().unwrap();
        assert_eq!((v.state, rev), (VmState::Running, 1));
        s.records().put_record("users", "alice", b"{}".to_vec()).await.unwrap();
        assert_eq!(legacy.list_records("users").unwrap(), [("alice".to_string(), b"{}".to_vec())]);
        assert_eq!(s.store().revision().await.unwrap(), 2);
    }
}
