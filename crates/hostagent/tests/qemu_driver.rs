//! The QEMU driver against real QEMU guests (TCG here; KVM where the host has it), booting the
//! sample guest built by scripts/build-sample-guest.sh from a local raw copy of its disk.
//! Every boot has a timeout and one retry; at most $VGRID_TEST_BOOT_SLOTS guests boot at once.

use std::path::{Path, PathBuf};
use std::time::Duration;
use vgrid_api::vm::{Forward, VmConfig};
use vgrid_hostagent::testkit::{self, boot_slot, boot_with_retry, sample_guest, SampleGuest, BOOTED_MARKER, DISK_MARKER, PROMPT};
use vgrid_hostagent::{qemu_version, BootSource, DiskSource, LaunchOptions, QemuStatus, StopMethod, Vm, VmError, VmSpec};

/// Hang guards, not performance thresholds: a TCG boot takes seconds; these catch a stuck guest.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(120);
const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(120);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
}

fn guest() -> SampleGuest {
    sample_guest().expect("sample guest builds")
}

/// The configuration of a VM on a local disk file (the image name is only a label).
fn local_config() -> VmConfig {
    VmConfig::new(vgrid_api::ImageRef { name: "local".into(), version: None })
}

fn opts() -> LaunchOptions {
    LaunchOptions { kill_on_drop: true, ..LaunchOptions::default() }
}

/// A private raw copy of the sample disk, to serve as the overlay's (never written) backing.
fn base_copy(g: &SampleGuest, dir: &Path) -> PathBuf {
    let p = dir.join("base.img");
    std::fs::copy(&g.disk, &p).unwrap();
    p
}

