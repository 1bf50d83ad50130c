//! `vgrid vm run --stage-in LOCAL:GUESTPATH --stage-out GUESTPATH:LOCAL`: explicit staging for
//! batch work through a small staging volume (docs/volumes.md, "Staging"). The CLI builds an
//! ext4 filesystem (label `vgstage`) holding `in/N` (the stage-in items) and the manifest
//! `vgrid-stage`, imports it as a volume attached read-write with serial `vgrid-stage` (the VM's
//! last volume); the guest copies `in/N` to GUESTPATH at boot and each stage-out GUESTPATH to
//! `out/N` before it powers off; the CLI then exports the version committed at the VM's end
//! and extracts `out/N` into LOCAL with debugfs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use vgrid_api::vm::{VmRecord, VmState};
use vgrid_api::volume::{VolumeAttach, VolumeInfo};

use crate::client::HttpError;
use crate::store::ServerArg;
use crate::Ctx;

/// The staging disk's serial, as the guest sees it (`/sys/block/vdX/serial`).
pub const SERIAL: &str = vgrid_api::volume::STAGE_SERIAL;
/// The staging filesystem's label.
pub const LABEL: &str = "vgstage";
/// The manifest's name at the filesystem's root.
pub const MANIFEST: &str = "vgrid-stage";

/// `--stage-in LOCAL:GUESTPATH`.
#[derive(Debug, Clone)]
pub struct StageIn {
    pub local: PathBuf,
    pub guest: String,
}

/// `--stage-out GUESTPATH:LOCAL`.
#[derive(Debug, Clone)]
pub struct StageOut {
    pub guest: String,
    pub local: PathBuf,
}

fn guest_path(p: &str, spec: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("{spec:?}: the guest path {p:?} must be absolute"));
    }
    if p.contains('\n') || p == "/" {
        return Err(format!("{spec:?}: the guest path {p:?} cannot be staged (a newline, or the root)"));
    }
    Ok(p.to_string())
}

pub fn parse_in(s: &str) -> Result<StageIn, String> {
    // The guest path is absolute: the last ":/" splits (a local path may hold ':').
    let (local, guest) = s.rsplit_once(":/").ok_or_else(|| format!("{s:?}: expected LOCAL:GUESTPATH, GUESTPATH absolute"))?;
    if local.is_empty() {
        return Err(format!("{s:?}: the local path is empty"));
    }
    Ok(StageIn { local: PathBuf::from(local), guest: guest_path(&format!("/{guest}"), s)? })
}

pub fn parse_out(s: &str) -> Result<StageOut, String> {
    let (guest, local) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected GUESTPATH:LOCAL"))?;
    if local.is_empty() {
        return Err(format!("{s:?}: the local path is empty"));
    }
    Ok(StageOut { guest: guest_path(guest, s)?, local: PathBuf::from(local) })
}

/// The staging of one `vm run`, checked before anything is created.
pub struct Plan {
    pub ins: Vec<StageIn>,
    pub outs: Vec<StageOut>,
    /// Room for the outputs (and the inputs' copies' slack), bytes.
    pub extra: u64,
}

fn need_tool(tool: &str, why: &str) -> anyhow::Result<()> {
    match Command::new(tool).arg("-V").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("staging needs {tool} ({why}): install e2fsprogs (apt-get install e2fsprogs)")
        }
        Err(e) => bail!("staging needs {tool} ({why}): cannot run it: {e}"),
    }
}

/// Bytes under `p` (a file, or a directory's files), and how many entries.
fn usage(p: &Path) -> std::io::Result<(u64, u64)> {
    let md = std::fs::symlink_metadata(p)?;
    if !md.is_dir() {
        return Ok((md.len(), 1));
    }
    let (mut b, mut n) = (0, 1);
    for e in std::fs::read_dir(p)? {
        let (eb, en) = usage(&e?.path())?;
        b += eb;
        n += en;
    }
    Ok((b, n))
}

