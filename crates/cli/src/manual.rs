//! `vgrid completions SHELL` and `vgrid man [DIR]`: shell completion scripts and man pages,
//! generated from the same clap definitions that parse the command line (so they never drift).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    ///
    /// bash: `vgrid completions bash > /etc/bash_completion.d/vgrid` (or `source <(vgrid
    /// completions bash)` in ~/.bashrc); zsh: into a directory on $fpath as `_vgrid`; fish:
    /// `vgrid completions fish > ~/.config/fish/completions/vgrid.fish`.
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write a page per command (vgrid.1, vgrid-vm.1, vgrid-vm-run.1, ...) into DIR (made when
    /// missing) and list them; without DIR, print vgrid(1) to stdout
    /// (`vgrid man | man -l -`).
    pub dir: Option<PathBuf>,
}

pub fn completions(a: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "vgrid", &mut buf);
    print(&buf)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is no error.
fn print(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub fn man(a: ManArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    cmd.build();
    match a.dir {
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf)?;
            return print(&buf);
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut written = Vec::new();
            write_pages(&cmd, "vgrid", &dir, &mut written)?;
            for p in &written {
                println!("{}", p.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `NAME.1` for `cmd` and, recursively, `NAME-SUB.1` for each visible subcommand.
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    // clap names commands with &'static str; the page's name lives as long as this process.
    let title: &'static str = Box::leak(name.to_string().into_boxed_str());
    let page = cmd.clone().name(title).bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
