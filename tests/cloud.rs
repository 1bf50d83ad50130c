//! Stock cloud images (issue 17 item 4): a Debian image with cloud-init and no password
//! anywhere (`scripts/build-debian-guest.sh --cloud`) boots with `vm run --ssh-key --user-data
//! --hostname`, picks up the NoCloud seed vgrid writes, and `vgrid vm ssh` logs in through the
//! coordinator and the host, as root and as the image's own user. After a suspend and a resume
//! the seed is there again and the guest is the same instance: same hostname, same ssh host key
//! (the known_hosts entry still matches), cloud-init did not start over. Skips, saying so, when
//! the cloud guest is not built (about 8 minutes; `VGRID_DEBIAN_GUEST=1` builds it).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{boot_slot, vgrid_bin, Up};

const BOOTED: &str = "vgrid-debian: booted";

fn cloud_guest() -> Option<common::SampleGuest> {
    let g = vgrid_hostagent::testkit::debian_cloud_guest().unwrap();
    if g.is_none() {
        eprintln!("skipped: the cloud guest is not built; run scripts/build-debian-guest.sh --cloud or set VGRID_DEBIAN_GUEST=1");
    }
    g
}

/// `vgrid vm ssh VM -i KEY -l USER -- -o BatchMode=yes CMD`.
fn ssh(up: &Up, key: &std::path::Path, vm: &str, user: &str, cmd: &str) -> Output {
    Command::new(vgrid_bin())
        .args(["vm", "ssh", vm, "-i", key.to_str().unwrap(), "-l", user, "--", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", cmd])
        .env("VGRID_URL", &up.url)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `ssh` until it succeeds (sshd may start a little after the marker), at most `timeout`.
fn ssh_ok(up: &Up, key: &std::path::Path, vm: &str, user: &str, cmd: &str, timeout: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let o = ssh(up, key, vm, user, cmd);
        if o.status.success() {
            return String::from_utf8_lossy(&o.stdout).trim().to_string();
        }
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(t0.elapsed() < timeout, "vm ssh {vm} -l {user} -- {cmd}: {err}\n{}", up.log_tail());
        // A changed host key is never retried: the same instance must keep its keys.
        assert!(!err.contains("IDENTIFICATION HAS CHANGED"), "{err}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn a_stock_cloud_image_takes_its_key_hostname_and_user_data_and_vm_ssh_logs_in() {
    let Some(g) = cloud_guest() else { return };
    let up = Up::start();
    let mut import = common::import_args(&g, "debian-cloud");
    import.push("--public");
    up.ok(&import);
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("id_ed25519");
    let o = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f"]).arg(&key).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let user_data = keys.path().join("user-data");
    std::fs::write(&user_data, "#cloud-config\ndisable_root: false\nruncmd:\n  - [sh, -c, 'echo user-data ran > /run/vgrid-user-data']\n")
        .unwrap();

    // Refused before anything starts: a private key is no public key; a bad hostname is named.
    let o = up.cli(&["vm", "run", "debian-cloud", "--ssh-key", key.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown key type"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = up.cli(&["vm", "run", "debian-cloud", "--hostname", "Not_A_Host"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid hostname \"Not_A_Host\""), "{}", String::from_utf8_lossy(&o.stderr));

    let pubkey = format!("{}.pub", key.display());
    let extra = ["--ssh-key", &pubkey, "--user-data", user_data.to_str().unwrap(), "--hostname", "web-7", "--memory", "512"];
    let v = {
        let _slot = boot_slot().unwrap();
        let mut last = String::new();
        let mut rec = None;
        for name in ["cloud1", "cloud1-retry"] {
            let mut args = vec!["--json", "vm", "run", "debian-cloud", "--name", name, "--wait-for", BOOTED, "--timeout", "900"];
            args.extend_from_slice(&extra);
            let o = up.cli(&args);
            if o.status.success() {
                rec = Some(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap());
                break;
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            let _ = up.cli(&["vm", "rm", "--force", name]);
        }
        rec.unwrap_or_else(|| panic!("the cloud guest did not boot twice: {last}"))
    };
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["config"]["cloud_init"]["hostname"], "web-7", "{v}");
    let console = std::fs::read_to_string(up.runtime_dir(&id).join("console.log")).unwrap_or_default();
    assert!(!console.contains("login: root (automatic login)"), "a stock image has no automatic login");

    let t = Duration::from_secs(300);
    assert_eq!(ssh_ok(&up, &key, &id, "root", "hostname", t), "web-7");
    assert_eq!(ssh_ok(&up, &key, &id, "root", "cat /run/vgrid-user-data", t), "user-data ran");
    assert_eq!(ssh_ok(&up, &key, &id, "debian", "id -un", t), "debian", "the image's own user takes the key too");
    let instance = ssh_ok(&up, &key, &id, "root", "cat /var/lib/cloud/data/instance-id", t);
    assert_eq!(instance, format!("vgrid-{id}"));
    // A key the VM was not given gets in nowhere.
    let other = keys.path().join("other");
    Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other).output().unwrap();
    let o = ssh(&up, &other, &id, "root", "true");
    assert!(!o.status.success(), "another key logged in");
    let cfg = std::env::var_os("VGRID_CONFIG_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(
            std::env::var_os("XDG_CONFIG_HOME").unwrap_or_else(|| format!("{}/.config", std::env::var("HOME").unwrap()).into()),
        )
        .join("vgrid")
    });
    // Remembered under the VM's alias (hashed or not, as the user's ssh_config says).
    let o = Command::new("ssh-keygen").args(["-F", &format!("vgrid-{id}"), "-f"]).arg(cfg.join("known_hosts")).output().unwrap();
    assert!(o.status.success() && !o.stdout.is_empty(), "no known_hosts entry for vgrid-{id}");

    // Suspend and resume: the seed is written again on the host that resumes it; the guest
    // keeps its identity (the known_hosts entry from before still matches).
    let s = up.json(&["vm", "suspend", &id]);
    assert_eq!(s["vm"]["state"], "suspended", "{s}");
    up.json(&["vm", "resume", &id]);
    assert_eq!(ssh_ok(&up, &key, &id, "root", "hostname", t), "web-7");
    let boots = ssh_ok(&up, &key, &id, "root", "ls /var/lib/cloud/instances | wc -l", t);
    assert_eq!(boots, "1", "one instance: cloud-init did not start over");
    assert!(up.runtime_dir(&id).join("seed.img").is_file());

    // Without cloud-init data a VM has no seed disk; `vm ssh --print` shows the command.
    let o = Command::new(vgrid_bin()).args(["vm", "ssh", &id, "--print"]).env("VGRID_URL", &up.url).output().unwrap();
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.contains(&format!("HostKeyAlias=vgrid-{id}")) && line.contains("ssh-proxy"), "{line}");
    up.ok(&["vm", "rm", "--force", &id]);
}