/// Boots `spec` in `dir/<name>-<attempt>` and waits for the disk marker (and, in shell mode,
/// the prompt). Timeout and one retry.
async fn boot(name: &str, dir: &Path, spec: VmSpec, wait_prompt: bool) -> Vm {
    boot_with_retry(name, BOOT_TIMEOUT, |n| {
        let spec = spec.clone();
        let rd = dir.join(format!("{name}-{n}"));
        async move {
            let vm = Vm::launch_with(spec, &rd, &opts()).await?;
            vm.wait_for_console(DISK_MARKER, CONSOLE_TIMEOUT).await?;
            if wait_prompt {
                vm.wait_for_console(PROMPT, CONSOLE_TIMEOUT).await?;
            }
            Ok::<Vm, VmError>(vm)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Types a command on the guest shell and waits for `done` in the output after it.
async fn run_in_guest(vm: &Vm, command: &str, done: &str) -> String {
    let from = vm.console_log_len();
    vm.send_console(&format!("{command}\n")).await.unwrap();
    vm.wait_for_console_from(from, done, CONSOLE_TIMEOUT).await.unwrap_or_else(|e| panic!("{e}"))
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    // Signal 0: existence check. A reaped QEMU is gone (ESRCH).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true)
}

#[tokio::test]
async fn guest_writes_land_in_the_overlay_and_the_base_stays_unchanged() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let spec = g.spec("write-test", DiskSource::raw_file(&base), "");

    let vm = boot("write", tmp.path(), spec, true).await;
    let log = std::fs::read_to_string(vm.console_log_path()).unwrap();
    assert!(log.contains(BOOTED_MARKER), "{log}");
    assert!(log.contains(&format!("disk says {DISK_MARKER}")), "{log}");
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Running);

    // $((6*7)) and $((2+3)) make the output differ from the echoed input.
    run_in_guest(&vm, "echo vgrid-written-$((6*7)) > /mnt/written; sync; echo cmd-$((2+3))-done", "cmd-5-done").await;

    // More console output (289 KB) than a socket buffer holds (~208 KB), while send_console's
    // connection is open: the driver must drain it or the guest's serial output stalls. (It
    // was 589 KB: at the serial line's pace that took over the 120 s timeout on a loaded
    // machine.)
    run_in_guest(&vm, "seq 1 50000; echo seq-$((4+4))-done", "seq-8-done").await;

    let out = vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap();
    assert_eq!(out.method, StopMethod::Acpi, "the sample guest obeys the power button");
    assert!(out.exit.success(), "{}", out.exit);
    assert!(vm.tail_console(50).iter().any(|l| l.contains("vgrid-sample: power button")), "{:?}", vm.tail_console(50));
    assert!(!pid_alive(vm.pid()));
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Exited(out.exit));

    // The overlay holds the new file...
    let overlay = vm.overlay_path();
    let merged = tmp.path().join("merged.raw");
    run("qemu-img", &["convert", "-O", "raw", overlay.to_str().unwrap(), merged.to_str().unwrap()]);
    let written = run("debugfs", &["-R", "cat /written", merged.to_str().unwrap()]);
    assert!(written.contains("vgrid-written-42"), "overlay content: {written:?}");
    // ... and the base did not change by a single byte.
    assert!(std::fs::read(&base).unwrap() == std::fs::read(&g.disk).unwrap(), "base image was modified");
    let in_base = std::process::Command::new("debugfs").args(["-R", "cat /written", base.to_str().unwrap()]).output().unwrap();
    assert!(!String::from_utf8_lossy(&in_base.stdout).contains("vgrid-written"));

    let dir = vm.runtime_dir().to_path_buf();
    vm.cleanup().await.unwrap();
    assert!(!dir.exists(), "cleanup left {}", dir.display());
}

#[tokio::test]
async fn sigkilled_qemu_is_reported_exited_by_signal_and_cleanup_removes_everything() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let vm = boot("kill", tmp.path(), g.spec("kill-test", DiskSource::raw_file(&base), ""), false).await;
    let dir = vm.runtime_dir().to_path_buf();
    for f in ["qmp.sock", "console.sock", "console.log", "overlay.qcow2", "pid", "spec.json"] {
        assert!(dir.join(f).exists(), "runtime dir lacks {f}");
    }
    let pid = vm.pid();
    assert_eq!(std::fs::read_to_string(dir.join("pid")).unwrap().trim(), pid.to_string());

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), vm.wait_exit()).await.expect("QEMU reaped");
    assert_eq!(exit.signal, Some(9), "{exit}");
    assert_eq!(exit.code, None);
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Exited(exit));
    let e = vm.wait_for_console("never printed", CONSOLE_TIMEOUT).await.unwrap_err();
    assert!(matches!(e, VmError::ConsoleExited { .. }), "{e}");
    assert!(e.to_string().contains("kill-test"), "{e}");

    vm.cleanup().await.unwrap();
    assert!(!dir.exists());
    assert!(!pid_alive(pid));
}

#[tokio::test]
async fn adopt_after_agent_restart_then_stop_cont_and_quit_fallback() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let mut vm = boot("adopt", tmp.path(), g.spec("adopt-test", DiskSource::raw_file(&base), ""), false).await;
    let dir = vm.runtime_dir().to_path_buf();
    let pid = vm.pid();

    // The "agent" goes away without stopping its VM.
    vm.set_kill_on_drop(false);
    drop(vm);
    assert!(pid_alive(pid));

    let vm = Vm::adopt(&dir, &opts()).await.unwrap();
    assert_eq!(vm.id(), "adopt-test");
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Running);

    let mut events = vm.events();
    vm.stop().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Paused);
    let ev = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.event, "STOP");
    vm.cont().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Running);
    let ev = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.event, "RESUME");

    // A paused guest cannot answer the power button: powerdown falls back to quit.
    vm.stop().await.unwrap();
    let out = vm.powerdown(Duration::from_secs(2)).await.unwrap();
    assert_eq!(out.method, StopMethod::Quit);
    assert!(!pid_alive(pid));
    vm.cleanup().await.unwrap();
    assert!(!dir.exists());
}