impl Plan {
    /// Checks every path: each LOCAL of a stage-in exists; each LOCAL of a stage-out is a new
    /// path (or a file to replace) in a writable directory; the tools are installed.
    pub fn check(&self) -> anyhow::Result<()> {
        for i in &self.ins {
            std::fs::metadata(&i.local)
                .with_context(|| format!("--stage-in {}:{}: cannot read {}", i.local.display(), i.guest, i.local.display()))?;
        }
        for o in &self.outs {
            let what = format!("--stage-out {}:{}", o.guest, o.local.display());
            if o.local.is_dir() {
                bail!("{what}: {} is an existing directory (stage-out writes a new file or directory there)", o.local.display());
            }
            let parent = parent_of(&o.local);
            let probe = parent.join(format!(".vgrid-stage-probe-{:08x}", rand::random::<u32>()));
            std::fs::write(&probe, b"").with_context(|| format!("{what}: cannot write in {}", parent.display()))?;
            let _ = std::fs::remove_file(&probe);
        }
        need_tool("mkfs.ext4", "to build the staging filesystem")?;
        if !self.outs.is_empty() {
            need_tool("debugfs", "to read the guest's outputs")?;
        }
        Ok(())
    }

    /// Builds the staging filesystem in `work` (a fresh directory): `work/stage.img`.
    pub fn build(&self, work: &Path) -> anyhow::Result<PathBuf> {
        let root = work.join("root");
        std::fs::create_dir_all(root.join("in"))?;
        std::fs::create_dir_all(root.join("out"))?;
        let mut manifest = String::new();
        let (mut bytes, mut entries) = (0u64, 0u64);
        for (n, i) in self.ins.iter().enumerate() {
            let to = root.join("in").join(n.to_string());
            let st = Command::new("cp")
                .arg("-a")
                .arg("--reflink=auto")
                .arg(&i.local)
                .arg(&to)
                .status()
                .with_context(|| format!("copying {} for staging", i.local.display()))?;
            if !st.success() {
                bail!("--stage-in {}:{}: copying {} failed ({st})", i.local.display(), i.guest, i.local.display());
            }
            let (b, e) = usage(&to)?;
            bytes += b;
            entries += e;
            manifest.push_str(&format!("in {n} {}\n", i.guest));
        }
        for (n, o) in self.outs.iter().enumerate() {
            manifest.push_str(&format!("out {n} {}\n", o.guest));
        }
        std::fs::write(root.join(MANIFEST), manifest)?;
        // The inputs (each file rounded up to a block, plus its inode), the room for outputs, and
        // the filesystem's own (journal, tables).
        let size = (bytes + entries * 8192 + self.extra + (16 << 20)).div_ceil(1 << 20);
        let img = work.join("stage.img");
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", LABEL, "-d"])
            .arg(&root)
            .arg(&img)
            .arg(format!("{size}M"))
            .output()
            .context("running mkfs.ext4")?;
        if !o.status.success() {
            bail!("mkfs.ext4 of the staging filesystem ({size} MiB) failed: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(img)
    }
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The staging volume's name: `stage-<vm name>-<random>` (valid as a volume name).
pub fn volume_name(vm: Option<&str>) -> String {
    let base: String = vm.unwrap_or("vm").chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).take(40).collect();
    format!("stage-{base}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Builds and imports the staging volume `name`; the attachment to add to the VM (its last).
/// `remove_with_vm`: the coordinator removes it once the VM has ended (a run without
/// `--stage-out` and without `--keep-stage`: the CLI is not there any more by then).
pub async fn prepare(ctx: &Ctx, server: &ServerArg, plan: &Plan, name: &str, remove_with_vm: bool) -> anyhow::Result<VolumeAttach> {
    let work = tempdir("vgrid-stage")?;
    let r = async {
        let img = plan.build(&work)?;
        crate::volume::import(ctx, server, name, &img).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    let m = r?;
    if !ctx.json {
        eprintln!(
            "staging volume {} ({}, {} in, {} out)",
            m.image_ref(),
            crate::output::bytes(m.disk.size),
            plan.ins.len(),
            plan.outs.len()
        );
    }
    Ok(VolumeAttach { name: name.to_string(), version: None, readonly: false, serial: Some(SERIAL.into()), epoch: None, remove_with_vm })
}

fn tempdir(prefix: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("{prefix}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Removes the staging volume `name`; on failure says it is kept.
pub async fn remove(ctx: &Ctx, name: &str) {
    if let Err(e) = ctx.api().delete::<serde_json::Value>(&format!("/api/v1/volumes/{name}")).await {
        eprintln!("the staging volume {name} is kept (removing it failed: {e}); remove it with `vgrid volume rm {name}`");
    }
}

/// Waits until VM `id` has powered off and its staging volume's end-of-VM version is committed
/// (a version after `first`). Returns that version.
pub async fn wait_powered_off(ctx: &Ctx, id: &str, name: &str, first: u32, deadline: Instant) -> anyhow::Result<u32> {
    let api = ctx.api();
    let spinner = crate::output::Progress::spinner(ctx.json, format!("{id}: running; waiting for it to power off (stage-out)"));
    let t0 = Instant::now();
    let r = async {
        let mut seen = "running".to_string();
        loop {
            // Long poll: answered when the VM leaves the state seen last (or after 5 s).
            let v: VmRecord = match api.get(&format!("/api/v1/vms/{id}?wait_ms=5000&state={seen}")).await {
                Ok(v) => v,
                Err(e) if HttpError::is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match v.state {
                VmState::Stopped => break,
                VmState::Failed | VmState::Lost => {
                    bail!("VM {id} {} before its outputs could be collected: {}", v.state.as_str(), v.reason.unwrap_or_default())
                }
                s => spinner.set_message(format!(
                    "{id}: {} ({:.0}s); waiting for it to power off (stage-out)",
                    s.as_str(),
                    t0.elapsed().as_secs_f64()
                )),
            }
            seen = v.state.as_str().to_string();
            if Instant::now() > deadline {
                bail!("VM {id} did not power off within --timeout (it keeps running; `vgrid vm stop {id}` powers it off)");
            }
        }
        spinner.set_message(format!("{id}: powered off; waiting for the staging volume's commit"));
        loop {
            let info: VolumeInfo = api.get(&format!("/api/v1/volumes/{name}")).await?;
            if let Some(&last) = info.versions.last().filter(|&&l| l > first) {
                if info.attached_rw.is_none() {
                    return Ok(last);
                }
            }
            if Instant::now() > deadline {
                bail!("VM {id} powered off but its staging volume has no new version within --timeout (its host could not commit it?)");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    .await;
    spinner.finish_and_clear();
    r
}

/// Exports `volume` (NAME@VERSION) and extracts each stage-out's `out/N` into its LOCAL.
pub async fn collect(ctx: &Ctx, server: &ServerArg, volume: &str, outs: &[StageOut]) -> anyhow::Result<()> {
    let work = tempdir("vgrid-stage-out")?;
    let r = async {
        let img = work.join("stage.img");
        crate::volume::export(ctx, server, volume, &img).await?;
        for (n, o) in outs.iter().enumerate() {
            extract(&img, n, o)?;
            if !ctx.json {
                eprintln!("staged out {} to {}", o.guest, o.local.display());
            }
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    r
}

/// `out/N` of the filesystem in `img` to `o.local`: dumped with debugfs next to it, then renamed.
fn extract(img: &Path, n: usize, o: &StageOut) -> anyhow::Result<()> {
    let what = format!("--stage-out {}:{}", o.guest, o.local.display());
    let img = std::fs::canonicalize(img)?;
    let tmp = parent_of(&o.local).join(format!(".vgrid-stage-out-{:08x}", rand::random::<u32>()));
    std::fs::create_dir(&tmp).with_context(|| format!("{what}: cannot create {}", tmp.display()))?;
    let r = (|| {
        // Relative paths only: debugfs splits its request at spaces.
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump out/{n} ."))
            .arg(&img)
            .current_dir(&tmp)
            .output()
            .context("running debugfs")?;
        let got = tmp.join(n.to_string());
        if std::fs::symlink_metadata(&got).is_err() {
            bail!(
                "{what}: the guest left no out/{n} on the staging volume (is {} missing in the guest, or did the guest not \
                 copy its outputs at power-off?) {}",
                o.guest,
                String::from_utf8_lossy(&out.stderr).lines().filter(|l| !l.starts_with("debugfs ")).collect::<Vec<_>>().join("; ")
            );
        }
        if o.local.is_file() {
            std::fs::remove_file(&o.local).with_context(|| format!("{what}: replacing {}", o.local.display()))?;
        }
        std::fs::rename(&got, &o.local).with_context(|| format!("{what}: moving the output to {}", o.local.display()))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r.map_err(|e| anyhow!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_specs_split_at_the_absolute_guest_path() {
        let i = parse_in("a:b.txt:/root/in/a.txt").unwrap();
        assert_eq!((i.local, i.guest.as_str()), (PathBuf::from("a:b.txt"), "/root/in/a.txt"));
        assert!(parse_in("a.txt:root/x").unwrap_err().contains("LOCAL:GUESTPATH"));
        assert!(parse_in(":/x").is_err());
        let o = parse_out("/root/out.txt:res/o:1").unwrap();
        assert_eq!((o.guest.as_str(), o.local), ("/root/out.txt", PathBuf::from("res/o:1")));
        assert!(parse_out("root/out.txt:x").unwrap_err().contains("must be absolute"));
        assert!(parse_out("/:x").is_err());
        let n = volume_name(Some("job 1"));
        assert!(n.starts_with("stage-job1-") && vgrid_api::manifest::validate_name(&n).is_ok(), "{n}");
    }

    /// The filesystem the CLI builds (read back with debugfs), and an `out/N` directory
    /// extracted into a new local path. Skipped without e2fsprogs.
    #[test]
    fn the_staging_filesystem_holds_the_manifest_and_outputs_extract_byte_exact() {
        if need_tool("mkfs.ext4", "").is_err() || need_tool("debugfs", "").is_err() {
            eprintln!("skipped: no e2fsprogs");
            return;
        }
        let t = tempdir("vgrid-stage-test").unwrap();
        std::fs::write(t.join("a.txt"), "a\n").unwrap();
        let plan = Plan {
            ins: vec![StageIn { local: t.join("a.txt"), guest: "/root/my a.txt".into() }],
            outs: vec![StageOut { guest: "/root/res".into(), local: t.join("res") }],
            extra: 1 << 20,
        };
        plan.check().unwrap();
        let work = t.join("work");
        std::fs::create_dir(&work).unwrap();
        let img = plan.build(&work).unwrap();
        let cat = |path: &str| {
            let o = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(&img).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        assert_eq!(cat(MANIFEST), "in 0 /root/my a.txt\nout 0 /root/res\n");
        assert_eq!(cat("in/0"), "a\n");
        // What a guest leaves: out/0, a directory.
        let root = t.join("guest");
        std::fs::create_dir_all(root.join("out/0/sub")).unwrap();
        let bin: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(root.join("out/0/sub/r.bin"), &bin).unwrap();
        let left = t.join("left.img");
        assert!(Command::new("mkfs.ext4").args(["-q", "-d"]).arg(&root).arg(&left).arg("8M").status().unwrap().success());
        extract(&left, 0, &plan.outs[0]).unwrap();
        assert_eq!(std::fs::read(t.join("res/sub/r.bin")).unwrap(), bin);
        let e = extract(&left, 1, &StageOut { guest: "/root/none".into(), local: t.join("none") }).unwrap_err();
        assert!(e.to_string().contains("left no out/1") && e.to_string().contains("/root/none"), "{e}");
        std::fs::remove_dir_all(&t).unwrap();
    }
}
