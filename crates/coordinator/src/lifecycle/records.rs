//! The one write path of VM records: every change of a VM's lifecycle state goes through
//! [`Coordinator::apply`] (an [`Event`] evaluated by the table against the record as stored, then
//! a compare-and-swap write); fields the table does not know (a migration's figures) are written
//! beside an event by `Coordinator::transact`, never touching `state` or `phase`. A write
//! re-reads and re-evaluates on a conflict, a bounded number of times. The record's claims
//! (see [`super::claims`]) are written in the same batch as the record.

use std::time::Duration;

use futures::StreamExt;
use vgrid_api::vm::{VmRecord, VmState};

use super::claims;
use super::guard::Admit;
use super::table::{self, Event, TransitionError};
use crate::lifecycle::{now, Coordinator, CoordinatorError};
use crate::state::vms::vm_key;
use crate::state::{Expect, Revision, StateError};

/// How many times a write re-reads and re-evaluates after losing a compare-and-swap race.
pub(crate) const CAS_RETRIES: usize = 32;

/// What a write did to a record.
pub(crate) struct Written {
    pub rec: VmRecord,
    /// Its state before the write.
    pub from: VmState,
}

fn same(a: &VmRecord, b: &VmRecord) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

impl Coordinator {
    /// The record of VM `id`, if there is one.
    pub(crate) async fn record(&self, id: &str) -> Result<Option<VmRecord>, StateError> {
        Ok(self.vms.get_vm(id).await?.map(|(v, _)| v))
    }

    /// Every VM record, in id order.
    pub(crate) async fn records(&self) -> Result<Vec<VmRecord>, StateError> {
        Ok(self.vms.list_vms().await?.0.into_iter().map(|(v, _)| v).collect())
    }

    /// Moves VM `id` by `event`: reads the record and its revision, asks the lifecycle table
    /// what the event does in the record's state, writes the change with compare-and-swap, and
    /// on a conflict reads again and re-evaluates (bounded). An event the table refuses in the
    /// record's state is an error naming both (logged at warn with the VM id); an event that
    /// changes nothing writes nothing. Returns the record as written (or as found).
    pub async fn apply(&self, id: &str, event: Event) -> Result<VmRecord, CoordinatorError> {
        Ok(self.transact(id, |_| Some(event.clone()), |_| {}, None).await?.rec)
    }

    /// [`Coordinator::apply`] with an event chosen from the record as read (each retry chooses
    /// again; `None`: no event, only the fields), `fields` written first in the same write
    /// (figures the table does not know: a migration's; they must not touch `state` or
    /// `phase`), and `admit`'s checks when the event admits the VM somewhere (placed, resumed,
    /// migrating to a host).
    pub(crate) async fn transact(
        &self,
        id: &str,
        event: impl Fn(&VmRecord) -> Option<Event>,
        fields: impl Fn(&mut VmRecord),
        admit: Option<&Admit>,
    ) -> Result<Written, CoordinatorError> {
        let refused = |from: VmState, e: TransitionError| {
            tracing::warn!(vm = %id, state = from.as_str(), event = e.event, "refused: {e}");
            CoordinatorError::Transition { id: id.to_string(), source: e }
        };
        let change = |rec: &mut VmRecord| {
            let from = rec.state;
            let ev = event(rec);
            fields_only(rec, &fields)?;
            if let Some(ev) = ev {
                table::advance(rec, &ev, now()).map_err(|e| refused(from, e))?;
            }
            Ok(())
        };
        self.cas(id, change, admit).await
    }

    /// The compare-and-swap loop: read, change, write if changed (checked by `admit` when it
    /// admits the VM somewhere), retry on a conflict.
    pub(crate) async fn cas(
        &self,
        id: &str,
        change: impl Fn(&mut VmRecord) -> Result<(), CoordinatorError>,
        admit: Option<&Admit>,
    ) -> Result<Written, CoordinatorError> {
        for _ in 0..CAS_RETRIES {
            let Some((before, rev)) = self.vms.get_vm(id).await? else {
                return Err(CoordinatorError::UnknownVm(id.to_string()));
            };
            let from = before.state;
            let mut rec = before.clone();
            change(&mut rec)?;
            if same(&before, &rec) {
                return Ok(Written { rec, from });
            }
            if self.try_commit(Some((&before, rev)), Some(&rec), admit).await? {
                self.written(&before, Some(&rec)).await;
                return Ok(Written { rec, from });
            }
            tokio::task::yield_now().await;
        }
        Err(CoordinatorError::Contended(id.to_string()))
    }

