//! What a simulated host (`common::sim`) does when a VM moves: suspend and snapshot (its state
//! uploaded to an image server as a warm image, the manifest committed with its parent, as a
//! real agent's save does), restore (a launch of a saved image reads the state back from an
//! image server and checks it is this VM's), and both ends of a live migration (the
//! destination admits the VM and listens on two ports; the source sends a disk and a memory
//! stream there, reports its progress as a real source does, and stays paused once done until
//! it is removed; the destination takes over only when both streams arrived and name the VM).
//! Answers and status codes are the real agent's (`crates/hostagent/src/http`).
#![allow(dead_code)]

use super::sim::Sim;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vgrid_api::host::{FinishRequest, IncomingReady, IncomingRequest, Launched, SaveRequest, SendRequest};
use vgrid_api::migrate::{Migration, MigrationStatus};
use vgrid_api::vm::{Accel, SavedImage};
use vgrid_api::{Blob, ChunkHash, ImageRef, Manifest, SavedState, StateMeta};

/// The QEMU version simulated hosts advertise and record in saved states.
pub const QEMU_VERSION: &str = "10.0.0";
/// Bytes of a simulated VM's saved state (one chunk).
const STATE_BYTES: usize = 16 << 10;
/// The header of a migration's memory stream, followed by the VM id.
const MEMORY_HEADER: &str = "vgrid-sim-memory ";
/// The header of a migration's disk stream.
const DISK_HEADER: &str = "vgrid-sim-disk ";

/// The disk and the memory stream a destination received.
pub type Streams = Arc<Mutex<(Option<Vec<u8>>, Option<Vec<u8>>)>>;