/// Staging on a cloud-init guest (issue 15): `vm run --stage-in --stage-out` on the stock cloud
/// image, whose image knows nothing of vgrid. The seed's user-data carries the user's own
/// `#cloud-config` (its runcmd is the job: it reads the staged-in file, writes its outputs,
/// powers off) and vgrid's boothook (copies in at boot, copies out at shutdown). The outputs
/// come back byte-exact, the user's hostname and runcmd took effect, the staging volume goes.
/// One boot (one retry after a failed one, as above).
#[test]
fn a_cloud_init_guest_takes_stage_in_files_and_gives_back_its_outputs() {
    let Some(g) = cloud_guest() else { return };
    let up = Up::start();
    up.ok(&common::import_args(&g, "debian-cloud"));
    let d = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let input = d.path().join("data.bin");
    std::fs::write(&input, &data).unwrap();
    let user_data = d.path().join("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - mkdir -p /root/out\n  - cp /root/in/data.bin /root/out/copy.bin\n  - sha256sum /root/in/data.bin > /root/out/sum\n  - hostname > /root/out/hostname\n  - systemctl poweroff\n",
    )
    .unwrap();
    let out = d.path().join("out");
    let (stage_in, stage_out) = (format!("{}:/root/in/data.bin", input.display()), format!("/root/out:{}", out.display()));
    let v = {
        let _slot = boot_slot().unwrap();
        let mut last = String::new();
        let mut rec = None;
        for name in ["stager", "stager-retry"] {
            let t0 = Instant::now();
            let o = up.cli(&[
                "--json",
                "vm",
                "run",
                "debian-cloud",
                "--name",
                name,
                "--hostname",
                "stager",
                "--memory",
                "512",
                "--user-data",
                user_data.to_str().unwrap(),
                "--stage-in",
                &stage_in,
                "--stage-out",
                &stage_out,
                "--timeout",
                "900",
            ]);
            eprintln!("vm run {name} with staging: {} after {:.1} s", o.status, t0.elapsed().as_secs_f64());
            if o.status.success() {
                rec = Some(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap());
                break;
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            let _ = up.cli(&["vm", "rm", "--force", name]);
            for vol in up.json(&["volume", "ls"]).as_array().unwrap() {
                let _ = up.cli(&["volume", "rm", vol["name"].as_str().unwrap()]);
            }
            let _ = std::fs::remove_dir_all(&out);
        }
        rec.unwrap_or_else(|| panic!("the staged cloud guest did not run twice: {last}\n{}", up.log_tail()))
    };
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["state"], "stopped", "{v}");
    let console = std::fs::read_to_string(up.runtime_dir(&id).join("console.log")).unwrap_or_default();
    for line in ["vgrid-stage: staged in /root/in/data.bin", "vgrid-stage: staged out /root/out"] {
        assert!(console.contains(line), "{line}: {console}");
    }
    assert!(std::fs::read(out.join("copy.bin")).unwrap() == data, "copy.bin differs from the staged-in file");
    let o = Command::new("sha256sum").arg(&input).output().unwrap();
    let local = String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(out.join("sum")).unwrap(), format!("{local}  /root/in/data.bin\n"));
    assert_eq!(std::fs::read_to_string(out.join("hostname")).unwrap(), "stager\n", "the user's own cloud-init data took effect");
    assert_eq!(up.json(&["volume", "ls"]), serde_json::json!([]), "the staging volume stayed");
    up.ok(&["vm", "rm", &id]);
}
