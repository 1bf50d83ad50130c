//! `vgrid image ...`: import, list, inspect, export, remove, stage, cache stats (user
//! commands; `vgrid image nbd` is a role launcher, in `roles.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use futures::StreamExt;
use vgrid_api::host::PullProgress;
use vgrid_api::{Boot, ImageRef, Manifest};
use vgrid_storeclient::import::{export_image, import_file, Format, ImportOptions};
use vgrid_storeclient::StoreClient;

use crate::output::{self, bytes, parse_size, print_json, table, Progress};
use crate::store::{use_store_token, ServerArg, Want};
use crate::Ctx;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import a raw or qcow2 disk image as content-addressed chunks (only chunks the server lacks are sent).
    Import(ImportArgs),
    /// List images.
    Ls(ServerArg),
    /// Show one image's manifest summary.
    Show {
        /// NAME or NAME@VERSION.
        image: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Write an image back out as a sparse raw file.
    Export {
        /// NAME or NAME@VERSION.
        image: String,
        /// Destination file (written to a temporary name, then renamed).
        file: PathBuf,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove an image (all versions, or NAME@VERSION) and free the chunks no other image uses.
    Rm {
        image: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Serve images to any NBD client in the foreground (qemu-img, qemu-io, nbdinfo, nbdcopy, QEMU).
    Nbd(crate::roles::NbdArgs),
    /// Stage a whole image into the host's chunk cache (explicit transfer).
    Pull { image: String },
    /// The host chunk cache.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Save a running VM as a warm image: its memory state and changed disk chunks, the VM's
    /// image as parent. `vgrid vm run NAME` then restores it instead of booting.
    Snapshot(crate::suspend::SnapshotArgs),
    /// Build the sample guest from Debian packages (cached) and import it as `sample`; with
    /// `--debian`, a stock Debian 12 guest (debootstrap, systemd; minutes, needs root) as `debian`.
    BuildSample(BuildSampleArgs),
}

#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// Hits, misses, bytes fetched and fetch latency of the host chunk cache.
    Stats,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The disk image file.
    pub file: PathBuf,
    /// Image name (1-64 of A-Z a-z 0-9 . _ -); importing an existing name adds a version.
    #[arg(long)]
    pub name: String,
    /// Input format [default: detected from the file's header].
    #[arg(long, value_parser = ["raw", "qcow2"])]
    pub format: Option<String>,
    /// Chunk size (power of two, 4K-16M).
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Kernel for direct kernel boot (stored as chunks with the image).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd for direct kernel boot.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct kernel boot.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Operating system, for information and matchmaking (e.g. linux).
    #[arg(long, default_value = "linux")]
    pub os: String,
    /// Guest architecture.
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    /// Make the image readable and runnable by every user (admins only); otherwise only you
    /// (and admins) may use it.
    #[arg(long)]
    pub public: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Args, Debug)]