/// A prepared destination: what it admitted and what its two listeners received.
pub struct Incoming {
    pub cpus: u64,
    pub memory_mib: u64,
    pub image: String,
    /// The disk and the memory stream, once each connection closed.
    pub streams: Streams,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An outgoing migration: the status the source reports, and whether it was asked to cancel.
pub struct Outgoing {
    pub status: Migration,
    cancel: bool,
    started: Instant,
}

pub fn routes() -> Router<Sim> {
    Router::new()
        .route("/host/v1/vms/{id}/suspend", post(suspend))
        .route("/host/v1/vms/{id}/snapshot", post(snapshot))
        .route("/host/v1/migrate/incoming", post(incoming))
        .route("/host/v1/migrate/incoming/{id}", axum::routing::delete(incoming_abort))
        .route("/host/v1/migrate/incoming/{id}/finish", post(incoming_finish))
        .route("/host/v1/vms/{id}/migrate", post(send).get(send_status).delete(send_cancel))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The bytes of the `n`-th state saved on a host for VM `id`: they name both.
fn state_bytes(host: &str, id: &str, n: u64) -> Vec<u8> {
    let mut b = format!("vgrid-sim-state {id} {host} {n}\n").into_bytes();
    let fill = (0..STATE_BYTES - b.len()).map(|i| (i as u64 * 31 + n) as u8);
    b.extend(fill);
    b
}

/// The first image server the coordinator named.
fn server(sim: &Sim) -> Result<String, String> {
    sim.state.lock().unwrap().image_servers.first().cloned().ok_or_else(|| "this host knows no image server".to_string())
}

async fn manifest(sim: &Sim, base: &str, r: &ImageRef) -> Result<Manifest, (StatusCode, String)> {
    let path = match r.version {
        Some(v) => format!("{base}/store/v1/images/{}/{v}", r.name),
        None => format!("{base}/store/v1/images/{}", r.name),
    };
    let bad = |e: String| (StatusCode::BAD_GATEWAY, format!("image {r}: {e}"));
    let resp = sim.http.get(path).send().await.map_err(|e| bad(e.to_string()))?;
    if resp.status() == StatusCode::NOT_FOUND {
        return Err((StatusCode::NOT_FOUND, format!("no image server has image {r}")));
    }
    if !resp.status().is_success() {
        return Err(bad(format!("the image server answered {}", resp.status())));
    }
    let b = resp.bytes().await.map_err(|e| bad(e.to_string()))?;
    Manifest::from_json(&b).map_err(|e| bad(e.to_string()))
}

/// Uploads the state of VM `id` as image `name` (parent: `parent`) through an upload session
/// and commits it; answers the stored manifest and the bytes sent.
async fn upload_state(sim: &Sim, id: &str, name: &str, parent: &str) -> Result<(Manifest, u64), String> {
    let base = server(sim)?;
    let parent_ref: ImageRef = parent.parse().map_err(|e| format!("{parent}: {e}"))?;
    let parent = manifest(sim, &base, &parent_ref).await.map_err(|e| e.1)?;
    let n = sim.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (hash, z) = vgrid_storeclient::codec::encode(&state_bytes(&sim.name, id, n));
    let h = &sim.http;
    let fail = |what: &str, e: String| format!("{what}: {e}");
    let up: serde_json::Value = async { h.post(format!("{base}/store/v1/uploads")).send().await?.error_for_status()?.json().await }
        .await
        .map_err(|e: reqwest::Error| fail("upload session", e.to_string()))?;
    let up = up["id"].as_str().unwrap_or_default().to_string();
    let missing: Vec<ChunkHash> =
        async { h.post(format!("{base}/store/v1/uploads/{up}/missing")).json(&[hash]).send().await?.error_for_status()?.json().await }
            .await
            .map_err(|e: reqwest::Error| fail("missing chunks", e.to_string()))?;
    if missing.contains(&hash) {
        let put = h.put(format!("{base}/store/v1/uploads/{up}/chunks/{hash}")).header("content-type", "application/zstd").body(z.clone());
        put.send().await.and_then(|r| r.error_for_status()).map_err(|e| fail("state chunk", e.to_string()))?;
    }
    let meta = StateMeta {
        qemu_version: QEMU_VERSION.into(),
        machine: "pc-i440fx-10.0".into(),
        cpus: 1,
        memory_mib: 256,
        accel: "tcg".into(),
        saved: unix_now(),
        loader_roms: None,
    };
    let m = Manifest {
        schema: vgrid_api::manifest::SCHEMA_VERSION,
        name: name.to_string(),
        version: 0,
        created: 0,
        chunk_size: parent.chunk_size,
        disk: parent.disk.clone(),
        meta: parent.meta.clone(),
        parent: Some(parent.image_ref()),
        state: Some(SavedState { blob: Blob { size: STATE_BYTES as u64, chunks: vec![Some(hash)] }, meta, ram: None }),
    };
    let r = h.post(format!("{base}/store/v1/uploads/{up}/commit")).json(&m).send().await.map_err(|e| fail("commit", e.to_string()))?;
    if !r.status().is_success() {
        let _ = h.delete(format!("{base}/store/v1/uploads/{up}")).send().await;
        return Err(format!("commit: {} {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let b = r.bytes().await.map_err(|e| fail("commit", e.to_string()))?;
    let stored = Manifest::from_json(&b).map_err(|e| fail("commit", e.to_string()))?;
    Ok((stored, if missing.contains(&hash) { z.len() as u64 } else { 0 }))
}

/// A launch's restore: reads the saved state of `image` back (its manifest, its state chunk,
/// verified against its hash) and checks that it is VM `id`'s.
pub async fn read_saved_state(sim: &Sim, id: &str, image: &ImageRef) -> Result<(), (StatusCode, String)> {
    let base = server(sim).map_err(|e| (StatusCode::BAD_GATEWAY, e))?;
    let m = manifest(sim, &base, image).await?;
    let bad = |e: String| (StatusCode::CONFLICT, format!("cannot restore VM {id} from {image}: {e}"));
    let state = m.state.as_ref().ok_or_else(|| bad("it holds no saved state".into()))?;
    let hash = state.blob.chunks.first().copied().flatten().ok_or_else(|| bad("its state is empty".into()))?;
    let z = async { sim.http.get(format!("{base}/store/v1/chunks/{hash}")).send().await?.error_for_status()?.bytes().await }
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("state chunk {hash} of {image}: {e}")))?;
    let data = vgrid_storeclient::codec::decode(&hash, &z, STATE_BYTES).map_err(|e| bad(e.to_string()))?;
    let head = String::from_utf8_lossy(&data[..data.len().min(200)]).into_owned();
    if !head.starts_with(&format!("vgrid-sim-state {id} ")) {
        return Err(bad(format!("the state is another VM's: {}", head.lines().next().unwrap_or_default())));
    }
    Ok(())
}

async fn save(sim: Sim, id: String, req: SaveRequest, suspend: bool) -> Response {
    let image = {
        let mut s = sim.state.lock().unwrap();
        if !s.running.contains_key(&id) || s.paused.contains(&id) {
            return error(StatusCode::NOT_FOUND, format!("unknown VM {id}"));
        }
        if !s.saving.insert(id.clone()) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("saving VM {id}: another snapshot or suspend of this VM is in progress"),
            );
        }
        s.image_of.get(&id).cloned().unwrap_or_default()
    };
    let t0 = Instant::now();
    // Its own task, as a real agent's: a caller that goes away does not cancel it.
    let task = tokio::spawn({
        let sim = sim.clone();
        async move {
            tokio::time::sleep(sim.spec.save_time).await;
            let paused = t0.elapsed().as_secs_f64();
            let r = upload_state(&sim, &id, &req.name, &image).await;
            let mut s = sim.state.lock().unwrap();
            s.saving.remove(&id);
            let (m, uploaded) = match r {
                Ok(v) => v,
                Err(e) => {
                    return error(StatusCode::BAD_GATEWAY, format!("saving VM {id} as image {}: {e}; it runs on", req.name));
                }
            };
            let saved = m.image_ref().to_string();
            s.saves.push((id.clone(), saved.clone(), suspend));
            if suspend && s.running.remove(&id).is_some() {
                // Saved: its QEMU ends (killed, as a real agent's after the upload).
                s.exited.insert(id.clone());
                s.killed.insert(id.clone());
            }
            Json(SavedImage {
                image: saved,
                parent: Some(image.clone()),
                state_bytes: STATE_BYTES as u64,
                disk_chunks_new: 0,
                disk_chunks_total: m.disk.chunks.len() as u64,
                uploaded_bytes: uploaded,
                paused_secs: paused,
                total_secs: t0.elapsed().as_secs_f64(),
            })
            .into_response()
        }
    });
    task.await.unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("save task failed: {e}")))
}

