//! The `vgrid` command line. It parses arguments, launches a role (`up`, `image-server`) or
//! speaks the REST API as a client, and prints tables, JSON or progress bars. It owns no
//! protocol or storage logic of its own: everything it does goes through the role crates or
//! the REST API.

mod auth;
mod client;
mod console;
mod drain;
mod image;
mod manual;
mod migrate;
mod net;
mod output;
mod roles;
mod ssh;
mod sshagent;
mod stage;
mod store;
mod suspend;
mod trust;
mod tunnel;
mod tunnel_switch;
mod usage;
mod vm;
mod volume;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub use client::Api;

/// Default address of `vgrid up` and of the coordinator.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_URL: &str = "https://127.0.0.1:7070";

#[derive(Parser, Debug)]
#[command(name = "vgrid", version, about = "Grid computing on virtual machines: run a VM image on whichever host can take it, its blocks streamed on demand.",
    long_about = None, propagate_version = true)]
pub struct Cli {
    /// URL of the coordinator's REST API.
    #[arg(long, global = true, env = "VGRID_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run every role (coordinator, image server, host agent) in one process.
    ///
    /// Ctrl-C (or SIGTERM) stops the machine's grid: its guests are powered down first (ACPI,
    /// then killed after a timeout). A separate `vgrid host` instead leaves its guests running
    /// for the next agent to adopt.
    Up(roles::UpArgs),
    /// Run a coordinator only (REST API, information service, placement).
    ///
    /// SIGTERM/SIGINT: stops accepting, gives requests in flight a few seconds, then exits;
    /// the state is on disk after every write.
    Coordinator(roles::CoordinatorArgs),
    /// Run an image server only (optionally advertising to a coordinator).
    ImageServer(roles::ImageServerArgs),
    /// Import, list, inspect, export, serve and stage images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Which hosts could start a VM like this now, and why not the others.
    Futures(vm::FuturesArgs),
    /// Run and control virtual machines.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Run a compute host (`vgrid host --coordinator URL`), list and show hosts (`vgrid host
    /// ls|show`), or take one out of service and back (`vgrid host drain|undrain NAME`).
    ///
    /// The agent on SIGTERM/SIGINT (a restart, an upgrade) exits within seconds and leaves its
    /// guests running: started again with the same --data-dir it adopts them (same QEMU
    /// processes; their disk reads wait meanwhile). To empty a host first, drain it.
    Host(HostArgs),
    /// Log in: prove you hold your SSH key (a challenge signed with the key file or through your
    /// ssh-agent) and keep a token for this coordinator. Other commands log in by themselves
    /// when a key is found, and again when their token expired.
    Login(auth::LoginArgs),
    /// Forget and revoke the token for this coordinator.
    Logout,
    /// Show who you are logged in as, your keys and quotas.
    Whoami,
    /// Register, list and remove users, and set their quotas (admins).
    #[command(subcommand)]
    User(auth::UserCmd),
    /// The audit log: every state-changing request and every refused one (admins see all).
    Audit(auth::AuditArgs),
    /// Resource use per VM and per user: CPU-seconds, memory MiB-seconds, disk and image bytes.
    Usage(usage::UsageArgs),
    /// The coordinator's CA as pinned by this CLI (its fingerprint: compare it out of band,
    /// give it to others as $VGRID_CA_FINGERPRINT).
    Ca,
    /// Volumes: your data on the image servers, attached to VMs as disks on demand
    /// (`vm run --volume NAME`), with one writer at a time and versions.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Networks: site networks that hosts attach to, and tunnel networks to your own LAN.
    #[command(subcommand)]
    Net(net::NetCmd),
    /// Join your own LAN to your VMs on tunnel network NAME (`vm run --net tunnel:NAME`).
    ///
    /// Runs on your machine, as the user who owns NAME (`vgrid net create NAME --tunnel`), and
    /// carries Ethernet frames between a local device and every VM of yours on NAME, wherever they
    /// run, through the coordinator (an authenticated, encrypted WebSocket on its HTTPS port: it
    /// works when neither you nor the hosts accept incoming connections), and directly to each
    /// host that takes it (a WebSocket to the host agent, TLS with its grid certificate, admitted
    /// by a one-time ticket from the coordinator; the coordinator then never sees those frames;
    /// `--relay-only` turns this off). The VMs then take their addresses from your LAN (your DHCP
    /// server, or static ones), as machines plugged into it.
    ///
    /// Local ends: `--tap TAP` (made when missing and removed when this command ends; an existing
    /// tap is used as it is), `--bridge BR` (a tap, --tap or vgt-NAME, made and enslaved to your
    /// bridge BR), or `--user-mode` (no privileges: the tunnel ends in passt, and the VMs' traffic
    /// leaves as your own connections; passt answers their DHCP). Reconnects with backoff when the
    /// coordinator restarts; Ctrl-C ends it.
    Tunnel(tunnel::TunnelArgs),
    /// One-time tokens for hosts and image servers to join the grid (admins).
    #[command(subcommand)]
    JoinToken(trust::JoinTokenCmd),
    /// Print a shell completion script (`vgrid completions bash|zsh|fish`).
    Completions(manual::CompletionsArgs),
    /// Write man pages generated from this command line (`vgrid man DIR`), or print vgrid(1).
    Man(manual::ManArgs),
}

