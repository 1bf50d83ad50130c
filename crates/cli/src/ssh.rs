//! `vgrid vm ssh`: OpenSSH to a VM wherever it runs. A VM with a user-mode interface is reached
//! through the coordinator and its host over the user's authenticated connection (ssh's
//! `ProxyCommand` is `vgrid vm ssh-proxy VM`; the host agent connects to the guest's port 22
//! through QEMU's forward on the host's loopback); one with only a site network at its address.
//! Host keys are remembered per VM (`HostKeyAlias=vgrid-ID`) in the config directory's
//! `known_hosts`, trusted on first use, as a cloud user does with a new instance.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use vgrid_api::vm::{Nic, VmRecord, VmState};

use crate::Ctx;

/// `vgrid vm ssh VM [-l USER] [-i KEY] [-- SSH-ARGS... [COMMAND]]`
#[derive(Args, Debug)]
pub struct SshArgs {
    /// The VM (id or name).
    pub id: String,
    /// The user to log in as (a stock cloud image's own user, e.g. `debian`, also takes the
    /// keys given with `vm run --ssh-key`; vgrid's default user-data lets root in with them).
    #[arg(long, short = 'l', default_value = "root")]
    pub user: String,
    /// The private key (ssh's -i) [default: what ssh picks: the agent, ~/.ssh/id_*].
    #[arg(long, short = 'i', value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Print the ssh command line instead of running it (for scripts, scp and rsync -e).
    #[arg(long)]
    pub print: bool,
    /// After `--`: ssh options, then the command to run, e.g. `vgrid vm ssh web -- uname -a`.
    #[arg(last = true, value_name = "SSH-ARGS")]
    pub args: Vec<String>,
}

/// Runs ssh (replacing this process) to VM `a.id`.
pub async fn ssh(ctx: &Ctx, a: SshArgs) -> anyhow::Result<()> {
    let v: VmRecord = ctx.api().get(&format!("/api/v1/vms/{}", a.id)).await?;
    if v.state != VmState::Running {
        bail!("VM {} ({}) is {}: ssh needs it running", v.id, v.name, v.state.as_str());
    }
    let argv = command(ctx, &v, &a)?;
    if a.print {
        println!("{}", argv.iter().map(|s| shell_quote(s)).collect::<Vec<_>>().join(" "));
        return Ok(());
    }
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    Err(anyhow!("cannot run {}: {err} (install OpenSSH's client, Debian's openssh-client)", argv[0]))
}

/// The ssh command line for VM `v`.
fn command(ctx: &Ctx, v: &VmRecord, a: &SshArgs) -> anyhow::Result<Vec<String>> {
    let dir = crate::auth::config_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let known = dir.join("known_hosts");
    let mut argv: Vec<String> = vec!["ssh".into()];
    let mut opt = |o: String| argv.extend(["-o".to_string(), o]);
    opt(format!("UserKnownHostsFile={}", known.display()));
    opt("StrictHostKeyChecking=accept-new".into());
    opt(format!("HostKeyAlias=vgrid-{}", v.id));
    let user_mode = v.config.net.nics.iter().any(|n| matches!(n, Nic::User { .. }));
    let target = if user_mode {
        let exe = std::env::current_exe().context("finding the vgrid executable for ssh's ProxyCommand")?;
        opt(format!("ProxyCommand={} --url {} vm ssh-proxy {}", shell_quote(&exe.display().to_string()), shell_quote(&ctx.url), v.id));
        format!("vgrid-{}", v.id)
    } else if let Some(addr) = v.config.net.nics.iter().find_map(|n| n.address()) {
        addr.to_string()
    } else {
        bail!(
            "VM {} ({}) has neither a user-mode interface nor a site address: reach it over its tunnel network from your LAN",
            v.id,
            v.name
        );
    };
    if let Some(i) = &a.identity {
        argv.extend(["-i".to_string(), i.display().to_string(), "-o".into(), "IdentitiesOnly=yes".into()]);
    }
    argv.extend(["-l".to_string(), a.user.clone()]);
    // ssh options come before the destination, the command after it.
    let (opts, cmd) = split_options(&a.args);
    argv.extend(opts);
    argv.push(target);
    argv.extend(cmd);
    Ok(argv)
}

/// `SSH-ARGS` as ssh options (leading `-x` words and their values) and the remote command.
fn split_options(args: &[String]) -> (Vec<String>, Vec<String>) {
    // ssh's options that take a value.
    const WITH_VALUE: &str = "BbcDEeFIiJLlmOoPpQRSWw";
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') && args[i] != "--" {
        let flag = args[i].chars().nth(1).unwrap_or(' ');
        i += if args[i].len() == 2 && WITH_VALUE.contains(flag) { 2 } else { 1 };
    }
    let i = i.min(args.len());
    let rest = if args.get(i).map(String::as_str) == Some("--") { &args[i + 1..] } else { &args[i..] };
    (args[..i].to_vec(), rest.to_vec())
}

/// `s` quoted for a POSIX shell (ssh runs `ProxyCommand` through one).
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_before_the_destination_and_the_command_after() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(split_options(&s(&["uname", "-a"])), (vec![], s(&["uname", "-a"])));
        assert_eq!(split_options(&s(&["-p", "22", "-v", "hostname"])), (s(&["-p", "22", "-v"]), s(&["hostname"])));
        assert_eq!(split_options(&s(&["-oBatchMode=yes", "--", "-x"])), (s(&["-oBatchMode=yes"]), s(&["-x"])));
        assert_eq!(split_options(&s(&["-o"])), (s(&["-o"]), vec![]));
        assert_eq!(shell_quote("/usr/bin/vgrid"), "/usr/bin/vgrid");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }
}