pub struct BuildSampleArgs {
    #[arg(long, help = out_help())]
    pub out: Option<PathBuf>,
    /// Build the stock Debian 12 guest instead (scripts/build-debian-guest.sh: debootstrap,
    /// systemd, openssh-server, the cloud kernel; prints "vgrid-debian: booted" when booted).
    #[arg(long)]
    pub debian: bool,
    /// Image name to import it as [default: sample, or debian with --debian].
    #[arg(long)]
    pub name: Option<String>,
    /// Build only; do not import.
    #[arg(long)]
    pub no_import: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

/// The guest recipes, embedded so the binary can build them anywhere.
const BUILD_SAMPLE: &str = include_str!("../../../scripts/build-sample-guest.sh");
const BUILD_DEBIAN: &str = include_str!("../../../scripts/build-debian-guest.sh");
/// The cache protocol both recipes source from their own directory.
const GUEST_CACHE: &str = include_str!("../../../scripts/guest-cache.sh");

/// The cache directory a guest recipe builds into by default: `PREFIX-vN`, N the recipe's
/// `LAYOUT=N` (so the help never names a stale one).
fn guest_dir(recipe: &str, prefix: &str) -> String {
    let layout = recipe.lines().find_map(|l| l.trim().strip_prefix("LAYOUT=")).unwrap_or("?");
    format!("{prefix}-v{layout}")
}

fn out_help() -> String {
    format!(
        "Where to build and cache the guest [default: CACHE/{} or, with --debian, CACHE/{}, where CACHE is $VGRID_CACHE or ~/.cache/vgrid]",
        guest_dir(BUILD_SAMPLE, "sample-guest"),
        guest_dir(BUILD_DEBIAN, "debian-guest")
    )
}

pub async fn run(ctx: &Ctx, cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Import(a) => {
            let client = a.server.client(ctx, Want::Upload).await?.public(a.public);
            let m = import(ctx, &client, a).await?;
            if ctx.json {
                print_json(&vgrid_api::rest::ImageSummary::of(&m))?;
            }
        }
        ImageCmd::Ls(s) => {
            let list = list_images(ctx, &s).await?;
            if ctx.json {
                print_json(&list)?;
            } else {
                let rows = list
                    .iter()
                    .map(|i| {
                        vec![
                            i.image.name.clone(),
                            i.image.version.to_string(),
                            bytes(i.image.size),
                            bytes(i.image.stored_bytes),
                            i.image.os.clone(),
                            i.image.arch.clone(),
                            if i.image.warm { format!("{} (warm)", i.image.boot) } else { i.image.boot.clone() },
                            output::age(i.image.created),
                            match (&i.image.owner, i.image.public) {
                                (Some(o), true) => format!("{o} (public)"),
                                (None, true) => "public".into(),
                                (Some(o), false) => o.clone(),
                                (None, false) => "admins".into(),
                            },
                            i.servers.join(","),
                        ]
                    })
                    .collect();
                println!("{}", table(&["NAME", "VERSION", "SIZE", "DATA", "OS", "ARCH", "BOOT", "CREATED", "OWNER", "ON"], rows));
            }
        }
        ImageCmd::Show { image, server } => {
            let r: ImageRef = image.parse()?;
            let m = server.client(ctx, Want::Image(&image)).await?.manifest(&r).await?;
            if ctx.json {
                print_json(&m)?;
            } else {
                show(&m);
            }
        }
        ImageCmd::Export { image, file, server } => {
            let client = server.client(ctx, Want::Image(&image)).await?;
            let r: ImageRef = image.parse()?;
            let m = client.manifest(&r).await?;
            let pb = Progress::bytes(ctx.json, m.disk.size, &format!("exporting {}", m.image_ref()));
            let cb = |d: u64, _t: u64| pb.set_position(d);
            export_image(&client, &m.image_ref(), &file, &cb).await?;
            pb.finish_and_clear();
            eprintln!("exported {} ({}) to {}", m.image_ref(), bytes(m.disk.size), file.display());
        }
        ImageCmd::Rm { image, server } => {
            let r: ImageRef = image.parse()?;
            let rep = server.client(ctx, Want::Image(&image)).await?.delete(&r).await?;
            if ctx.json {
                print_json(&rep)?;
            } else {
                println!("removed {r}; freed {} chunks ({})", rep.chunks_freed, bytes(rep.bytes_freed));
            }
        }
        ImageCmd::Nbd(a) => return crate::roles::nbd(ctx, a).await,
        ImageCmd::Pull { image } => pull(ctx, &image).await?,
        ImageCmd::Cache(CacheCmd::Stats) => cache_stats(ctx).await?,
        ImageCmd::BuildSample(a) => build_sample(ctx, a).await?,
        ImageCmd::Snapshot(a) => return crate::suspend::snapshot(ctx, a).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// An image and the image servers that hold it.
#[derive(serde::Serialize)]
struct Located {
    #[serde(flatten)]
    image: vgrid_api::rest::ImageSummary,
    servers: Vec<String>,
}

/// Images of one image server (`--image-server`), or of every image server the coordinator
/// knows, with where each is.
async fn list_images(ctx: &Ctx, s: &ServerArg) -> anyhow::Result<Vec<Located>> {
    if s.image_server.is_none() {
        if let Ok(ads) = ctx.api().get::<Vec<vgrid_api::grid::ImageServerAd>>("/api/v1/image-servers").await {
            let mut out: Vec<Located> = Vec::new();
            use_store_token(ctx).await;
            for ad in ads {
                // Ask each server now: advertisements lag by a heartbeat.
                let images = match StoreClient::new(&ad.url).map_err(|e| anyhow!("{e}"))?.list().await {
                    Ok(list) => list,
                    Err(e) => {
                        eprintln!("warning: image server {} ({}): {e}", ad.name, ad.url);
                        continue;
                    }
                };
                for img in images {
                    match out.iter_mut().find(|l| l.image.name == img.name && l.image.version == img.version) {
                        Some(l) => l.servers.push(ad.name.clone()),
                        None => out.push(Located { image: img, servers: vec![ad.name.clone()] }),
                    }
                }
            }
            out.sort_by(|a, b| a.image.name.cmp(&b.image.name).then(a.image.version.cmp(&b.image.version)));
            return Ok(out);
        }
    }
    let client = s.client(ctx, Want::Upload).await?;
    let url = client.base_url().to_string();
    Ok(client.list().await?.into_iter().map(|image| Located { image, servers: vec![url.clone()] }).collect())
}

async fn import(ctx: &Ctx, client: &StoreClient, a: ImportArgs) -> anyhow::Result<Manifest> {
    let format = match a.format.as_deref() {
        None => None,
        Some("raw") => Some(Format::Raw),
        Some("qcow2") => Some(Format::Qcow2),
        Some(f) => bail!("unknown format {f:?}"),
    };
    let chunk_size = u32::try_from(a.chunk_size).map_err(|_| anyhow!("chunk size {} is too large", a.chunk_size))?;
    let opts = ImportOptions {
        name: a.name.clone(),
        format,
        chunk_size,
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline.unwrap_or_default(),
        os: a.os,
        arch: a.arch,
        volume: None,
    };
    let pb = Progress::bytes(ctx.json, 0, &format!("importing {}", a.name));
    let cb = |d: u64, t: u64| {
        pb.set_length(t);
        pb.set_position(d);
    };
    let m = import_file(client, &a.file, &opts, &cb).await.with_context(|| format!("importing {} as {}", a.file.display(), a.name))?;
    pb.finish_and_clear();
    if !ctx.json {
        let stored: u64 = m.disk.chunks.iter().flatten().count() as u64;
        eprintln!(
            "imported {} as {}: {} in {} chunks of {} ({} non-zero)",
            a.file.display(),
            m.image_ref(),
            bytes(m.disk.size),
            m.disk.chunks.len(),
            bytes(m.chunk_size as u64),
            stored
        );
    }
    Ok(m)
}

fn show(m: &Manifest) {
    let stored = m.disk.chunks.iter().flatten().count();
    println!("image:       {}", m.image_ref());
    println!("size:        {} ({} bytes)", bytes(m.disk.size), m.disk.size);
    println!("chunks:      {} of {} ({} non-zero)", m.disk.chunks.len(), bytes(m.chunk_size as u64), stored);
    println!("os/arch:     {} / {}", m.meta.os, m.meta.arch);
    match &m.meta.boot {
        Boot::Firmware => println!("boot:        firmware"),
        Boot::Kernel { kernel, initrd, cmdline } => {
            println!(
                "boot:        kernel ({}){}",
                bytes(kernel.size),
                initrd.as_ref().map(|i| format!(" + initrd ({})", bytes(i.size))).unwrap_or_default()
            );
            println!("cmdline:     {cmdline}");
        }
    }
    if let Some(p) = &m.parent {
        println!("parent:      {p}");
    }
    if let Some(st) = &m.state {
        println!(
            "warm state:  {} (QEMU {}, {}, {} cpus, {} MiB, {}): starts with -incoming instead of booting",
            bytes(st.blob.size),
            st.meta.qemu_version,
            st.meta.machine,
            st.meta.cpus,
            st.meta.memory_mib,
            st.meta.accel
        );
    }
    println!("created:     {}", output::age(m.created));
}

async fn build_sample(ctx: &Ctx, a: BuildSampleArgs) -> anyhow::Result<()> {
    let (what, file, recipe, default_name) = if a.debian {
        ("Debian guest", "build-debian-guest.sh", BUILD_DEBIAN, "debian")
    } else {
        ("sample guest", "build-sample-guest.sh", BUILD_SAMPLE, "sample")
    };
    let dir = tempdir_path();
    std::fs::create_dir_all(&dir)?;
    let script = dir.join(file);
    std::fs::write(&script, recipe)?;
    std::fs::write(dir.join("guest-cache.sh"), GUEST_CACHE)?;
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(&script);
    if let Some(o) = &a.out {
        cmd.arg(o);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().await.with_context(|| format!("running the {what} build script"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!("building the {what} failed ({}; its script's messages are above)", out.status);
    }
    let outdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim());
    eprintln!("{what} in {}", outdir.display());
    if a.no_import {
        return Ok(());
    }
    let cmdline = std::fs::read_to_string(outdir.join("cmdline")).with_context(|| format!("reading the {what}'s cmdline"))?;
    // The sample is for everybody on the grid (publishing needs an admin).
    let client = a.server.client(ctx, Want::Upload).await?.public(true);
    import(
        ctx,
        &client,
        ImportArgs {
            file: outdir.join("disk.img"),
            name: a.name.unwrap_or_else(|| default_name.to_string()),
            format: Some("raw".into()),
            chunk_size: vgrid_api::DEFAULT_CHUNK_SIZE as u64,
            kernel: Some(outdir.join("vmlinuz")),
            initrd: Some(outdir.join("initrd.img")),
            cmdline: Some(cmdline.trim().to_string()),
            os: "linux".into(),
            arch: "x86_64".into(),
            public: true,
            server: ServerArg { image_server: a.server.image_server },
        },
    )
    .await?;
    Ok(())
}

fn tempdir_path() -> PathBuf {
    std::env::temp_dir().join(format!("vgrid-build-{}", std::process::id()))
}

/// `vgrid image pull`: asks the host agent to stage an image, showing its progress.
async fn pull(ctx: &Ctx, image: &str) -> anyhow::Result<()> {
    let r: ImageRef = image.parse()?;
    let api = ctx.api();
    if api.token().is_none() {
        crate::auth::login(&api, None, None).await?;
    }
    let resp = api
        .request(reqwest::Method::POST, &format!("/host/v1/pull/{r}"))
        .send()
        .await
        .map_err(|e| anyhow!("cannot reach the host agent at {}: {e}", api.base()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<vgrid_api::ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
        bail!("{msg} (HTTP {})", status.as_u16());
    }
    let pb = Progress::bytes(ctx.json, 0, &format!("pulling {r}"));
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last: Option<PullProgress> = None;
    while let Some(b) = stream.next().await {
        buf.extend_from_slice(&b.context("reading pull progress")?);
        while let Some(i) = buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let p: PullProgress = serde_json::from_slice(&line).context("malformed pull progress line")?;
            if let Some(e) = &p.error {
                pb.finish_and_clear();
                bail!("pulling {r}: {e}");
            }
            pb.set_length(p.total);
            pb.set_position(p.done);
            last = Some(p);
        }
    }
    pb.finish_and_clear();
    let p = last.ok_or_else(|| anyhow!("pulling {r}: the host agent closed the connection without a result"))?;
    if !p.finished {
        bail!("pulling {r}: interrupted at {} of {}", bytes(p.done), bytes(p.total));
    }
    if ctx.json {
        print_json(&p)?;
    } else {
        println!(
            "pulled {}: {} staged, {} fetched from image servers in {:.1}s",
            p.image.clone().unwrap_or_else(|| r.to_string()),
            bytes(p.total),
            bytes(p.fetched_bytes),
            p.seconds
        );
    }
    Ok(())
}

/// `vgrid image cache stats`: the host chunk cache's counters, from the host agent.
async fn cache_stats(ctx: &Ctx) -> anyhow::Result<()> {
    let s: serde_json::Value = ctx.api().get("/host/v1/cache/stats").await?;
    if ctx.json {
        return print_json(&s);
    }
    let n = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let (hits, misses) = (n("hits"), n("misses"));
    let ratio = if hits + misses == 0 { 0.0 } else { 100.0 * hits as f64 / (hits + misses) as f64 };
    println!("cache:          {} of {} in {} chunks", bytes(n("bytes_cached")), bytes(n("max_bytes")), n("chunks_cached"));
    println!("hits / misses:  {hits} / {misses} ({ratio:.1}% hits), {} coalesced", n("coalesced"));
    println!("fetched:        {} in {} fetches ({} failed)", bytes(n("bytes_fetched")), n("fetches"), n("fetch_errors"));
    println!(
        "fetch latency:  mean {:.2} ms, p50 < {:.2} ms, p99 < {:.2} ms",
        f("fetch_latency_mean_ms"),
        f("fetch_latency_p50_ms"),
        f("fetch_latency_p99_ms")
    );
    println!("evictions:      {} ({} because the cache's file system was full)", n("evictions"), n("disk_full_evictions"));
    println!("prefetched:     {} chunks", n("prefetched"));
    println!("corrupt chunks: {} dropped, {} found at start still being checked", n("verify_failures"), n("unverified"));
    println!(
        "waits:          {} fetches waited for image servers (longest {:.1} s), {} waiting now",
        n("fetch_waits"),
        n("longest_wait_ms") as f64 / 1000.0,
        n("waiting_now")
    );
    for w in s.get("waiting").and_then(|v| v.as_array()).into_iter().flatten() {
        let t = |k: &str| w.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let servers: Vec<&str> = w.get("servers").and_then(|v| v.as_array()).into_iter().flatten().filter_map(|v| v.as_str()).collect();
        println!(
            "  waiting:      {} chunk {} for {:.0} s on {}: {}",
            t("image"),
            w.get("chunk").and_then(|v| v.as_u64()).unwrap_or(0),
            w.get("waiting_ms").and_then(|v| v.as_u64()).unwrap_or(0) as f64 / 1000.0,
            servers.join(", "),
            t("error")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_names_the_recipes_cache_directories() {
        let h = out_help();
        let sample = BUILD_SAMPLE.lines().find_map(|l| l.strip_prefix("LAYOUT=")).unwrap();
        assert!(h.contains(&format!("/sample-guest-v{sample} ")), "{h}");
        assert!(!h.contains("-v?"), "{h}");
    }
}