    /// Deletes VM `id`'s record (and its claims), whatever its revision now.
    pub(crate) async fn delete_record(&self, id: &str) -> Result<Option<VmRecord>, CoordinatorError> {
        for _ in 0..CAS_RETRIES {
            let Some((before, rev)) = self.vms.get_vm(id).await? else { return Ok(None) };
            if self.try_commit(Some((&before, rev)), None, None).await? {
                self.written(&before, None).await;
                return Ok(Some(before));
            }
            tokio::task::yield_now().await;
        }
        Err(CoordinatorError::Contended(id.to_string()))
    }

    /// One write of `new` (`None`: a delete) over `old` read at its revision (`None`: a new
    /// record), with the claims' difference and, when it admits the VM somewhere, `admit`'s
    /// checks and their conditions, in one batch. `Ok(false)`: a condition failed (another
    /// writer came first): read again and retry. A unique claim held by another VM is refused.
    pub(crate) async fn try_commit(
        &self,
        old: Option<(&VmRecord, Revision)>,
        new: Option<&VmRecord>,
        admit: Option<&Admit>,
    ) -> Result<bool, CoordinatorError> {
        let conditions = match (new, admit) {
            (Some(n), Some(a)) => self.guard(old.map(|o| o.0), n, a).await?,
            _ => crate::state::Txn::new(),
        };
        match self.state.store().batch(claims::txn(old, new, conditions)).await {
            Ok(_) => Ok(true),
            Err(StateError::Conflict { key, expected: Expect::Absent, .. }) if key.starts_with(claims::CLAIMS) => {
                Err(self.refusal(&key).await)
            }
            Err(StateError::Conflict { key, expected: Expect::Absent, .. }) if crate::drain::drained_host(&key).is_some() => {
                // Drained through another coordinator, whose word has not reached this
                // scheduler yet: out of its service now, and placed elsewhere.
                let host = crate::drain::drained_host(&key).unwrap_or_default();
                self.sched.set_draining(host, true);
                Err(CoordinatorError::Capacity(format!("host {host} is draining: it takes no new VMs")))
            }
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// What follows a write: hosts whose capacity claims it gave up are free again for this
    /// scheduler (queued requests may fit now).
    pub(crate) async fn written(&self, before: &VmRecord, after: Option<&VmRecord>) {
        for h in claims::hosts_freed(before, after) {
            self.refresh_host(&h).await;
        }
    }

    /// Waits up to `wait` while VM `id`'s record is as `seen` says (and exists): wakes at
    /// every change of it in the store, whoever wrote it.
    pub async fn wait_while(&self, id: &str, wait: Duration, seen: impl Fn(&VmRecord) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        let store = self.state.store();
        let key = vm_key(id);
        let Ok(at) = store.revision().await else { return };
        let Ok(mut changes) = store.watch(&key, at + 1).await else { return };
        loop {
            match self.record(id).await {
                Ok(Some(r)) if seen(&r) => {}
                _ => return,
            }
            match tokio::time::timeout_at(deadline, changes.next()).await {
                Ok(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }
}

/// Runs `f` on `rec`; an error if it changed the lifecycle state (only the table does).
fn fields_only(rec: &mut VmRecord, f: &impl Fn(&mut VmRecord)) -> Result<(), CoordinatorError> {
    let (state, phase, since) = (rec.state, rec.phase.clone(), rec.state_since);
    f(rec);
    if rec.state != state || rec.phase != phase || rec.state_since != since {
        return Err(CoordinatorError::Conflict(format!("VM {}: a field update may not change its state", rec.id)));
    }
    Ok(())
}
