//! VM records in the store: one JSON [`VmRecord`] per key `vms/ID`, each with its revision for
//! compare-and-swap. This layer knows the record is a serde type, not its fields.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use vgrid_api::vm::VmRecord;

use super::{decode, encode, EventKind, Expect, Op, Revision, StateError, StateStore};

/// The prefix of VM records.
pub const VMS: &str = "vms/";

/// The key of VM `id`'s record.
pub fn vm_key(id: &str) -> String {
    format!("{VMS}{id}")
}

/// A change of a VM record seen by a watcher.
#[derive(Debug, Clone)]
pub enum VmChange {
    /// Created or changed, at this revision.
    Put(Box<VmRecord>, Revision),
    /// Deleted (its id) at this revision.
    Deleted(String, Revision),
}

/// The VM records of a store.
#[derive(Clone)]
pub struct VmStore {
    store: Arc<dyn StateStore>,
}

impl VmStore {
    pub fn new(store: Arc<dyn StateStore>) -> VmStore {
        VmStore { store }
    }

    /// The record of VM `id` and the revision it was last written at.
    pub async fn get_vm(&self, id: &str) -> Result<Option<(VmRecord, Revision)>, StateError> {
        let key = vm_key(id);
        match self.store.get(&key).await? {
            Some(e) => Ok(Some((decode(&key, &e.value)?, e.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every record (in id order) with its revision, and the revision they were read at.
    pub async fn list_vms(&self) -> Result<(Vec<(VmRecord, Revision)>, Revision), StateError> {
        let (rows, at) = self.store.range(VMS).await?;
        let vms = rows.into_iter().map(|(k, e)| Ok((decode(&k, &e.value)?, e.mod_revision))).collect::<Result<_, StateError>>()?;
        Ok((vms, at))
    }

    /// Writes `vm` whatever is stored; the revision of the write.
    pub async fn put_vm(&self, vm: &VmRecord) -> Result<Revision, StateError> {
        self.store.put(&vm_key(&vm.id), encode(vm)).await
    }

    /// Writes `vm` if its stored record meets `expect` (`Expect::Absent` to create,
    /// `Expect::ModRevision(r)` to replace the record read at `r`), else
    /// [`StateError::Conflict`].
    pub async fn put_vm_if(&self, vm: &VmRecord, expect: Expect) -> Result<Revision, StateError> {
        self.store.put_if(&vm_key(&vm.id), encode(vm), expect).await
    }

    /// Deletes VM `id`'s record; whether there was one.
    pub async fn delete_vm(&self, id: &str) -> Result<bool, StateError> {
        Ok(self.store.delete(&vm_key(id)).await?.is_some())
    }

    /// Deletes VM `id`'s record if it meets `expect`.
    pub async fn delete_vm_if(&self, id: &str, expect: Expect) -> Result<Revision, StateError> {
        self.store.delete_if(&vm_key(id), expect).await
    }

    /// The op writing `vm`, for a [`super::Txn`] that spans records.
    pub fn put_op(vm: &VmRecord) -> Op {
        Op::Put { key: vm_key(&vm.id), value: encode(vm) }
    }

    /// Changes of VM records from revision `from` on (see [`StateStore::watch`]).
    pub async fn watch_vms(&self, from: Revision) -> Result<BoxStream<'static, Result<VmChange, StateError>>, StateError> {
        let events = self.store.watch(VMS, from).await?;
        Ok(events
            .map(|e| {
                let e = e?;
                Ok(match e.kind {
                    EventKind::Put => VmChange::Put(Box::new(decode(&e.key, &e.value)?), e.mod_revision),
                    EventKind::Delete => VmChange::Deleted(e.key[VMS.len()..].to_string(), e.mod_revision),
                })
            })
            .boxed())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{open, StateConfig, Txn, UsageStore, UsageTable};
    use vgrid_api::vm::VmState;

    /// A record for tests, from the JSON a stored record has (a literal of the record's fields
    /// would change with them).
    pub(crate) fn record(id: &str, state: &str) -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("name-{id}"), "owner": "alice", "image": "sample", "image_version": 1,
            "cpus": 1, "memory_mib": 128, "forwards": [], "state": state, "host": null, "created": 1
        }))
        .expect("a record of the stored format")
    }

    #[tokio::test]
    async fn vm_records_carry_revisions_and_swap_only_from_the_revision_read() {
        let s = open(&StateConfig::Memory).unwrap();
        let vms = s.vms();
        let mut a = record("vm-1", "pending");
        let r1 = vms.put_vm_if(&a, Expect::Absent).await.unwrap();
        assert!(vms.put_vm_if(&a, Expect::Absent).await.unwrap_err().is_conflict());
        let (got, rev) = vms.get_vm("vm-1").await.unwrap().unwrap();
        assert_eq!((got.state, rev), (VmState::Pending, r1));
        a.state = VmState::Running;
        let r2 = vms.put_vm_if(&a, Expect::ModRevision(r1)).await.unwrap();
        // A writer that read at r1 loses.
        let e = vms.put_vm_if(&a, Expect::ModRevision(r1)).await.unwrap_err();
        assert!(matches!(e, StateError::Conflict { found: Some(f), .. } if f == r2), "{e}");
        vms.put_vm(&record("vm-0", "stopped")).await.unwrap();
        let (all, at) = vms.list_vms().await.unwrap();
        assert_eq!(all.iter().map(|(v, _)| v.id.as_str()).collect::<Vec<_>>(), ["vm-0", "vm-1"]);
        assert_eq!(at, r2 + 1);
        assert!(vms.delete_vm_if("vm-1", Expect::ModRevision(r1)).await.unwrap_err().is_conflict());
        assert!(vms.delete_vm("vm-1").await.unwrap());
        assert!(!vms.delete_vm("vm-1").await.unwrap());
        assert!(vms.get_vm("vm-1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_vm_and_its_usage_change_in_one_batch_and_watchers_see_typed_changes() {
        let s = open(&StateConfig::Memory).unwrap();
        let (vms, usage) = (s.vms(), s.usage());
        let at = s.store().revision().await.unwrap();
        let mut w = vms.watch_vms(at + 1).await.unwrap();
        let a = record("vm-1", "running");
        let txn = Txn::new().when_unchanged_since(super::VMS, at).op(VmStore::put_op(&a)).op(UsageStore::put_op(
            UsageTable::Vms,
            "vm-1",
            b"{}".to_vec(),
        ));
        let c = s.store().batch(txn).await.unwrap();
        assert_eq!(usage.scan_usage(UsageTable::Vms, "").await.unwrap()[0].1.mod_revision, c.revision);
        vms.delete_vm("vm-1").await.unwrap();
        match w.next().await.unwrap().unwrap() {
            VmChange::Put(v, r) => assert_eq!((v.id.as_str(), r), ("vm-1", c.revision)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(w.next().await.unwrap().unwrap(), VmChange::Deleted(id, r) if id == "vm-1" && r == c.revision + 1));
        // A corrupt record names its key.
        s.store().put("vms/vm-2", b"{".to_vec()).await.unwrap();
        let e = vms.get_vm("vm-2").await.unwrap_err();
        assert!(e.to_string().contains("state record vms/vm-2 is unreadable"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let rec = record("vm-1", "running");
        {
            let s = open(&StateConfig::Redb(path.clone())).unwrap().vms();
            s.put_vm(&rec).await.unwrap();
        }
        let s = open(&StateConfig::Redb(path)).unwrap().vms();
        assert_eq!(s.get_vm("vm-1").await.unwrap().unwrap().0.state, VmState::Running);
        assert_eq!(s.list_vms().await.unwrap().0.len(), 1);
        assert!(s.delete_vm("vm-1").await.unwrap());
        assert!(s.get_vm("vm-1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_typed_tables_share_keys_and_revisions() {
        let s = open(&StateConfig::Memory).unwrap();
        s.vms().put_vm(&record("vm-1", "running")).await.unwrap();
        let (v, rev) = s.vms().get_vm("vm-1").await.unwrap().unwrap();
        assert_eq!((v.state, rev), (VmState::Running, 1));
        s.records().put_record("users", "alice", b"{}".to_vec()).await.unwrap();
        let (users, at) = s.clone().records().list_records("users").await.unwrap();
        assert_eq!(users.iter().map(|(k, e)| (k.as_str(), e.value.as_slice())).collect::<Vec<_>>(), [("alice", &b"{}"[..])]);
        assert_eq!((at, s.store().revision().await.unwrap()), (2, 2));
    }
}
