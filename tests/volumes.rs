//! Volumes (the data servers' role): the user's data on the image servers, attached to real
//! guests as virtio disks through the hosts' block proxies, written on one host and read back
//! byte-exact on another; one writer at a time; commits while running, at stop and after the
//! host agent was SIGKILLed; a volume outlives its VM; it follows its VM through a suspend,
//! a resume on another host and a live migration. Separate role processes (a coordinator, an
//! image server, two host agents).
mod common;
use common::api_get;
use common::grid::{console_has_line, console_log, console_until, type_on_console, RoleGrid as Grid};
use std::time::Duration;

/// What the writer puts on the volume, at byte offset `SEEK * 512` (past the first chunk: the
/// read-back must come through a chunk the volume did not have before).
const PAYLOAD: &str = "vgrid-volume-payload-42";
const SEEK: u64 = 2048;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_volume_written_on_one_host_is_read_back_byte_exact_on_another() {
    let mut g = Grid::start(&["h1", "h2"]);
    let is = g._server.url.clone();
    let o = g.cli(&["volume", "create", "data", "--size", "64M", "--image-server", &is]);
    assert!(o.status.success(), "volume create: {}", stderr(&o));
    // Its name is a volume's now: an image import over it is refused, and so is a second create.
    let o = g.cli(&["volume", "create", "data", "--size", "1M", "--image-server", &is]);
    assert!(!o.status.success() && stderr(&o).contains("exists already"), "{o:?}");

    let v = g.run_with("host.name == \"h1\"", "writer", &["--volume", "data,serial=vol-data"]);
    let id = v["id"].as_str().unwrap().to_string();
    let dir = g.runtime_dir("h1", &id);
    type_on_console(&dir, "ls /dev/disk/by-id/ 2>/dev/null; cat /sys/block/vdb/serial; echo; echo serial-listed");
    g.wait_until("the serial to print", Duration::from_secs(60), || console_has_line(&dir, "serial-listed"));
    assert!(common::grid::console_log(&dir).contains("vol-data"), "{}", common::grid::console_log(&dir));
    type_on_console(&dir, &format!("printf '{PAYLOAD}\\n' | dd of=/dev/vdb bs=512 seek={SEEK} conv=sync && sync && echo wrote-volume"));
    g.wait_until("the write to the volume", Duration::from_secs(60), || console_has_line(&dir, "wrote-volume"));

    // One writer: a second read-write attach is refused with the holder's name, and so is
    // removing the volume; a read-only attach of the committed version is not.
    let o = g.cli(&["vm", "run", "sample", "--name", "second", "--volume", "data", "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains("attached read-write to VM writer"), "{o:?}");
    let o = g.cli(&["volume", "rm", "data"]);
    assert!(!o.status.success() && stderr(&o).contains("writer"), "{o:?}");
    let ls = g.json(&["volume", "ls"]);
    assert_eq!(ls[0]["attached_rw"], "writer", "{ls}");

    // The agent dies with the write uncommitted; the next one adopts the guest, and the write
    // is committed from its overlay.
    g.host("h1").kill();
    g.start_host("h1");
    g.wait_registered(2);
    g.wait_until("the writer to be running again", Duration::from_secs(60), || g.json(&["vm", "show", "writer"])["state"] == "running");
    let c = g.json(&["volume", "commit", "data"]);
    assert_eq!(c["volume"], "data@2", "{c}");
    assert!(c["chunks_changed"].as_u64().unwrap() >= 1, "{c}");
    // Nothing new since: no new version.
    let c = g.json(&["volume", "commit", "data"]);
    assert_eq!(c["volume"], "data@2", "{c}");
    assert_eq!(c["chunks_changed"], 0, "{c}");

    // A warm image of a VM with volumes would not hold their data: refused.
    let o = g.cli(&["image", "snapshot", "writer", "--name", "writer-warm"]);
    assert!(!o.status.success() && stderr(&o).contains("cannot be saved as a warm image"), "{o:?}");

    // A second write, committed at stop; the VM goes, the volume stays.
    type_on_console(
        &dir,
        &format!("printf 'second-{PAYLOAD}\\n' | dd of=/dev/vdb bs=512 seek={} conv=sync && sync && echo wrote-again", SEEK + 8),
    );
    g.wait_until("the second write", Duration::from_secs(60), || console_has_line(&dir, "wrote-again"));
    let o = g.cli(&["vm", "stop", "writer"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    let o = g.cli(&["vm", "rm", "writer"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    let show = g.json(&["volume", "show", "data"]);
    assert_eq!(show["versions"], serde_json::json!([1, 2, 3]), "{show}");
    assert!(show.get("attached_rw").is_none(), "{show}");

    // Byte-exact on the image server: export the volume and read the two blocks.
    let out = g.dir.path().join("data.raw");
    let o = g.cli(&["volume", "export", "data", out.to_str().unwrap(), "--image-server", &is]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    let raw = std::fs::read(&out).unwrap();
    assert_eq!(raw.len(), 64 << 20);
    let block = |n: u64| raw[(n * 512) as usize..(n * 512 + 512) as usize].to_vec();
    let mut want = format!("{PAYLOAD}\n").into_bytes();
    want.resize(512, 0);
    assert_eq!(block(SEEK), want);
    let mut want2 = format!("second-{PAYLOAD}\n").into_bytes();
    want2.resize(512, 0);
    assert_eq!(block(SEEK + 8), want2);
    assert!(raw[..(SEEK * 512) as usize].iter().all(|&b| b == 0), "bytes before the write changed");

    // Read back in a guest on the other host, read-only.
    let v = g.run_with("host.name == \"h2\"", "reader", &["--volume", "data:ro"]);
    let rid = v["id"].as_str().unwrap().to_string();
    let rdir = g.runtime_dir("h2", &rid);
    type_on_console(&rdir, &format!("dd if=/dev/vdb bs=512 skip={SEEK} count=1 2>/dev/null | head -n 1"));
    g.wait_until("the read-back on h2", Duration::from_secs(60), || console_has_line(&rdir, PAYLOAD));
    // A snapshot is an immutable, named copy: attached read-only only.
    let s = g.json(&["volume", "snapshot", "data", "data-snap"]);
    assert_eq!(s["snapshot_of"], "data@3", "{s}");
    let o = g.cli(&["vm", "run", "sample", "--name", "snapwriter", "--volume", "data-snap", "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains("snapshot"), "{o:?}");
    // Wrong kinds are named.
    let o = g.cli(&["vm", "run", "sample", "--name", "x", "--volume", "sample", "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains("is an image, not a volume"), "{o:?}");
    let o = g.cli(&["vm", "run", "sample", "--name", "x", "--volume", "nosuch", "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains("nosuch"), "{o:?}");
    let o = g.cli(&["vm", "rm", "--force", "reader"]);
    assert!(o.status.success(), "rm reader: {}", stderr(&o));
    let o = g.cli(&["volume", "rm", "data-snap"]);
    assert!(o.status.success(), "rm snapshot: {}", stderr(&o));
}

/// The image server SIGKILLed while a commit is due: the commit (and a suspend, which commits
/// first) fails with an error naming the image server (the volume), the guest runs on, the last
/// committed version is intact; the image server restarted (on another port), the retried
/// commit publishes the write, byte-exact.
#[test]
fn a_commit_while_the_image_server_is_down_fails_clearly_and_succeeds_once_it_is_back() {
    let mut g = Grid::start(&["h1"]);
    let is = g._server.url.clone();
    let o = g.cli(&["volume", "create", "logs", "--size", "8M", "--image-server", &is]);
    assert!(o.status.success(), "volume create: {}", stderr(&o));
    let v = g.run_with("", "logger", &["--volume", "logs"]);
    let id = v["id"].as_str().unwrap().to_string();
    let dir = g.runtime_dir("h1", &id);
    type_on_console(&dir, &format!("printf '{PAYLOAD}\\n' | dd of=/dev/vdb bs=512 seek=16 conv=sync && sync && echo wrote-logs"));
    g.wait_until("the write to the volume", Duration::from_secs(60), || console_has_line(&dir, "wrote-logs"));

    g._server.kill();
    let o = g.cli(&["volume", "commit", "logs"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("image server"), "a commit without an image server: {o:?}");
    assert_eq!(g.json(&["vm", "show", "logger"])["state"], "running");
    // A suspend (which composes the disk over base chunks the guest's ranged reads may have
    // left partial, and commits the volume) fails cleanly too, at once, naming the cause.
    let o = g.cli(&["vm", "suspend", "logger"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && (e.contains("volume logs") || e.contains("image servers are needed")),
        "a suspend without an image server: {o:?}"
    );
    assert!(e.contains("unreachable"), "{e}");
    assert_eq!(g.json(&["vm", "show", "logger"])["state"], "running");
    type_on_console(&dir, "echo still-running");
    g.wait_until("the guest to answer after the failed commit", Duration::from_secs(60), || console_has_line(&dir, "still-running"));

    g.restart_image_server();
    let new_url = g._server.url.clone();
    g.wait_until("the image server to register again", Duration::from_secs(60), || {
        String::from_utf8_lossy(&api_get(&g.coordinator.url, "/api/v1/image-servers")).contains(&new_url)
    });
    let mut committed = serde_json::Value::Null;
    g.wait_until("the retried commit", Duration::from_secs(60), || {
        let o = g.cli(&["--json", "volume", "commit", "logs"]);
        if o.status.success() {
            committed = serde_json::from_slice(&o.stdout).unwrap();
        }
        o.status.success()
    });
    assert_eq!(committed["volume"], "logs@2", "{committed}");
    let out = g.dir.path().join("logs.raw");
    let o = g.cli(&["volume", "export", "logs@1", out.to_str().unwrap(), "--image-server", &new_url]);
    assert!(o.status.success(), "export v1: {}", stderr(&o));
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0), "version 1 changed");
    let o = g.cli(&["volume", "export", "logs", out.to_str().unwrap(), "--image-server", &new_url]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    let raw = std::fs::read(&out).unwrap();
    let mut want = format!("{PAYLOAD}\n").into_bytes();
    want.resize(512, 0);
    assert_eq!(&raw[16 * 512..17 * 512], &want[..]);
    let o = g.cli(&["vm", "rm", "--force", "logger"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
}

/// Reads block `n` of the guest's /dev/vdb from the disk, not the guest's page cache (dropped
/// first: what it held before a suspend or a migration proves nothing).
fn read_block_cmd(n: u64) -> String {
    format!("sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=512 skip={n} count=1 2>/dev/null | head -n 1")
}

/// Writes `text` and a newline as block `n` of the guest's /dev/vdb (through a file: `dd` may
/// read a pipe short and pad the rest of the block with zeros), synced.
fn write_block_cmd(text: &str, n: u64) -> String {
    format!("printf '{text}\\n' > /tmp/blk && dd if=/tmp/blk of=/dev/vdb bs=512 seek={n} conv=sync 2>/dev/null && sync")
}

/// Block `n` of the raw volume in `raw`, and the 512-byte block a `printf 'TEXT\n' | dd
/// conv=sync` writes.
fn block(raw: &[u8], n: u64) -> &[u8] {
    &raw[(n * 512) as usize..(n * 512 + 512) as usize]
}

fn written(text: &str) -> Vec<u8> {
    let mut b = format!("{text}\n").into_bytes();
    b.resize(512, 0);
    b
}

/// It follows its VM: a write on h1; a live migration to h2 (the volume's overlay mirrored
/// with the root disk's) reads it back from the disk; a second write on h2, `vm suspend` (the
/// volume committed, the VM keeps the claim: a read-write attach elsewhere is refused naming
/// it), `vm resume --host h1` reads both back; a third write, a live migration to h2 reads all
/// three back; `vm stop` commits everything, and the sources of the migrations committed
/// nothing (fenced, and told so).
#[test]
fn a_volume_follows_its_vm_through_live_migration_and_suspend_resume() {
    const SEEK2: u64 = 8192;
    const SEEK3: u64 = 16384;
    let g = Grid::start(&["h1", "h2"]);
    let is = g._server.url.clone();
    let o = g.cli(&["volume", "create", "mobile", "--size", "64M", "--image-server", &is]);
    assert!(o.status.success(), "volume create: {}", stderr(&o));
    let v = g.run_with("host.name == \"h1\"", "mover", &["--volume", "mobile"]);
    let id = v["id"].as_str().unwrap().to_string();
    let dir = g.runtime_dir("h1", &id);
    console_until(&g, &dir, &format!("{} && echo w1-$((1+1))", write_block_cmd(PAYLOAD, SEEK)), "w1-2");

    // Live migration to h2: the volume's uncommitted write travels with it.
    let m = g.json(&["vm", "migrate", "mover", "--to", "h2", "--timeout", "240"]);
    assert_eq!((m["migration"]["status"].as_str(), m["host"].as_str()), (Some("completed"), Some("h2")), "{m}");
    let dir2 = g.runtime_dir("h2", &id);
    console_until(&g, &dir2, &format!("{}; echo r1-$((20+1))", read_block_cmd(SEEK)), "r1-21");
    assert!(console_has_line(&dir2, PAYLOAD), "{}", console_log(&dir2));
    assert_eq!(g.json(&["volume", "show", "mobile"])["versions"], serde_json::json!([1]), "the migration committed a version");
    let second = format!("second-{PAYLOAD}");
    console_until(&g, &dir2, &format!("{} && echo w2-$((2+2))", write_block_cmd(&second, SEEK2)), "w2-4");

    // Suspend: the volume's writes are committed as its version 2; the VM keeps the claim.
    let s = g.json(&["vm", "suspend", "mover"]);
    assert_eq!(s["vm"]["state"], "suspended", "{s}");
    let show = g.json(&["volume", "show", "mobile"]);
    assert_eq!((show["versions"].clone(), show["attached_rw"].clone()), (serde_json::json!([1, 2]), "mover".into()), "{show}");
    let o = g.cli(&["vm", "run", "sample", "--name", "thief", "--volume", "mobile", "--no-wait"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("attached read-write to VM mover") && e.contains("suspended"), "{o:?}");
    let c = g.json(&["volume", "commit", "mobile"]);
    assert_eq!((c["volume"].as_str(), c["chunks_changed"].as_u64()), (Some("mobile@2"), Some(0)), "{c}");

    // Resumed on h1: the guest reads both writes from the disk.
    let r = g.json(&["vm", "resume", "mover", "--host", "h1", "--timeout", "300"]);
    assert_eq!((r["state"].as_str(), r["host"].as_str()), (Some("running"), Some("h1")), "{r}");
    let dir1 = g.runtime_dir("h1", &id);
    console_until(&g, &dir1, &format!("{}; {}; echo r2-$((30+3))", read_block_cmd(SEEK), read_block_cmd(SEEK2)), "r2-33");
    assert!(console_has_line(&dir1, PAYLOAD) && console_has_line(&dir1, &second), "{}", console_log(&dir1));

    let third = format!("third-{PAYLOAD}");
    console_until(&g, &dir1, &format!("{} && echo w3-$((3+3))", write_block_cmd(&third, SEEK3)), "w3-6");

    // The resumed VM migrates live again, to h2: all three read back from the disk there.
    let m = g.json(&["vm", "migrate", "mover", "--to", "h2", "--timeout", "240"]);
    assert_eq!((m["migration"]["status"].as_str(), m["host"].as_str()), (Some("completed"), Some("h2")), "{m}");
    let reads = [SEEK, SEEK2, SEEK3].map(read_block_cmd).join("; ");
    console_until(&g, &dir2, &format!("{reads}; echo r3-$((40+4))"), "r3-44");
    // (A console of its own: the one of its first stay on h2 went at the resume.)
    assert!(!console_has_line(&dir2, "r1-21"), "h2's console log is the old one: {}", console_log(&dir2));
    for line in [PAYLOAD, &second, &third] {
        assert!(console_has_line(&dir2, line), "{line} not read back on h2: {}", console_log(&dir2));
    }

    // Stopped on h2: one more version holds the third write; h1 and h2, each the source of a
    // migration, committed nothing then and kept nothing.
    let o = g.cli(&["vm", "stop", "mover"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    let show = g.json(&["volume", "show", "mobile"]);
    assert_eq!(show["versions"], serde_json::json!([1, 2, 3]), "{show}");
    assert!(show.get("attached_rw").is_none(), "{show}");
    for h in ["h1", "h2"] {
        assert!(!g.host_dir(h).join("volumes-pending").exists(), "{h} kept a volume overlay it could not commit");
    }
    let out = g.dir.path().join("mobile.raw");
    let o = g.cli(&["volume", "export", "mobile", out.to_str().unwrap(), "--image-server", &is]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    let raw = std::fs::read(&out).unwrap();
    assert_eq!(block(&raw, SEEK), &written(PAYLOAD)[..]);
    assert_eq!(block(&raw, SEEK2), &written(&second)[..]);
    assert_eq!(block(&raw, SEEK3), &written(&third)[..]);
    let o = g.cli(&["vm", "rm", "mover"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    let o = g.cli(&["vm", "run", "sample", "--name", "thief", "--volume", "mobile", "--no-wait"]);
    assert!(o.status.success(), "a read-write attach once the VM is gone: {}", stderr(&o));
    let o = g.cli(&["vm", "rm", "--force", "thief"]);
    assert!(o.status.success(), "rm thief: {}", stderr(&o));
}

/// Explicit staging: `vm run --stage-in` places a file and a directory in the guest before it
/// starts; `--stage-out` waits for the power-off (`vm stop`: the ACPI button) and collects a
/// file the guest computed and the directory it changed, byte-exact; the staging volume is
/// gone afterwards. Bad input (a missing LOCAL, a relative guest path, an output directory that
/// does not exist) is refused before anything is created.
#[test]
fn staging_places_inputs_before_boot_and_collects_outputs_after_power_off() {
    let g = Grid::start(&["h1"]);
    let d = g.dir.path();
    std::fs::write(d.join("a.txt"), "staged-a-content\n").unwrap();
    std::fs::create_dir_all(d.join("dir/sub")).unwrap();
    std::fs::write(d.join("dir/b.txt"), "staged-b-content\n").unwrap();
    let bin: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(d.join("dir/sub/c.bin"), &bin).unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();

    // Bad input: refused before a volume or a VM exists, naming the path.
    let o = g.cli(&["vm", "run", "sample", "--name", "bad", "--stage-in", &format!("{}:/root/x", p("nosuch.txt")), "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains("nosuch.txt"), "{o:?}");
    let o = g.cli(&["vm", "run", "sample", "--name", "bad", "--stage-out", &format!("root/x:{}", p("o")), "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains("must be absolute"), "{o:?}");
    let o = g.cli(&["vm", "run", "sample", "--name", "bad", "--stage-out", &format!("/root/x:{}", p("nodir/x")), "--no-wait"]);
    assert!(!o.status.success() && stderr(&o).contains(&format!("cannot write in {}", p("nodir"))), "{o:?}");
    assert_eq!(g.json(&["volume", "ls"]), serde_json::json!([]));
    assert_eq!(g.json(&["vm", "ls"]), serde_json::json!([]));

    let stage = [
        format!("--stage-in={}:/root/in/a.txt", p("a.txt")),
        format!("--stage-in={}:/root/d", p("dir")),
        format!("--stage-out=/root/out.txt:{}", p("OUT")),
        format!("--stage-out=/root/d:{}", p("OUTDIR")),
    ];
    let (mut run, id, vol) = start_staged(&g, "job", &stage);
    let dir = g.runtime_dir("h1", &id);
    for line in ["vgrid-sample: staged in /root/in/a.txt", "vgrid-sample: staged in /root/d"] {
        assert!(console_has_line(&dir, line), "{line}: {}", console_log(&dir));
    }
    console_until(
        &g,
        &dir,
        "cat /root/in/a.txt /root/d/b.txt; echo $((6*7))-computed > /root/out.txt; echo new > /root/d/new.txt; echo c1-$((5+5))",
        "c1-10",
    );
    for line in ["staged-a-content", "staged-b-content"] {
        assert!(console_has_line(&dir, line), "{line}: {}", console_log(&dir));
    }
    let o = g.cli(&["vm", "stop", "job"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    let status = run.wait().unwrap();
    let said = std::fs::read_to_string(d.join("job.err")).unwrap();
    assert!(status.success(), "vm run with staging: {said}\n{}", console_log(&dir));
    assert!(said.contains(&format!("staging volume {vol}@1")), "{said}");
    assert!(console_has_line(&dir, "vgrid-sample: staged out /root/out.txt"), "{}", console_log(&dir));

    assert_eq!(std::fs::read_to_string(d.join("OUT")).unwrap(), "42-computed\n");
    assert_eq!(std::fs::read_to_string(d.join("OUTDIR/b.txt")).unwrap(), "staged-b-content\n");
    assert_eq!(std::fs::read_to_string(d.join("OUTDIR/new.txt")).unwrap(), "new\n");
    assert!(std::fs::read(d.join("OUTDIR/sub/c.bin")).unwrap() == bin, "c.bin differs after the round trip");
    // The staging volume is gone; the VM stays (stopped) until removed.
    assert_eq!(g.json(&["volume", "ls"]), serde_json::json!([]), "the staging volume {vol} stayed");
    assert_eq!(g.json(&["vm", "show", "job"])["state"], "stopped");
    let o = g.cli(&["vm", "rm", "job"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
}

/// Spawns `vm run sample --name NAME` with the staging arguments `stage` (its stderr in
/// `NAME.err`), waits until the VM runs and its shell prompts. Returns the CLI, the VM's id and
/// the staging volume's name.
fn start_staged(g: &Grid, name: &str, stage: &[String]) -> (std::process::Child, String, String) {
    let _slot = common::boot_slot().unwrap();
    let d = g.dir.path();
    let run = std::process::Command::new(common::vgrid_bin())
        .args(["vm", "run", "sample", "--name", name, "--timeout", "600"])
        .args(stage)
        .env("VGRID_URL", &g.coordinator.url)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(d.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(d.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let mut id = String::new();
    g.wait_until("the staged VM to run", Duration::from_secs(180), || {
        let o = g.cli(&["--json", "vm", "show", name]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        id = v["id"].as_str().unwrap_or_default().to_string();
        v["state"] == "running"
    });
    let ls = g.json(&["volume", "ls"]);
    let vol = ls.as_array().unwrap().iter().find(|v| v["attached_rw"] == name).expect("a staging volume held by the VM");
    let vol = vol["name"].as_str().unwrap().to_string();
    assert!(vol.starts_with(&format!("stage-{name}-")), "{ls}");
    let dir = g.runtime_dir("h1", &id);
    g.wait_until("the guest's prompt", Duration::from_secs(180), || console_log(&dir).contains(common::PROMPT));
    (run, id, vol)
}

/// An output the guest did not leave: `vm run` fails naming the guest path and the staging
/// volume, which is kept (its other outputs can still be read from it).
#[test]
fn staging_names_a_missing_output_and_keeps_the_staging_volume() {
    let g = Grid::start(&["h1"]);
    let out = g.dir.path().join("never");
    let (mut run, _id, vol) = start_staged(&g, "lazy", &[format!("--stage-out=/root/never.txt:{}", out.display())]);
    let o = g.cli(&["vm", "stop", "lazy"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    let status = run.wait().unwrap();
    let said = std::fs::read_to_string(g.dir.path().join("lazy.err")).unwrap();
    assert!(!status.success(), "{said}");
    assert!(said.contains("/root/never.txt") && said.contains(&format!("the staging volume {vol} is kept")), "{said}");
    assert!(!out.exists());
    let show = g.json(&["volume", "show", &vol]);
    assert_eq!(show["versions"], serde_json::json!([1, 2]), "{show}");
    let o = g.cli(&["volume", "rm", &vol]);
    assert!(o.status.success(), "rm {vol}: {}", stderr(&o));
}

/// `vm run --stage-in` without `--stage-out`: the CLI returns once the VM runs; the staging
/// volume stays attached (read-write, the guest copied its inputs at boot) while the VM runs,
/// and the coordinator removes it as soon as the VM has ended. When that removal fails (the
/// image server is down as the VM ends) `vm show` says so in the VM's reason, naming the volume;
/// `vm rm` then removes it.
#[test]
fn a_stage_in_only_staging_volume_goes_when_its_vm_ends() {
    let mut g = Grid::start(&["h1"]);
    let d = g.dir.path().to_path_buf();
    std::fs::write(d.join("in.txt"), "stage-in-only-content\n").unwrap();
    let stage = [format!("--stage-in={}:/root/in.txt", d.join("in.txt").display())];
    let (mut run, id, vol) = start_staged(&g, "once", &stage);
    let status = run.wait().unwrap();
    let said = std::fs::read_to_string(d.join("once.err")).unwrap();
    assert!(status.success() && said.contains(&format!("staging volume {vol}: removed by the coordinator when the VM ends")), "{said}");
    let dir = g.runtime_dir("h1", &id);
    console_until(&g, &dir, "cat /root/in.txt; echo c2-$((5+6))", "c2-11");
    assert!(console_has_line(&dir, "stage-in-only-content"), "{}", console_log(&dir));
    // Running: the volume stays (the VM holds it).
    assert_eq!(g.json(&["volume", "show", &vol])["attached_rw"], "once");
    let o = g.cli(&["vm", "stop", "once"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    g.wait_until("the staging volume to go with its VM", Duration::from_secs(60), || g.json(&["volume", "ls"]) == serde_json::json!([]));
    let show = g.json(&["vm", "show", "once"]);
    assert_eq!(show["state"], "stopped");
    assert!(!show["reason"].as_str().unwrap_or_default().contains("not removed"), "{show}");

    // The image server is down as the VM ends: the removal fails, and says so.
    let (mut run, _, vol) = start_staged(&g, "twice", &stage);
    assert!(run.wait().unwrap().success());
    g._server.kill();
    let o = g.cli(&["vm", "stop", "twice"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    let mut reason = String::new();
    g.wait_until("the failed removal to be reported", Duration::from_secs(120), || {
        reason = g.json(&["vm", "show", "twice"])["reason"].as_str().unwrap_or_default().to_string();
        reason.contains("was not removed")
    });
    assert!(reason.contains(&format!("staging volume {vol} was not removed")) && reason.contains("vgrid volume rm"), "{reason}");
    // Back: `vm rm` removes it.
    g.restart_image_server();
    g.wait_until("the image server to register again", Duration::from_secs(60), || g.cli(&["volume", "show", &vol]).status.success());
    let o = g.cli(&["vm", "rm", "twice"]);
    assert!(o.status.success() && !stderr(&o).contains("not removed"), "rm: {o:?}");
    assert_eq!(g.json(&["volume", "ls"]), serde_json::json!([]));
    let o = g.cli(&["vm", "rm", "once"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
}