async fn suspend(State(sim): State<Sim>, Path(id): Path<String>, Json(req): Json<SaveRequest>) -> Response {
    save(sim, id, req, true).await
}

async fn snapshot(State(sim): State<Sim>, Path(id): Path<String>, Json(req): Json<SaveRequest>) -> Response {
    save(sim, id, req, false).await
}

/// A listener on 127.0.0.1 whose first connection's bytes (up to 1 MiB) land in `slot`.
async fn receive(slot: impl Fn(Vec<u8>) + Send + 'static) -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for a migration stream");
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        if let Ok((c, _)) = l.accept().await {
            let mut buf = Vec::new();
            if c.take(1 << 20).read_to_end(&mut buf).await.is_ok() {
                slot(buf);
            }
        }
    });
    (port, task)
}

async fn incoming(State(sim): State<Sim>, Json(req): Json<IncomingRequest>) -> Response {
    let id = req.launch.id.clone();
    {
        let s = sim.state.lock().unwrap();
        if s.running.contains_key(&id) || s.incoming.contains_key(&id) {
            return error(StatusCode::CONFLICT, format!("migration of VM {id}: this host already has a VM with this id"));
        }
    }
    let streams: Streams = Default::default();
    let (d, m) = (streams.clone(), streams.clone());
    let (nbd_port, t1) = receive(move |b| d.lock().unwrap().0 = Some(b)).await;
    let (migration_port, t2) = receive(move |b| m.lock().unwrap().1 = Some(b)).await;
    let n = sim.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let inc = Incoming {
        cpus: req.launch.config.cpus as u64,
        memory_mib: req.launch.config.memory_mib,
        image: req.launch.image().to_string(),
        streams,
        tasks: vec![t1, t2],
    };
    let mut s = sim.state.lock().unwrap();
    s.incoming.insert(id.clone(), inc);
    s.note_admission(&sim.name, &sim.spec, &id);
    Json(IncomingReady { host: req.listen_host, nbd_port, migration_port, pid: 20_000 + n as u32, accel: Accel::Tcg }).into_response()
}