/// Entry point of the `vgrid` binary.
/// Raises this process's soft limit of open files to its hard limit (at most 2^20), as servers
/// do: a host's block proxy keeps up to half of it open as cached chunk files
/// (`vgrid_blockproxy::default_max_open_files`); the shell's usual 1024 would make a random
/// reader of a big image reopen a chunk file per read.
fn raise_open_file_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub fn main() -> ExitCode {
    raise_open_file_limit();
    let cli = Cli::parse();
    init_tracing(
        matches!(cli.cmd, Cmd::Up(_) | Cmd::ImageServer(_) | Cmd::Coordinator(_) | Cmd::Host(HostArgs { cmd: None, .. }))
            || matches!(cli.cmd, Cmd::Image(image::ImageCmd::Nbd(_))),
    );
    // `vgrid tunnel` runs on one thread: its frames pass from task to task without waking
    // another thread, and a link waiting for an answer finds its event at once (tunnel.rs).
    let mut builder = if matches!(cli.cmd, Cmd::Tunnel(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(run(cli));
    // A role that returned has stopped serving: tasks still running (connections dropped after
    // the shutdown grace, loops) end here, and blocking work gets a short while, not for ever.
    rt.shutdown_timeout(std::time::Duration::from_secs(3));
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(server: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if server { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: a log file or a service manager's journal gets plain text
    // (and `NO_COLOR` turns them off anywhere).
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx { url: cli.url.trim_end_matches('/').to_string(), json: cli.json };
    match cli.cmd {
        Cmd::Up(a) => roles::up(a).await,
        Cmd::ImageServer(a) => roles::image_server(a).await,
        Cmd::Coordinator(a) => roles::coordinator(a).await,

        Cmd::Image(c) => image::run(&ctx, c).await,
        Cmd::Vm(c) => vm::run(&ctx, c).await,
        Cmd::Futures(a) => vm::futures(&ctx, a).await,
        Cmd::Host(HostArgs { cmd: Some(c), .. }) => vm::run_host(&ctx, c).await,
        Cmd::Host(HostArgs { cmd: None, agent }) => roles::host(agent).await,
        Cmd::Login(a) => auth::login_cmd(&ctx, a).await,
        Cmd::Logout => auth::logout_cmd(&ctx).await,
        Cmd::Whoami => auth::whoami_cmd(&ctx).await,
        Cmd::User(c) => auth::user_cmd(&ctx, c).await,
        Cmd::Audit(a) => auth::audit_cmd(&ctx, a).await,
        Cmd::Usage(a) => usage::run(&ctx, a).await,
        Cmd::Ca => trust::ca_cmd(&ctx).await,
        Cmd::Net(c) => net::run(&ctx, c).await,
        Cmd::Volume(c) => volume::run(&ctx, c).await,
        Cmd::Tunnel(a) => tunnel::run(&ctx, a).await,
        Cmd::JoinToken(c) => trust::join_token_cmd(&ctx, c).await,
        Cmd::Completions(a) => manual::completions(a),
        Cmd::Man(a) => manual::man(a),
    }
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HostArgs {
    #[command(subcommand)]
    pub cmd: Option<vm::HostCmd>,
    #[command(flatten)]
    pub agent: roles::HostAgentArgs,
}

/// What every client command gets: where the API is and how to print.
pub struct Ctx {
    pub url: String,
    pub json: bool,
}

impl Ctx {
    pub fn api(&self) -> Api {
        Api::new(&self.url)
    }
}
