//! `vgrid vm ...` and `vgrid host ...`: clients of the coordinator's REST API.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use vgrid_api::grid::{Future, FuturesQuery, HostRecord};
use vgrid_api::vm::{ConsoleChunk, Forward, VmCreate, VmRecord, VmState, VmStop};

use crate::client::HttpError;
use crate::output::{age, print_json, table};
use crate::Ctx;

// Parsed once per process: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Start a VM from an image and wait until it runs (or until TEXT shows on its console).
    Run(RunArgs),
    /// List VMs.
    Ls,
    /// Show one VM.
    Show {
        id: String,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches).
    Console {
        id: String,
    },
    /// Offer a VM's graphical console (its VNC display) on a local port to any VNC viewer,
    /// through the coordinator over your authenticated connection (the host never listens on
    /// a TCP port for it). Runs until Ctrl-C.
    Vnc {
        id: String,
        /// Local address to listen on (port 0: any free port, printed).
        #[arg(long, default_value = "127.0.0.1:5901")]
        listen: String,
    },
    /// Log in to a VM with OpenSSH, wherever it runs (through the coordinator for a user-mode
    /// interface; at its address on a site network). Host keys are trusted on first use and
    /// kept per VM. Give the key with `vm run --ssh-key` for a stock cloud image.
    Ssh(crate::ssh::SshArgs),
    /// The VM's ssh port on stdin and stdout (ssh's ProxyCommand; `vm ssh` sets it).
    #[command(hide = true)]
    SshProxy {
        id: String,
    },
    /// Print a VM's console log.
    Logs {
        id: String,
        /// Keep printing new output until the VM stops (Ctrl-C to quit).
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a VM: ACPI power-down, then quit after a timeout.
    Stop {
        id: String,
        /// Kill QEMU at once.
        #[arg(long)]
        force: bool,
    },
    /// Save a running VM (memory state and disk) on the image servers and free its host; the
    /// VM becomes `suspended`. If saving fails the VM keeps running.
    Suspend(crate::suspend::SuspendArgs),
    /// Restore a suspended VM on any matching host (possibly another one); the guest continues
    /// where it stopped.
    Resume(crate::suspend::ResumeArgs),
    Migrate(crate::migrate::MigrateArgs),
    /// Remove a stopped VM (its overlay, sockets and record).
    Rm {
        id: String,
        /// Stop it first if it is still running.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// NAME or NAME@VERSION of the image.
    pub image: String,
    /// VM name [default: IMAGE-<id>].
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Forward a host TCP port to a guest port (HOSTPORT:GUESTPORT); repeatable.
    #[arg(long = "forward", value_parser = |s: &str| s.parse::<Forward>())]
    pub forwards: Vec<Forward>,
    /// A network interface: `user` (the default: outbound through the host, --forward ports),
    /// `site:NET` (an address of site network NET, leased by the coordinator; the VM runs on a
    /// host attached to NET) or `tunnel:NET` (your own LAN through `vgrid tunnel NET`).
    /// Repeatable: one interface each, in guest order.
    #[arg(long = "net", value_name = "MODE", value_parser = |s: &str| s.parse::<vgrid_api::vm::Nic>())]
    pub nics: Vec<vgrid_api::vm::Nic>,
    /// Attach a volume as the next virtio disk (/dev/vdb, /dev/vdc, ...):
    /// `NAME[@VERSION][:ro][,serial=S]`. Read-write (the default: the latest version; one VM
    /// at a time) commits the guest's writes as a new version when the VM stops or is removed
    /// (and on `vgrid volume commit`); `:ro` any version, shared. Repeatable.
    #[arg(long = "volume", value_name = "SPEC", value_parser = |s: &str| s.parse::<vgrid_api::volume::VolumeAttach>())]
    pub volumes: Vec<vgrid_api::volume::VolumeAttach>,
    /// For a stock cloud image (cloud-init): a file of OpenSSH public keys (one per line, as
    /// in authorized_keys) the guest accepts. Repeatable. Any of --ssh-key, --user-data and
    /// --hostname gives the VM a NoCloud seed disk (label CIDATA, its last disk).
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<std::path::PathBuf>,
    /// cloud-init user-data (a `#cloud-config` file, a script), at most 64 KiB [default:
    /// root may log in with the --ssh-key keys].
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<std::path::PathBuf>,
    /// The guest's hostname [default: the VM's name].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Accelerator: kvm or tcg [default: kvm where the CPU has vmx/svm, else tcg].
    #[arg(long, value_parser = ["kvm", "tcg"])]
    pub accel: Option<String>,
    /// Requirement over the host ad, a CEL expression, e.g.
    /// 'host.free_memory_mib >= 2048 && host.labels.site == "uf"'.
    #[arg(long)]
    pub require: Option<String>,
    /// Rank over the host ad, a CEL expression (higher is better) [default: hosts holding more
    /// of the image in cache, then lower load, then spread].
    #[arg(long)]
    pub rank: Option<String>,
    /// Fail at once when no host can take the VM now, instead of waiting in the queue.
    #[arg(long)]
    pub no_wait: bool,
    /// Return only once TEXT appears on the VM's console.
    #[arg(long)]
    pub wait_for: Option<String>,
    /// Give up waiting after this many seconds (the VM keeps running). With --stage-out it also
    /// bounds the wait for the VM to power off.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Place a local file or directory at GUESTPATH in the guest before it starts
    /// (`LOCAL:GUESTPATH`, GUESTPATH absolute; a directory's contents go into GUESTPATH).
    /// Repeatable. Through a staging volume (`stage-<name>-<random>`, serial vgrid-stage, the
    /// VM's last disk) the guest copies in at boot: see docs/volumes.md, "Staging".
    #[arg(long = "stage-in", value_name = "LOCAL:GUESTPATH", value_parser = crate::stage::parse_in)]
    pub stage_in: Vec<crate::stage::StageIn>,
    /// Collect GUESTPATH (a file or directory) into LOCAL once the VM has powered off: `vm run`
    /// waits for the power-off (the guest's own, or `vgrid vm stop`), then removes the staging
    /// volume. Repeatable.
    #[arg(long = "stage-out", value_name = "GUESTPATH:LOCAL", value_parser = crate::stage::parse_out)]
    pub stage_out: Vec<crate::stage::StageOut>,
    /// Room for the guest's outputs on the staging volume, beyond the inputs.
    #[arg(long, value_parser = crate::output::parse_size, default_value = "64M")]
    pub stage_size: u64,
    /// Keep the staging volume after collecting the outputs, or, without --stage-out, after
    /// the VM ended (else the coordinator removes it then). It is kept anyway when something
    /// fails, and named.
    #[arg(long)]
    pub keep_stage: bool,
    /// The image server the staging volume goes to.
    #[command(flatten)]
    pub server: crate::store::ServerArg,
    #[command(flatten)]
    pub resources: crate::usage::ResourceArgs,
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// List compute hosts and what they offer.
    Ls,
    /// Show one host's advertisement.
    Show { name: String },
    /// Take a host out of service (admins): no new placement on it; each of its VMs is
    /// live-migrated to a host that can take it, else suspended to the image servers. Then its
    /// agent may be stopped. Survives a coordinator restart.
    Drain {
        name: String,
        /// Follow the drain: one line per VM as it moves, then what went where.
        #[arg(long)]
        wait: bool,
    },
    /// Put a drained host back in service (admins).
    #[command(alias = "resume")]
    Undrain { name: String },
}

pub async fn run(ctx: &Ctx, cmd: VmCmd) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    match cmd {
        VmCmd::Run(a) => return run_vm(ctx, a).await,
        VmCmd::Suspend(a) => return crate::suspend::suspend(ctx, a).await,
        VmCmd::Resume(a) => return crate::suspend::resume(ctx, a).await,
        VmCmd::Ls => {
            let vms: Vec<VmRecord> = api.get("/api/v1/vms").await?;
            if ctx.json {
                print_json(&vms)?;
            } else {
                let rows = vms
                    .iter()
                    .map(|v| {
                        vec![
                            v.id.clone(),
                            v.name.clone(),
                            image_label(v),
                            state_and_phase(v),
                            v.config.cpus.to_string(),
                            format!("{} MiB", v.config.memory_mib),
                            v.host.clone().unwrap_or_default(),
                            addresses(v),
                            age(v.created),
                        ]
                    })
                    .collect();
                println!("{}", table(&["ID", "NAME", "IMAGE", "STATE", "CPUS", "MEMORY", "HOST", "ADDRESS", "CREATED"], rows));
            }
        }
        VmCmd::Show { id } => {
            let v: VmRecord = api.get(&format!("/api/v1/vms/{id}")).await?;
            if ctx.json {
                print_json(&v)?;
            } else {
                show(&v);
            }
        }
        VmCmd::Console { id } => crate::console::attach(ctx, &id).await?,
        VmCmd::Vnc { id, listen } => crate::console::vnc(ctx, &id, &listen).await?,
        VmCmd::Ssh(a) => crate::ssh::ssh(ctx, a).await?,
        VmCmd::SshProxy { id } => crate::console::ssh_proxy(ctx, &id).await?,
        VmCmd::Logs { id, follow } => logs(ctx, &id, follow).await?,
        VmCmd::Stop { id, force } => {
            let v: VmRecord = api.post(&format!("/api/v1/vms/{id}/stop"), &VmStop { force }).await?;
            if ctx.json {
                print_json(&v)?;
            } else {
                println!("{} {}", v.id, v.state.as_str());
            }
        }
        VmCmd::Migrate(a) => return crate::migrate::migrate(ctx, a).await,
        VmCmd::Rm { id, force } => {
            let v: VmRecord = api.delete(&format!("/api/v1/vms/{id}?force={force}")).await?;
            if ctx.json {
                print_json(&v)?;
            } else {
                println!("removed {}", v.id);
                // A staging volume the coordinator could not remove with it.
                if let Some(r) = v.reason.as_deref().filter(|r| r.starts_with("VM removed, but")) {
                    eprintln!("{r}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A host's state as listed: `ready`, `lost`, and `, draining` when taken out of service.
fn host_state(h: &HostRecord) -> String {
    let s = format!("{:?}", h.state).to_lowercase();
    if h.draining {
        format!("{s}, draining")
    } else {
        s
    }
}

pub async fn run_host(ctx: &Ctx, cmd: HostCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        HostCmd::Ls => {
            let hosts: Vec<HostRecord> = ctx.api().get("/api/v1/hosts").await?;
            if ctx.json {
                print_json(&hosts)?;
            } else {
                let rows = hosts
                    .iter()
                    .map(|h| {
                        let labels: Vec<String> = h.ad.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        vec![
                            h.ad.name.clone(),
                            host_state(h),
                            h.ad.arch.clone(),
                            format!("{}/{}", h.ad.free_cpus, h.ad.cpus),
                            format!("{}/{} MiB", h.ad.free_memory_mib, h.ad.memory_mib),
                            h.ad.accel.clone(),
                            format!("{:.2}/{:.2}", h.ad.load_now, h.ad.load_predicted),
                            h.ad.running_vms.to_string(),
                            labels.join(","),
                            h.ad.url.clone(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "STATE", "ARCH", "FREE CPUS", "FREE MEMORY", "ACCEL", "LOAD NOW/PRED", "VMS", "LABELS", "URL"], rows)
                );
            }
        }
        HostCmd::Drain { name, wait } => return crate::drain::drain(ctx, &name, wait).await,
        HostCmd::Undrain { name } => return crate::drain::undrain(ctx, &name).await,
        HostCmd::Show { name } => {
            let h: HostRecord = ctx.api().get(&format!("/api/v1/hosts/{name}")).await?;
            if ctx.json {
                print_json(&h)?;
            } else {
                println!("name:        {}", h.ad.name);
                println!("state:       {} (last heartbeat {:.1}s ago)", host_state(&h), h.last_seen_secs);
                println!("url:         {}", h.ad.url);
                println!("arch:        {} ({}), QEMU {}", h.ad.arch, h.ad.accel, h.ad.qemu_version);
                println!("cpus:        {} free of {}", h.ad.free_cpus, h.ad.cpus);
                println!("memory:      {} MiB free of {} MiB", h.ad.free_memory_mib, h.ad.memory_mib);
                println!("load:        {:.2} (1-minute average)", h.ad.load_avg);
                println!(
                    "load now:    {:.2} cores busy; predicted {:.2} (mean over the next 30 s, AR(16))",
                    h.ad.load_now, h.ad.load_predicted
                );
                if h.ad.cpu_cap > 0.0 {
                    println!("cpu cap:     {:.2} cores for all guests, {:.2} not reserved", h.ad.cpu_cap, h.ad.free_cpu_share);
                } else {
                    println!("cpu cap:     none");
                }
                println!(
                    "cgroups:     {}",
                    if h.ad.cgroups.is_empty() { "unavailable (no resource control)" } else { h.ad.cgroups.as_str() }
                );
                println!("networks:    {}", h.ad.network_modes.join(", "));
                for (k, v) in &h.ad.labels {
                    println!("label:       {k}={v}");
                }
                if let Some(p) = &h.ad.policy {
                    println!("policy:      {p}");
                }
                println!("vms:         {}", h.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(" "));
                if !h.orphans.is_empty() {
                    println!("orphans:     {} (QEMUs with no VM record; not killed)", h.orphans.join(" "));
                }
                for (img, f) in &h.ad.image_cache {
                    println!("cached:      {img} {:.0}%", f * 100.0);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The VM's leased addresses, or `-`.
fn addresses(v: &VmRecord) -> String {
    let a: Vec<String> = v.config.net.nics.iter().filter_map(|n| n.address()).map(|a| a.to_string()).collect();
    if a.is_empty() {
        "-".into()
    } else {
        a.join(",")
    }
}

/// `NAME@VERSION` of the image the VM was created from.
fn image_label(v: &VmRecord) -> String {
    v.config.image().to_string()
}

/// The state, and what the VM is doing in it when that says more (e.g. `running (waiting
/// for image server https://…)`).
fn state_and_phase(v: &VmRecord) -> String {
    if v.phase == v.state.as_str() || v.phase.is_empty() {
        v.state.as_str().to_string()
    } else {
        format!("{} ({})", v.state.as_str(), v.phase)
    }
}

fn show(v: &VmRecord) {
    println!("id:       {}", v.id);
    println!("name:     {}", v.name);
    println!("image:    {}", image_label(v));
    println!("state:    {}", v.state.as_str());
    if v.phase != v.state.as_str() && !v.phase.is_empty() {
        println!("phase:    {}", v.phase);
    }
    if let Some(r) = &v.reason {
        println!("reason:   {}", r.replace('\n', "\n          "));
    }
    println!("cpus:     {}", v.config.cpus);
    println!("memory:   {} MiB", v.config.memory_mib);
    match v.ram_remote_bytes {
        Some(0) => println!("ram:      paged in lazily, all of it on the host now"),
        Some(n) => println!("ram:      paged in lazily, {} still on the image server (fetched when touched)", crate::output::bytes(n)),
        None => {}
    }
    if !v.config.resources.is_empty() {
        println!("limits:   {}", crate::usage::describe(&v.config.resources));
    }
    if let Some(h) = &v.host {
        println!("host:     {h}");
    }
    // The accelerator its host runs it with, or the one asked for until it runs.
    if let Some(a) = v.accel.or(v.config.accel) {
        println!("accel:    {a}");
    }
    if let Some(p) = v.pid {
        println!("pid:      {p}");
    }
    for f in v.config.net.forwards() {
        println!("forward:  127.0.0.1:{} -> guest:{}", f.host, f.guest);
    }
    for (i, n) in v.config.net.nics.iter().enumerate().filter(|(_, n)| n.network().is_some()) {
        let mut line = format!("nic{i}:     {n}");
        if let Some(m) = n.mac() {
            line.push_str(&format!(" mac {m}"));
        }
        if let Some(a) = n.address() {
            line.push_str(&format!(" address {a}"));
        }
        println!("{line}");
    }
    if let Some(c) = &v.config.cloud_init {
        let host = c.hostname.as_deref().unwrap_or("(the VM's name)");
        let data = if c.user_data.is_some() { "own user-data" } else { "default user-data" };
        println!("cloud-init: hostname {host}, {} ssh key(s), {data}", c.ssh_keys.len());
    }
    for vol in &v.config.volumes {
        let at = vol.version.map(|n| format!("@{n}")).unwrap_or_default();
        let mode = if vol.readonly { "read-only" } else { "read-write" };
        println!("volume:   {}{at} {mode}{}", vol.name, vol.serial.as_deref().map(|s| format!(" serial {s}")).unwrap_or_default());
    }
    if let Some(s) = &v.saved_image {
        println!("saved:    {s}");
    }
    if let Some(m) = &v.migration {
        let mut line = format!("{} -> {} {}", m.from, m.to, m.status.as_str());
        if let (Some(d), Some(t)) = (m.downtime_ms, m.total_ms) {
            line.push_str(&format!(", downtime {d} ms, total {t} ms"));
        }
        if let Some(e) = &m.error {
            line.push_str(&format!(": {e}"));
        } else if m.status == vgrid_api::migrate::MigrationStatus::Active {
            line.push_str(&format!(": {}", m.phase));
        }
        println!("migration: {line}");
    }
    println!("created:  {}", age(v.created));
}

/// The cloud-init data of `vm run`'s --ssh-key, --user-data and --hostname (none: no seed).
fn cloud_init(a: &RunArgs) -> anyhow::Result<Option<vgrid_api::cloudinit::CloudInit>> {
    use anyhow::Context;
    if a.ssh_keys.is_empty() && a.user_data.is_none() && a.hostname.is_none() {
        return Ok(None);
    }
    let mut ssh_keys = Vec::new();
    for f in &a.ssh_keys {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading ssh keys from {}", f.display()))?;
        let before = ssh_keys.len();
        ssh_keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        if ssh_keys.len() == before {
            bail!("{} holds no ssh public key", f.display());
        }
    }
    let user_data = match &a.user_data {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("reading user-data from {} (it must be text)", f.display()))?),
        None => None,
    };
    let c = vgrid_api::cloudinit::CloudInit { ssh_keys, hostname: a.hostname.clone(), user_data };
    // Said here with the file's name; the coordinator checks again.
    c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Some(c))
}

async fn run_vm(ctx: &Ctx, mut a: RunArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(a.timeout);
    if a.stage_in.is_empty() && a.stage_out.is_empty() {
        let v = start_vm(ctx, &a, t0, deadline).await?;
        report_running(ctx, &a, &v, t0, true)?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan = crate::stage::Plan { ins: a.stage_in.clone(), outs: a.stage_out.clone(), extra: a.stage_size };
    plan.check()?;
    let name = crate::stage::volume_name(a.name.as_deref());
    // Without --stage-out nothing is collected: the coordinator removes the staging volume
    // once the VM has ended (the guest copied its inputs at boot; until the end the volume is
    // attached read-write and cannot go).
    let remove_with_vm = plan.outs.is_empty() && !a.keep_stage;
    let attach = crate::stage::prepare(ctx, &a.server, &plan, &name, remove_with_vm).await?;
    a.volumes.push(attach);
    let started = match start_vm(ctx, &a, t0, deadline).await {
        Ok(v) => v,
        Err(e) => {
            // A VM that never ran holds nothing worth keeping on it: its inputs are local.
            crate::stage::remove(ctx, &name).await;
            return Err(e);
        }
    };
    report_running(ctx, &a, &started, t0, plan.outs.is_empty())?;
    let v = started.0;
    if plan.outs.is_empty() {
        if !ctx.json {
            if remove_with_vm {
                eprintln!("staging volume {name}: removed by the coordinator when the VM ends (`vgrid vm show` says if that fails)");
            } else {
                eprintln!("staging volume {name} kept (--keep-stage): remove it once the VM is gone (`vgrid volume rm {name}`)");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let collected = async {
        let version = crate::stage::wait_powered_off(ctx, &v.id, &name, 1, deadline).await?;
        crate::stage::collect(ctx, &a.server, &format!("{name}@{version}"), &plan.outs).await
    }
    .await;
    if let Err(e) = collected {
        return Err(e.context(format!("stage-out of VM {}: the staging volume {name} is kept (`vgrid volume export {name} FILE`)", v.id)));
    }
    if a.keep_stage {
        eprintln!("staging volume {name} kept (--keep-stage)");
    } else {
        crate::stage::remove(ctx, &name).await;
    }
    if ctx.json {
        let v: VmRecord = ctx.api().get(&format!("/api/v1/vms/{}", v.id)).await?;
        print_json(&v)?;
    } else {
        println!("VM {} ({}) powered off; {} output(s) staged out", v.id, v.name, plan.outs.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates the VM and waits until it runs (and `--wait-for` TEXT shows).
async fn start_vm(ctx: &Ctx, a: &RunArgs, t0: Instant, deadline: Instant) -> anyhow::Result<(VmRecord, Duration)> {
    let api = ctx.api();
    let req = VmCreate {
        image: a.image.clone(),
        name: a.name.clone(),
        cpus: a.cpus,
        memory_mib: a.memory,
        forwards: a.forwards.clone(),
        nics: a.nics.clone(),
        accel: a.accel.clone(),
        require: a.require.clone(),
        rank: a.rank.clone(),
        no_wait: a.no_wait,
        resources: a.resources.to_api(),
        volumes: a.volumes.clone(),
        cloud_init: cloud_init(a)?,
        // Sent again to another coordinator if this one fails: the id makes it one VM.
        request_id: Some(format!("{:032x}", rand::random::<u128>())),
    };
    let mut v: VmRecord = api.post_retryable("/api/v1/vms", &req).await?;
    let quiet = ctx.json;
    let spinner = crate::output::Progress::spinner(quiet, format!("{} {}: {}", v.id, v.name, v.state.as_str()));
    let mut last_phase = String::new();
    loop {
        if v.phase != last_phase {
            spinner.set_message(format!("{} {}: {} ({:.1}s)", v.id, v.name, v.phase, t0.elapsed().as_secs_f64()));
            last_phase = v.phase.clone();
        }
        match v.state {
            VmState::Running => break,
            VmState::Failed | VmState::Stopped | VmState::Stopping => {
                spinner.finish_and_clear();
                if quiet {
                    print_json(&v)?;
                }
                bail!("VM {} {}: {}", v.id, v.state.as_str(), v.reason.clone().unwrap_or_else(|| "no reason recorded".into()));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            spinner.finish_and_clear();
            bail!("VM {} is still {} after {}s; it keeps starting (see `vgrid vm show {}`)", v.id, v.phase, a.timeout, v.id);
        }
        // Long poll: the coordinator answers when the VM leaves this state and phase.
        let q = format!("wait_ms=1000&state={}&phase={}", v.state.as_str(), urlencode(&v.phase));
        match api.get(&format!("/api/v1/vms/{}?{q}", v.id)).await {
            Ok(now) => v = now,
            Err(e) if HttpError::is_transient(&e) => tokio::time::sleep(Duration::from_millis(400)).await,
            Err(e) => return Err(e),
        }
    }
    let running_at = t0.elapsed();
    if let Some(text) = &a.wait_for {
        spinner.set_message(format!("{} {}: waiting for {:?} on the console", v.id, v.name, text));
        let mut offset = 0u64;
        let mut seen = String::new();
        loop {
            // A host that does not answer for a while (its agent restarting, a partition) is no
            // reason to give up: the VM's record says when it really ended.
            match api.get::<ConsoleChunk>(&format!("/api/v1/vms/{}/console?offset={offset}", v.id)).await {
                Ok(c) => {
                    offset = c.next;
                    seen.push_str(&c.data);
                    spinner.set_message(format!("{} {}: waiting for {:?} on the console", v.id, v.name, text));
                }
                Err(e) if HttpError::is_transient(&e) => {
                    spinner.set_message(format!("{} {}: waiting for {:?}; the console is unreachable now: {e}", v.id, v.name, text));
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                Err(e) => return Err(e),
            }
            if seen.contains(text.as_str()) {
                break;
            }
            // Keep only a tail long enough to match TEXT across page boundaries.
            if seen.len() > 4 * text.len() + 4096 {
                let cut = seen.len() - 2 * text.len();
                let cut = (cut..seen.len()).find(|&i| seen.is_char_boundary(i)).unwrap_or(seen.len());
                seen.drain(..cut);
            }
            let cur: VmRecord = match api.get(&format!("/api/v1/vms/{}", v.id)).await {
                Ok(cur) => cur,
                Err(e) if HttpError::is_transient(&e) => v.clone(),
                Err(e) => return Err(e),
            };
            if !cur.state.is_active() {
                spinner.finish_and_clear();
                bail!("VM {} {} before {:?} appeared: {}", v.id, cur.state.as_str(), text, cur.reason.unwrap_or_default());
            }
            if Instant::now() > deadline {
                spinner.finish_and_clear();
                bail!("{:?} did not appear on the console of VM {} within {}s (it keeps running)", text, v.id, a.timeout);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    spinner.finish_and_clear();
    Ok((v, running_at))
}

/// Says the VM runs (`json`: prints its record).
fn report_running(ctx: &Ctx, a: &RunArgs, (v, running_at): &(VmRecord, Duration), t0: Instant, json: bool) -> anyhow::Result<()> {
    if ctx.json {
        if json {
            print_json(v)?;
        }
    } else {
        let mut msg = format!(
            "VM {} ({}) running on {} [{}], started in {:.1}s",
            v.id,
            v.name,
            v.host.clone().unwrap_or_default(),
            v.accel.map(|a| a.to_string()).unwrap_or_default(),
            running_at.as_secs_f64()
        );
        if let Some(t) = &a.wait_for {
            msg.push_str(&format!("; {:?} seen after {:.1}s", t, t0.elapsed().as_secs_f64()));
        }
        println!("{msg}");
        eprintln!("console: vgrid vm console {}   logs: vgrid vm logs {}", v.id, v.id);
    }
    Ok(())
}

async fn logs(ctx: &Ctx, id: &str, follow: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let api = ctx.api();
    let mut offset = 0u64;
    loop {
        let c: ConsoleChunk = api.get(&format!("/api/v1/vms/{id}/console?offset={offset}")).await?;
        let got = c.next > offset;
        offset = c.next;
        print!("{}", c.data);
        std::io::stdout().flush().ok();
        if !follow {
            if got {
                continue; // more pages
            }
            return Ok(());
        }
        if !got {
            let v: VmRecord = api.get(&format!("/api/v1/vms/{id}")).await?;
            if !v.state.is_active() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[derive(Args, Debug)]
pub struct FuturesArgs {
    /// Requirement over the host ad (CEL), e.g. 'host.labels.site == "uf"'; empty: any host.
    #[arg(default_value = "")]
    pub require: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Image the VM would run (checks its architecture).
    #[arg(long)]
    pub image: Option<String>,
    /// A network interface the VM would have (as `vm run --net`); repeatable.
    #[arg(long = "net", value_name = "MODE", value_parser = |s: &str| s.parse::<vgrid_api::vm::Nic>())]
    pub nics: Vec<vgrid_api::vm::Nic>,
}

pub async fn futures(ctx: &Ctx, a: FuturesArgs) -> anyhow::Result<ExitCode> {
    let q = FuturesQuery {
        require: Some(a.require.clone()).filter(|r| !r.trim().is_empty()),
        cpus: a.cpus,
        memory_mib: a.memory,
        image: a.image.clone(),
        nics: a.nics.clone(),
    };
    let answers: Vec<Future> = ctx.api().post("/api/v1/futures", &q).await?;
    if ctx.json {
        print_json(&answers)?;
    } else {
        let rows = answers
            .iter()
            .map(|f| {
                vec![
                    f.host.clone(),
                    format!("{:?}", f.state).to_lowercase(),
                    if f.could_start { "yes".into() } else { "no".into() },
                    f.why_not.clone().unwrap_or_default(),
                ]
            })
            .collect();
        println!("{}", table(&["HOST", "STATE", "COULD START", "WHY NOT"], rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a query value (everything but ASCII letters, digits and `-._~`).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