#[tokio::test]
async fn port_forward_reaches_the_guest_over_user_networking() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let spec = g.spec("net-test", DiskSource::raw_file(&base), "vgrid.net=dhcp");
    // A free port per attempt: another process may grab a port between our probe and QEMU.
    let (vm, port) = boot_with_retry("net", BOOT_TIMEOUT, |n| {
        let mut spec = spec.clone();
        let rd = tmp.path().join(format!("net-{n}"));
        async move {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            spec.config = spec.config.with_forwards(vec![Forward { host: port, guest: 8080 }]);
            let vm = Vm::launch_with(spec, &rd, &opts()).await?;
            vm.wait_for_console(PROMPT, CONSOLE_TIMEOUT).await?;
            Ok::<(Vm, u16), VmError>((vm, port))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let line = vm.wait_for_console("vgrid-sample: net", CONSOLE_TIMEOUT).await.unwrap();
    assert!(line.contains("net up 10.0.2."), "{line}");

    run_in_guest(&vm, "echo served-from-guest > /tmp/f; nc -l -p 8080 < /tmp/f & echo nc-$((1+1))-started", "nc-2-started").await;
    // nc may need a moment to listen: retry the connection (a hang guard, not a threshold).
    let mut got = String::new();
    for _ in 0..100 {
        use tokio::io::AsyncReadExt;
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut got)).await;
            if got.contains("served-from-guest") {
                break;
            }
        }
        got.clear();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(got.contains("served-from-guest"), "read {got:?} from the forwarded port");
    vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap();
    vm.cleanup().await.unwrap();
}

#[tokio::test]
async fn missing_kernel_is_a_clear_error_and_starts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let spec = VmSpec::new(
        "no-kernel",
        local_config().with_memory_mib(128),
        DiskSource::raw_file(&disk),
        BootSource::Kernel { kernel: tmp.path().join("missing-vmlinuz"), initrd: None, cmdline: String::new() },
    );
    let rd = tmp.path().join("rd");
    let e = Vm::launch(spec, &rd).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VmError::MissingFile { what: "kernel", .. }), "{msg}");
    assert!(msg.contains("no-kernel") && msg.contains("missing-vmlinuz"), "{msg}");
    assert!(!rd.exists(), "a rejected spec must not create its runtime directory");
}

#[tokio::test]
async fn qemu_that_exits_at_startup_is_an_error_with_its_stderr() {
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    // QEMU cannot forward a host port that is already taken and exits before booting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut spec = g.spec("early-exit", DiskSource::raw_file(&base), "");
    spec.config = spec.config.with_forwards(vec![Forward { host: taken.local_addr().unwrap().port(), guest: 22 }]);
    let e = Vm::launch_with(spec, tmp.path().join("rd"), &opts()).await.unwrap_err();
    let msg = e.to_string();
    match &e {
        VmError::EarlyExit { exit, stderr, .. } => {
            assert_eq!(exit.code, Some(1), "{msg}");
            assert!(stderr.to_lowercase().contains("forward"), "{msg}");
        }
        other => panic!("expected EarlyExit, got {other}"),
    }
    assert!(msg.contains("early-exit"), "{msg}");
}