async fn incoming_abort(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    sim.state.lock().unwrap().incoming.remove(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// Takes over once both streams arrived (within 10 s) and the memory names this VM.
async fn incoming_finish(State(sim): State<Sim>, Path(id): Path<String>, body: Option<Json<FinishRequest>>) -> Response {
    let _history = body.map(|b| b.0.console_history).unwrap_or_default();
    let Some(streams) = sim.state.lock().unwrap().incoming.get(&id).map(|i| i.streams.clone()) else {
        return error(StatusCode::NOT_FOUND, format!("unknown VM {id}"));
    };
    let t0 = Instant::now();
    let (disk, memory) = loop {
        let got = streams.lock().unwrap().clone();
        if let (Some(d), Some(m)) = got {
            break (d, m);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return error(StatusCode::CONFLICT, format!("migration of VM {id}: the destination received no complete migration in 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ok = String::from_utf8_lossy(&memory).starts_with(&format!("{MEMORY_HEADER}{id}\n"))
        && String::from_utf8_lossy(&disk).starts_with(&format!("{DISK_HEADER}{id}\n"));
    if !ok {
        return error(StatusCode::CONFLICT, format!("migration of VM {id}: receiving the migration failed: the streams are another VM's"));
    }
    let mut s = sim.state.lock().unwrap();
    let Some(inc) = s.incoming.remove(&id) else { return error(StatusCode::NOT_FOUND, format!("unknown VM {id}")) };
    s.running.insert(id.clone(), (inc.cpus, inc.memory_mib, None));
    s.exited.remove(&id);
    s.image_of.insert(id.clone(), inc.image.clone());
    s.launched_at.insert(id.clone(), Instant::now());
    s.received.push(id.clone());
    let n = sim.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Json(Launched { pid: 30_000 + n as u32, accel: Accel::Tcg }).into_response()
}

/// Source: sends VM `id` to the prepared destination in the background; 202 with the first
/// status.
async fn send(State(sim): State<Sim>, Path(id): Path<String>, Json(req): Json<SendRequest>) -> Response {
    let first = {
        let mut s = sim.state.lock().unwrap();
        if !s.running.contains_key(&id) || s.paused.contains(&id) {
            return error(StatusCode::NOT_FOUND, format!("unknown VM {id}"));
        }
        if s.outgoing.get(&id).is_some_and(|o| o.status.status == MigrationStatus::Active) {
            return error(StatusCode::CONFLICT, format!("migration of VM {id}: a migration of this VM is already under way"));
        }
        let first =
            Migration { phase: "starting".into(), ..Migration::begin(&sim.name, &req.to, req.downtime_ms, req.max_seconds, unix_now()) };
        s.outgoing.insert(id.clone(), Outgoing { status: first.clone(), cancel: false, started: Instant::now() });
        first
    };
    tokio::spawn(send_vm(sim, id, req));
    (StatusCode::ACCEPTED, Json(first)).into_response()
}

/// Sets the phase of `id`'s migration; false when it was cancelled or forgotten.
fn phase(sim: &Sim, id: &str, phase: &str) -> bool {
    let mut s = sim.state.lock().unwrap();
    match s.outgoing.get_mut(id) {
        Some(o) if !o.cancel => {
            o.status.phase = phase.into();
            true
        }
        _ => false,
    }
}

async fn stream(host: &str, port: u16, header: String) -> std::io::Result<u64> {
    let mut c = tokio::net::TcpStream::connect((host, port)).await?;
    let mut body = header.into_bytes();
    body.extend(std::iter::repeat_n(0x5au8, 64 << 10));
    c.write_all(&body).await?;
    c.shutdown().await?;
    Ok(body.len() as u64)
}

async fn send_vm(sim: Sim, id: String, req: SendRequest) {
    let half = sim.spec.migrate_time / 2;
    let dest = req.dest.clone();
    let mut result: Result<(u64, u64), (MigrationStatus, String)> =
        Err((MigrationStatus::Cancelled, "cancelled while mirroring the disk".into()));
    if phase(&sim, &id, "mirroring disk") {
        tokio::time::sleep(half).await;
        result = match stream(&dest.host, dest.nbd_port, format!("{DISK_HEADER}{id}\n")).await {
            Err(e) => Err((MigrationStatus::Failed, format!("mirroring the disk to {}:{}: {e}", dest.host, dest.nbd_port))),
            Ok(disk) if phase(&sim, &id, "copying memory") => {
                tokio::time::sleep(half).await;
                match stream(&dest.host, dest.migration_port, format!("{MEMORY_HEADER}{id}\n")).await {
                    Ok(ram) => Ok((disk, ram)),
                    Err(e) => Err((MigrationStatus::Failed, format!("sending memory to {}:{}: {e}", dest.host, dest.migration_port))),
                }
            }
            Ok(_) => Err((MigrationStatus::Cancelled, "cancelled while copying memory".into())),
        };
    }
    let mut s = sim.state.lock().unwrap();
    let cancelled = s.outgoing.get(&id).is_none_or(|o| o.cancel);
    let running = s.running.contains_key(&id);
    let Some(o) = s.outgoing.get_mut(&id) else { return };
    let st = &mut o.status;
    match result {
        Ok((disk, ram)) if !cancelled && running => {
            st.status = MigrationStatus::Completed;
            st.phase = "completed".into();
            st.disk_bytes = Some(disk);
            st.ram_transferred_bytes = Some(ram);
            st.ram_remaining_bytes = Some(0);
            st.dirty_sync_count = Some(2);
            st.downtime_ms = Some(req.downtime_ms.min(20));
            st.total_ms = Some(half.as_millis() as u64);
            s.paused.insert(id.clone());
        }
        Ok(_) => {
            st.status = MigrationStatus::Cancelled;
            st.phase = "cancelled".into();
            st.error = Some("cancelled".into());
        }
        Err((status, e)) => {
            st.status = status;
            st.phase = status.as_str().into();
            st.error = Some(e);
        }
    }
    if let Some(o) = s.outgoing.get_mut(&id) {
        o.status.elapsed_ms = Some(o.started.elapsed().as_millis() as u64);
        o.status.finished = Some(unix_now());
    }
}

async fn send_status(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    let s = sim.state.lock().unwrap();
    match s.outgoing.get(&id) {
        Some(o) => {
            let mut st = o.status.clone();
            if st.status == MigrationStatus::Active {
                st.elapsed_ms = Some(o.started.elapsed().as_millis() as u64);
            }
            Json(st).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("unknown VM {id}")),
    }
}

/// Cancels an active migration (the guest runs on here); after a completed one whose
/// destination did not take over, resumes the paused guest.
async fn send_cancel(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    let t0 = Instant::now();
    loop {
        {
            let mut s = sim.state.lock().unwrap();
            let paused = s.paused.contains(&id);
            let Some(o) = s.outgoing.get_mut(&id) else { return error(StatusCode::NOT_FOUND, format!("unknown VM {id}")) };
            match o.status.status {
                MigrationStatus::Active if t0.elapsed() < Duration::from_secs(60) => o.cancel = true,
                MigrationStatus::Completed if paused => {
                    o.status.status = MigrationStatus::Failed;
                    o.status.phase = "failed".into();
                    o.status.error = Some("the destination did not take over; the guest runs on at the source".into());
                    let st = o.status.clone();
                    s.paused.remove(&id);
                    return Json(st).into_response();
                }
                _ => return Json(o.status.clone()).into_response(),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
