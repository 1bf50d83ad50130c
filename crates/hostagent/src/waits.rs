//! Guests stalled on unreachable image servers: the block proxy's reads waiting for a server
//! (`vgrid_blockproxy::BlockProxy::waiting`, see its `wait.rs`), as the host reports them per
//! VM in its heartbeat; the coordinator shows them as the VM's phase. The proxy's log says
//! which chunk waits and when it goes on.

use std::collections::{BTreeMap, BTreeSet};

use vgrid_api::host::VmWaiting;

use crate::ctx::HostCtx;

/// The VMs of this host whose reads wait for image servers now, in id order: each VM reading
/// an image version (its disk, or its lazily restored RAM) that has chunks waiting.
pub fn vms_waiting(ctx: &HostCtx) -> Vec<VmWaiting> {
    let waits = ctx.proxy.waiting();
    if waits.is_empty() {
        return Vec::new();
    }
    // Per image version: the servers that failed, the chunks waiting, the longest wait.
    let mut images: BTreeMap<String, (BTreeSet<String>, u32, u64)> = BTreeMap::new();
    for w in waits {
        let e = images.entry(w.image).or_default();
        e.0.extend(w.servers);
        e.1 += 1;
        e.2 = e.2.max(w.waiting_ms / 1000);
    }
    let mut vms: Vec<(String, String)> = ctx
        .vms
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(id, vm)| Some((id.clone(), crate::overlay::export_of(&vm.spec().disk)?.to_string())))
        .collect();
    vms.sort();
    vms.into_iter()
        .filter_map(|(vm, image)| {
            let (servers, chunks, waiting_secs) = images.get(&image)?.clone();
            Some(VmWaiting { vm, image, servers: servers.into_iter().collect(), chunks, waiting_secs })
        })
        .collect()
}