#[tokio::test]
async fn unreachable_nbd_backing_is_an_overlay_error() {
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let spec = g.spec("nbd-down", DiskSource::nbd_unix(tmp.path().join("no-proxy.sock"), "img"), "");
    let e = Vm::launch_with(spec, tmp.path().join("rd"), &opts()).await.unwrap_err();
    assert!(matches!(e, VmError::Overlay { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("nbd-down") && msg.contains("no-proxy.sock"), "{msg}");
}

#[tokio::test]
async fn reports_the_qemu_version() {
    let v = qemu_version().await.unwrap();
    assert!(v.major >= 7, "{v:?}");
    assert!(v.full.starts_with("QEMU emulator version"));
    let _ = testkit::sample_guest_script();
}

/// A hand-assembled 16-bit boot sector: writes a line to COM1, then halts with interrupts off
/// (so it can never answer the ACPI power button).
fn boot_sector_disk(path: &Path) {
    let code: [u8; 23] = [
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xFC, // cld
        0xBE, 0x17, 0x7C, // mov si, 0x7c17 (the message, right after this code)
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
        0xAC, // next: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz halt
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp next
        0xFA, // halt: cli
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
    ];
    let mut disk = vec![0u8; 1024 * 1024];
    disk[..code.len()].copy_from_slice(&code);
    let msg = b"vgrid-firmware-boot-ok\r\n\0";
    disk[code.len()..code.len() + msg.len()].copy_from_slice(msg);
    disk[510] = 0x55;
    disk[511] = 0xAA;
    std::fs::write(path, disk).unwrap();
}

#[tokio::test]
async fn firmware_boot_and_quit_fallback_for_a_guest_that_ignores_acpi() {
    init_tracing();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("mbr.img");
    boot_sector_disk(&disk);
    let spec =
        VmSpec::new("firmware-test", local_config().with_memory_mib(64), DiskSource::raw_file(&disk), BootSource::Firmware { bios: None });
    let vm = boot_with_retry("firmware", BOOT_TIMEOUT, |n| {
        let spec = spec.clone();
        let rd = tmp.path().join(format!("fw-{n}"));
        async move {
            let vm = Vm::launch_with(spec, &rd, &opts()).await?;
            vm.wait_for_console("vgrid-firmware-boot-ok", CONSOLE_TIMEOUT).await?;
            Ok::<Vm, VmError>(vm)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let out = vm.powerdown(Duration::from_secs(3)).await.unwrap();
    assert_eq!(out.method, StopMethod::Quit, "a halted guest cannot obey the power button");
    assert!(out.exit.success(), "{}", out.exit);
    vm.cleanup().await.unwrap();
}

/// qemu-nbd serving a file read-only on a unix socket; killed on drop.
struct NbdServer(std::process::Child);
impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn boots_from_an_nbd_export_and_restarts_on_its_overlay() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let sock = tmp.path().join("nbd.sock");
    let _nbd = NbdServer(
        std::process::Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=8", "-f", "raw", "-x", "img"])
            .arg(format!("--socket={}", sock.display()))
            .arg(&base)
            .spawn()
            .unwrap(),
    );
    for _ in 0..600 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sock.exists(), "qemu-nbd did not create {}", sock.display());

    let spec = g.spec("nbd-test", DiskSource::nbd_unix(&sock, "img"), "");
    let vm = boot("nbd", tmp.path(), spec.clone(), true).await;
    let dir = vm.runtime_dir().to_path_buf();
    run_in_guest(&vm, "echo kept-$((3*3)) > /mnt/persist; sync; echo w-$((1+1))-done", "w-2-done").await;
    assert_eq!(vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap().method, StopMethod::Acpi);
    drop(vm);

    // Relaunch in the same runtime directory on the same overlay: the guest's write is there.
    let reuse = LaunchOptions { reuse_overlay: true, ..opts() };
    let vm = boot_with_retry("nbd-restart", BOOT_TIMEOUT, |_| {
        let (spec, dir, reuse) = (spec.clone(), dir.clone(), reuse.clone());
        async move {
            let vm = Vm::launch_with(spec, &dir, &reuse).await?;
            vm.wait_for_console(PROMPT, CONSOLE_TIMEOUT).await?;
            Ok::<Vm, VmError>(vm)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let line = run_in_guest(&vm, "cat /mnt/persist", "kept-9").await;
    assert!(line.starts_with("kept-9"), "{line:?}");
    vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap();
    vm.cleanup().await.unwrap();
    assert!(std::fs::read(&base).unwrap() == std::fs::read(&g.disk).unwrap(), "NBD base image was modified");
}

#[tokio::test]
async fn saved_state_restores_the_guest_where_it_was() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let spec = g.spec("state-test", DiskSource::raw_file(&base), "");
    let vm = boot("state", tmp.path(), spec.clone(), true).await;
    let dir = vm.runtime_dir().to_path_buf();
    // One file in guest RAM (tmpfs), one on the disk without sync (maybe only in the page cache).
    run_in_guest(&vm, "echo in-ram-$((5*5)) > /tmp/r; echo on-disk-$((6*6)) > /mnt/d; echo s-$((1+1))-done", "s-2-done").await;
    vm.release_console().await;

    let state = tmp.path().join("state.bin");
    let size = vm.save_state(&state, Duration::from_secs(300)).await.unwrap();
    assert!(size > 0 && std::fs::metadata(&state).unwrap().len() == size);
    assert!(matches!(vm.status().await.unwrap(), QemuStatus::Other(ref s) if s == "postmigrate"));
    // Suspend = state + overlay; the process itself is gone.
    let exit = vm.kill().await.unwrap();
    assert_eq!(exit.signal, Some(9));
    drop(vm);

    let restore = LaunchOptions { reuse_overlay: true, incoming: Some(state.clone()), ..opts() };
    let vm = boot_with_retry("state-restore", BOOT_TIMEOUT, |_| {
        let (spec, dir, restore) = (spec.clone(), dir.clone(), restore.clone());
        async move { Vm::launch_with(spec, &dir, &restore).await }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Running);
    // No boot happened: the console log of the new QEMU has no boot marker.
    assert!(!std::fs::read_to_string(vm.console_log_path()).unwrap_or_default().contains(BOOTED_MARKER));
    run_in_guest(&vm, "cat /tmp/r /mnt/d; echo c-$((2+1))-done", "c-3-done").await;
    let log = std::fs::read_to_string(vm.console_log_path()).unwrap();
    assert!(log.contains("in-ram-25") && log.contains("on-disk-36"), "{log}");
    assert_eq!(vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap().method, StopMethod::Acpi);
    vm.cleanup().await.unwrap();
}

#[tokio::test]
async fn restoring_a_missing_state_file_is_a_clear_error() {
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    let o = LaunchOptions { incoming: Some(tmp.path().join("no-such-state.bin")), ..opts() };
    let rd = tmp.path().join("rd");
    let e = Vm::launch_with(g.spec("restore-missing", DiskSource::raw_file(&base), ""), &rd, &o).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VmError::MissingFile { what: "saved state", .. }), "{msg}");
    assert!(msg.contains("restore-missing") && msg.contains("no-such-state.bin"), "{msg}");
    assert!(!rd.exists(), "a rejected launch must not create its runtime directory");
}

#[tokio::test]
async fn guest_runs_its_rc_and_powers_itself_off() {
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = base_copy(&g, tmp.path());
    // Put a job on the disk: /rc, which init runs before powering off in vgrid.mode=poweroff.
    let rc = tmp.path().join("rc");
    std::fs::write(&rc, "echo job-output-$((7*6))\necho result > /mnt/result\n").unwrap();
    run("debugfs", &["-w", "-R", &format!("write {} rc", rc.display()), base.to_str().unwrap()]);
    let spec = g.spec("rc-test", DiskSource::raw_file(&base), "vgrid.mode=poweroff");

    let (vm, exit) = boot_with_retry("rc", BOOT_TIMEOUT, |n| {
        let spec = spec.clone();
        let rd = tmp.path().join(format!("rc-{n}"));
        async move {
            let vm = Vm::launch_with(spec, &rd, &opts()).await?;
            let exit = vm.wait_exit().await;
            Ok::<_, VmError>((vm, exit))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(exit.success(), "a guest that powers off ends QEMU with code 0, not {exit}");
    assert_eq!(vm.status().await.unwrap(), QemuStatus::Exited(exit));
    let log = std::fs::read_to_string(vm.console_log_path()).unwrap();
    assert!(log.contains("job-output-42") && log.contains("vgrid-sample: powering off"), "{log}");

    let merged = tmp.path().join("merged.raw");
    run("qemu-img", &["convert", "-O", "raw", vm.overlay_path().to_str().unwrap(), merged.to_str().unwrap()]);
    assert_eq!(run("debugfs", &["-R", "cat /result", merged.to_str().unwrap()]).trim(), "result");
    vm.cleanup().await.unwrap();
}

/// `LaunchOptions::run_as`: QEMU runs as the unprivileged user and boots from files it can read;
/// a relaunch in the kept runtime directory (on the same overlay) does not follow a link planted
/// there while the directory was that user's. Needs root (it switches users); as another user
/// it checks that nothing is switched.
#[tokio::test]
async fn qemu_runs_as_its_user_and_a_relaunch_ignores_planted_links() {
    use std::os::unix::fs::PermissionsExt;
    init_tracing();
    let g = guest();
    let _slot = boot_slot().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    if !nix::unistd::geteuid().is_root() {
        let r = vgrid_hostagent::qemu_user::resolve("vgrid-qemu", tmp.path()).unwrap();
        assert!(r.is_none(), "not root: QEMU runs as the caller");
        return;
    }
    let user = vgrid_hostagent::QemuUser::ensure("vgrid-qemu").unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = base_copy(&g, tmp.path());
    let mut spec = g.spec("uq-test", DiskSource::raw_file(&base), "");
    // The sample guest's cache may lie under a private home: copy kernel and initrd.
    if let BootSource::Kernel { kernel, initrd, .. } = &mut spec.boot {
        let k = tmp.path().join("kernel.img");
        std::fs::copy(&*kernel, &k).unwrap();
        *kernel = k;
        if let Some(i) = initrd {
            let c = tmp.path().join("initrd.img");
            std::fs::copy(&*i, &c).unwrap();
            *i = c;
        }
    }
    for f in std::fs::read_dir(tmp.path()).unwrap() {
        std::fs::set_permissions(f.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let dir = tmp.path().join("vm");
    let o = LaunchOptions { run_as: Some(user.clone()), ..opts() };
    let uid_of = |pid: u32| -> String {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let launch = |o: LaunchOptions| {
        let (spec, dir) = (spec.clone(), dir.clone());
        boot_with_retry("uq", BOOT_TIMEOUT, move |_| {
            let (spec, dir, o) = (spec.clone(), dir.clone(), o.clone());
            async move {
                let vm = Vm::launch_with(spec, &dir, &o).await?;
                vm.wait_for_console(PROMPT, CONSOLE_TIMEOUT).await?;
                Ok::<Vm, VmError>(vm)
            }
        })
    };
    let vm = launch(o.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(uid_of(vm.pid()), user.uid.to_string());
    run_in_guest(&vm, "echo kept-$((4*4)) > /mnt/persist; sync; echo w-$((2+2))-done", "w-4-done").await;
    vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap();
    drop(vm);
    // What a compromised QEMU of that user could leave: spec.json pointing at a host file.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let _ = std::fs::remove_file(dir.join("spec.json"));
    std::os::unix::fs::symlink(&victim, dir.join("spec.json")).unwrap();
    let vm = launch(LaunchOptions { reuse_overlay: true, ..o }).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(uid_of(vm.pid()), user.uid.to_string());
    let line = run_in_guest(&vm, "cat /mnt/persist", "kept-16").await;
    assert!(line.starts_with("kept-16"), "{line:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "the relaunch wrote through the planted link");
    assert!(!std::fs::symlink_metadata(dir.join("spec.json")).unwrap().file_type().is_symlink());
    vm.powerdown(POWERDOWN_TIMEOUT).await.unwrap();
    vm.cleanup().await.unwrap();
}
