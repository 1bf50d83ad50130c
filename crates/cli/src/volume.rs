//! `vgrid volume ...`: the user's data on the image servers (the data servers). Creating,
//! importing and exporting talk to an image server directly (like `vgrid image`); listing,
//! committing, snapshots and removal go through the coordinator, which knows which VM holds a
//! volume read-write.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use vgrid_api::volume::{SnapshotCreate, VolumeCommitted, VolumeInfo, VolumeMeta};
use vgrid_api::{Blob, Boot, ImageMeta, ImageRef, Manifest, DEFAULT_CHUNK_SIZE};
use vgrid_storeclient::import::{export_image, import_file, ImportOptions};

use crate::output::{bytes, parse_size, print_json, table, Progress};
use crate::store::{ServerArg, Want};
use crate::Ctx;

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create an empty volume of SIZE (nothing is stored until a VM writes to it).
    ///
    /// Attach it with `vgrid vm run IMAGE --volume NAME`: the guest sees a virtio disk
    /// (/dev/vdb, ...) whose blocks come on demand through its host's cache; its writes are
    /// committed as the volume's next version when the VM stops, is removed, or on
    /// `vgrid volume commit NAME`.
    Create {
        name: String,
        /// Size, e.g. 20G, 512M.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Import a raw or qcow2 file as a (new version of a) volume; only chunks the image server
    /// lacks are sent.
    Import {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List your volumes (an admin: all), their versions, and the VM holding each read-write.
    Ls,
    /// Show one volume.
    Show { name: String },
    /// Write a volume (NAME or NAME@VERSION) out as a sparse raw file.
    Export {
        volume: String,
        file: PathBuf,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Publish the writes of the running VM holding NAME as its next version now (the guest is
    /// paused while they are read; only changed chunks travel).
    Commit { name: String },
    /// Make SNAPSHOT a named, immutable copy of NAME's latest version (no data copied;
    /// committed first when a running VM holds it). Attach it read-only: `--volume SNAPSHOT:ro`.
    Snapshot { name: String, snapshot: String },
    /// Remove a volume, every version (refused while a VM holds it).
    Rm { name: String },
}

pub async fn run(ctx: &Ctx, cmd: VolumeCmd) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    match cmd {
        VolumeCmd::Create { name, size, server } => {
            let m = create(ctx, &server, &name, size).await?;
            if ctx.json {
                print_json(&vgrid_api::rest::ImageSummary::of(&m))?;
            } else {
                println!("created volume {} ({})", m.image_ref(), bytes(size));
            }
        }
        VolumeCmd::Import { name, file, server } => {
            let m = import(ctx, &server, &name, &file).await?;
            if ctx.json {
                print_json(&vgrid_api::rest::ImageSummary::of(&m))?;
            } else {
                println!("imported {} as volume {} ({})", file.display(), m.image_ref(), bytes(m.disk.size));
            }
        }
        VolumeCmd::Ls => {
            let list: Vec<VolumeInfo> = api.get("/api/v1/volumes").await?;
            if ctx.json {
                print_json(&list)?;
            } else {
                println!(
                    "{}",
                    table(
                        &["NAME", "SIZE", "DATA", "VERSIONS", "ATTACHED RW", "OWNER", "SNAPSHOT OF", "ON"],
                        list.iter().map(row).collect()
                    )
                );
            }
        }
        VolumeCmd::Show { name } => {
            let v: VolumeInfo = api.get(&format!("/api/v1/volumes/{name}")).await?;
            if ctx.json {
                print_json(&v)?;
            } else {
                show(&v);
            }
        }
        VolumeCmd::Export { volume, file, server } => {
            let m = export(ctx, &server, &volume, &file).await?;
            eprintln!("exported volume {} ({}) to {}", m.image_ref(), bytes(m.disk.size), file.display());
        }
        VolumeCmd::Commit { name } => {
            let c: VolumeCommitted = api.post(&format!("/api/v1/volumes/{name}/commit"), &serde_json::json!({})).await?;
            if ctx.json {
                print_json(&c)?;
            } else if c.chunks_changed == 0 && c.uploaded_bytes == 0 {
                println!("volume {}: nothing new to commit", c.volume);
            } else {
                println!(
                    "committed {}: {} chunks changed, {} sent, guest paused {:.2}s",
                    c.volume,
                    c.chunks_changed,
                    bytes(c.uploaded_bytes),
                    c.paused_secs
                );
            }
        }
        VolumeCmd::Snapshot { name, snapshot } => {
            let v: VolumeInfo = api.post(&format!("/api/v1/volumes/{name}/snapshot"), &SnapshotCreate { snapshot }).await?;
            if ctx.json {
                print_json(&v)?;
            } else {
                println!("snapshot {} of {}", v.name, v.snapshot_of.as_deref().unwrap_or(&name));
            }
        }
        VolumeCmd::Rm { name } => {
            let r: vgrid_api::rest::GcReport = api.delete(&format!("/api/v1/volumes/{name}")).await?;
            if ctx.json {
                print_json(&r)?;
            } else {
                println!("removed volume {name}; freed {} chunks ({})", r.chunks_freed, bytes(r.bytes_freed));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Imports `file` as (the next version of) volume `name`, with a progress bar.
pub(crate) async fn import(ctx: &Ctx, server: &ServerArg, name: &str, file: &Path) -> anyhow::Result<Manifest> {
    let client = server.client(ctx, Want::Upload).await?;
    let opts = ImportOptions { volume: Some(VolumeMeta::default()), ..ImportOptions::new(name) };
    let pb = Progress::bytes(ctx.json, 0, &format!("importing volume {name}"));
    let cb = |d: u64, t: u64| {
        pb.set_length(t);
        pb.set_position(d);
    };
    let m = import_file(&client, file, &opts, &cb).await.with_context(|| format!("importing {} as volume {name}", file.display()))?;
    pb.finish_and_clear();
    Ok(m)
}

/// Writes volume `volume` (NAME or NAME@VERSION) to `file` as a sparse raw file, with a
/// progress bar.
pub(crate) async fn export(ctx: &Ctx, server: &ServerArg, volume: &str, file: &Path) -> anyhow::Result<Manifest> {
    let client = server.client(ctx, Want::Image(volume)).await?;
    let r: ImageRef = volume.parse()?;
    let m = client.manifest(&r).await?;
    if m.meta.volume.is_none() {
        bail!("{} is an image, not a volume: use `vgrid image export`", m.image_ref());
    }
    let pb = Progress::bytes(ctx.json, m.disk.size, &format!("exporting volume {}", m.image_ref()));
    let cb = |d: u64, _t: u64| pb.set_position(d);
    export_image(&client, &m.image_ref(), file, &cb).await?;
    pb.finish_and_clear();
    Ok(m)
}

/// An empty volume: every chunk elided (zeros), committed as version 1 of NAME.
async fn create(ctx: &Ctx, server: &ServerArg, name: &str, size: u64) -> anyhow::Result<Manifest> {
    if size == 0 {
        bail!("a volume needs a size above 0 (--size 20G)");
    }
    vgrid_api::manifest::validate_name(name).map_err(|e| anyhow!("{e}"))?;
    let client = server.client(ctx, Want::Upload).await?;
    let cs = DEFAULT_CHUNK_SIZE;
    let m = Manifest {
        schema: vgrid_api::manifest::SCHEMA_VERSION,
        name: name.to_string(),
        version: 0,
        created: 0,
        chunk_size: cs,
        disk: Blob { size, chunks: vec![None; size.div_ceil(cs as u64) as usize] },
        meta: ImageMeta { os: String::new(), arch: "x86_64".into(), boot: Boot::Firmware, volume: Some(VolumeMeta::default()) },
        parent: None,
        state: None,
    };
    if client.manifest(&ImageRef { name: name.to_string(), version: None }).await.is_ok() {
        bail!("{name} exists already on {}: choose another name (or `vgrid volume import` a new version)", client.base_url());
    }
    let up = client.begin_upload().await?;
    client.commit(&up, &m).await.with_context(|| format!("creating volume {name}"))
}

fn row(v: &VolumeInfo) -> Vec<String> {
    let versions = match (v.versions.first(), v.versions.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}-{b} ({})", v.versions.len()),
        (Some(a), _) => a.to_string(),
        _ => "-".into(),
    };
    vec![
        v.name.clone(),
        bytes(v.size),
        bytes(v.stored_bytes),
        versions,
        v.attached_rw.clone().unwrap_or_else(|| "-".into()),
        v.owner.clone().unwrap_or_else(|| "admins".into()),
        v.snapshot_of.clone().unwrap_or_else(|| "-".into()),
        v.servers.join(","),
    ]
}

fn show(v: &VolumeInfo) {
    println!("volume:      {}", v.name);
    println!("size:        {} ({} bytes)", bytes(v.size), v.size);
    println!("data:        {}", bytes(v.stored_bytes));
    println!("versions:    {}", v.versions.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "));
    println!("owner:       {}", v.owner.as_deref().unwrap_or("admins"));
    if let Some(s) = &v.snapshot_of {
        println!("snapshot of: {s} (read-only)");
    }
    println!("attached rw: {}", v.attached_rw.as_deref().unwrap_or("-"));
    println!("on:          {}", v.servers.join(", "));
}
