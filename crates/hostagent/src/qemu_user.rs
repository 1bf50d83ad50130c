//! The unprivileged user guests' QEMU processes run as.
//!
//! When the agent runs as root, every QEMU is started with its uid, gid and supplementary
//! groups already dropped to a dedicated system user (default `vgrid-qemu`): the agent forks,
//! the child calls `setgroups`/`setgid`/`setuid` and only then executes QEMU, so QEMU never
//! holds root, not even while it parses its command line. (QEMU's own `-run-with user=` drops
//! privileges late, after its seccomp filter is installed, and `-sandbox
//! elevateprivileges=deny` then kills it with SIGSYS on its own `setuid`: the two cannot be
//! combined, and the sandbox is worth more.)
//!
//! Because QEMU starts unprivileged, everything it opens must be reachable by that user:
//! the runtime directory (owned by it, mode 0700, with the overlay, kernel, initrd and any
//! incoming state inside, handed over before the spawn), the block proxy's NBD socket (group
//! of that user, mode 0660) and every directory above them (searchable). What it creates later
//! (console log, pid file, QMP and console sockets, `state.save` of a suspend) lands in its own
//! runtime directory. The agent, as root, still reads and drives all of it.

use std::path::{Path, PathBuf};

/// Default name of the QEMU user (`--qemu-user`).
pub const DEFAULT_QEMU_USER: &str = "vgrid-qemu";

/// An unprivileged local user for QEMU: ids resolved once at agent start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm` for `/dev/kvm`), the primary one included.
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum QemuUserError {
    #[error("QEMU user {name:?} does not exist and could not be created ({cause}); create it with `useradd --system --no-create-home --shell /usr/sbin/nologin --user-group {name}` (scripts/install-deps.sh does) or name another with --qemu-user")]
    Missing { name: String, cause: String },
    #[error("QEMU user {name:?} has uid 0: QEMU must run unprivileged; name an unprivileged user with --qemu-user")]
    Root { name: String },
    #[error("QEMU user {name:?} cannot reach {path}: {dir} is mode {mode:o} (owner {owner}, group {group}) and not searchable by it; use a --data-dir under a directory it can search (e.g. /var/lib/vgrid) or allow it (chmod o+x {dir})")]
    Unreachable { name: String, path: PathBuf, dir: PathBuf, mode: u32, owner: u32, group: u32 },
    #[error("QEMU user {name:?}: {cause}")]
    Lookup { name: String, cause: String },
}

impl QemuUser {
    /// The user `name` from the password database, `None` if there is no such user.
    pub fn lookup(name: &str) -> Result<Option<QemuUser>, QemuUserError> {
        let lookup_err = |cause: String| QemuUserError::Lookup { name: name.to_string(), cause };
        let Some(u) = nix::unistd::User::from_name(name).map_err(|e| lookup_err(e.to_string()))? else {
            return Ok(None);
        };
        let cname = std::ffi::CString::new(name).map_err(|_| lookup_err("the name holds a NUL byte".into()))?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid).map_err(|e| lookup_err(format!("its groups: {e}")))?;
        let mut groups: Vec<u32> = groups.into_iter().map(|g| g.as_raw()).collect();
        groups.sort_unstable();
        groups.dedup();
        Ok(Some(QemuUser { name: name.to_string(), uid: u.uid.as_raw(), gid: u.gid.as_raw(), groups }))
    }

    /// The user `name`, created as a system user (no home, no login shell) if it is missing.
    /// Needs root to create it.
    pub fn ensure(name: &str) -> Result<QemuUser, QemuUserError> {
        if name.is_empty() || name.starts_with('-') || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(QemuUserError::Lookup { name: name.to_string(), cause: "not a valid user name".into() });
        }
        let user = match Self::lookup(name)? {
            Some(u) => u,
            None => {
                let out = std::process::Command::new("useradd")
                    .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--user-group"])
                    .arg(name)
                    .output()
                    .map_err(|e| QemuUserError::Missing { name: name.to_string(), cause: format!("running useradd: {e}") })?;
                if !out.status.success() {
                    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    return Err(QemuUserError::Missing { name: name.to_string(), cause: format!("useradd {}: {err}", out.status) });
                }
                tracing::info!(user = name, "created the system user QEMU runs as");
                Self::lookup(name)?.ok_or_else(|| QemuUserError::Missing {
                    name: name.to_string(),
                    cause: "useradd succeeded but the user is not in the password database".into(),
                })?
            }
        };
        if user.uid == 0 {
            return Err(QemuUserError::Root { name: name.to_string() });
        }
        Ok(user)
    }

    /// Checks that every directory from `/` down to `path` is searchable by this user (mode
    /// bits; ACLs are not consulted).
    pub fn check_reachable(&self, path: &Path) -> Result<(), QemuUserError> {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        for dir in path.ancestors() {
            let Ok(m) = std::fs::metadata(dir) else { continue };
            let mode = m.mode() & 0o7777;
            let ok = if m.uid() == self.uid {
                mode & 0o100 != 0
            } else if self.groups.contains(&m.gid()) || m.gid() == self.gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !ok {
                return Err(QemuUserError::Unreachable {
                    name: self.name.clone(),
                    path: path.clone(),
                    dir: dir.to_path_buf(),
                    mode,
                    owner: m.uid(),
                    group: m.gid(),
                });
            }
        }
        Ok(())
    }

    /// Hands `dir` (mode 0700) and the files directly in it to this user: QEMU opens them
    /// after the privilege drop, and creates its sockets, logs and saved states there.
    pub fn give(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::lchown;
        lchown(dir, Some(self.uid), Some(self.gid))?;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                continue;
            }
            match lchown(e.path(), Some(self.uid), Some(self.gid)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Makes `cmd` drop to this user (supplementary groups, gid, then uid) in the child before
    /// it executes the program.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        let groups: Vec<libc::gid_t> = self.groups.clone();
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: the closure runs in the forked child before exec and only makes three
        // async-signal-safe system calls on data prepared before the fork (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Takes `dir` back from QEMU's user before the agent (root) writes into it again (a relaunch
/// in a kept runtime directory): owner the agent, mode 0700, so that no QEMU of that user can
/// add entries meanwhile; then removes what that user could have planted to redirect the
/// agent's writes: symbolic links, and files with more than one link.
pub fn reclaim(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory", dir.display())));
    }
    if (m.uid(), m.gid()) != me {
        std::os::unix::fs::lchown(dir, Some(me.0), Some(me.1))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        if m.file_type().is_symlink() || (m.is_file() && m.nlink() > 1) {
            tracing::warn!(path = %e.path().display(), "removing a link planted in a runtime directory");
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Writes `data` to `path` as `std::fs::write` does, but never through a symbolic link and
/// never into a file with other hard links: what the agent (root) writes into a runtime
/// directory that QEMU's user owns (usage, launch record, markers) cannot be redirected by a
/// compromised QEMU to a host file.
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let m = f.metadata()?;
    if !m.is_file() || m.nlink() > 1 {
        return Err(std::io::Error::other(format!("{} is not a plain file of its own; not written", path.display())));
    }
    f.set_len(0)?;
    f.write_all(data)
}

/// Replaces `path` with a file holding `data`, atomically: the data goes to a new file
/// `PATH.tmp` (created exclusively, never through a link) that is then renamed over `path`.
/// A reader, or an agent restarted after being killed at any instant, sees the old content or
/// the new one, never an empty or half-written file (as [`write_file`] can leave: it truncates
/// first). The rename replaces a link planted at `path` instead of writing through it.
pub fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // A leftover of an agent killed between create and rename (or anything planted there).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data));
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Opens `path` for reading, never through a symbolic link (see [`read_file`]).
pub fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Reads `path` as `std::fs::read` does, but never through a symbolic link: a runtime
/// directory's files read by the agent (root) for the VM's owner cannot be links to host files.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = open_file(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// The user QEMU will run as for an agent whose QEMU user option is `name`: the dedicated
/// user when the agent is root (created if missing; `data_dir` must be reachable by it), else
/// `None`, QEMU running as the agent's own user (logged).
pub fn resolve(name: &str, data_dir: &Path) -> Result<Option<QemuUser>, QemuUserError> {
    if !nix::unistd::geteuid().is_root() {
        tracing::info!(
            uid = nix::unistd::geteuid().as_raw(),
            "the agent is not root: QEMU runs as the agent's own user (--qemu-user {name} applies only to an agent running as root)"
        );
        return Ok(None);
    }
    let user = QemuUser::ensure(name)?;
    user.check_reachable(data_dir)?;
    tracing::info!(user = %user.name, uid = user.uid, gid = user.gid, "QEMU runs as an unprivileged user");
    Ok(Some(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_of_a_missing_user_is_none_and_root_is_refused() {
        assert_eq!(QemuUser::lookup("vgrid-no-such-user-xyz").unwrap(), None);
        let root = QemuUser::lookup("root").unwrap().expect("root exists");
        assert_eq!(root.uid, 0);
        if nix::unistd::geteuid().is_root() {
            assert!(matches!(QemuUser::ensure("root"), Err(QemuUserError::Root { .. })));
        }
        assert!(matches!(QemuUser::ensure("-x"), Err(QemuUserError::Lookup { .. })));
    }

    #[test]
    fn reclaim_removes_planted_links_and_closes_the_directory() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("spec.json")).unwrap();
        std::fs::hard_link(&victim, dir.join("kernel")).unwrap();
        std::fs::write(dir.join("console.log"), b"log").unwrap();
        reclaim(&dir).unwrap();
        assert!(dir.join("spec.json").symlink_metadata().is_err(), "the symlink stayed");
        assert!(!dir.join("kernel").exists(), "the hard link stayed");
        assert!(dir.join("console.log").exists(), "a plain file was removed");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn write_file_refuses_links() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("sym")).unwrap();
        std::fs::hard_link(&victim, t.path().join("hard")).unwrap();
        assert!(write_file(&t.path().join("sym"), b"x").is_err());
        assert!(read_file(&t.path().join("sym")).is_err());
        assert_eq!(read_file(&victim).unwrap(), b"keep");
        assert!(write_file(&t.path().join("hard"), b"x").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let p = t.path().join("plain");
        write_file(&p, b"longer text").unwrap();
        write_file(&p, b"short").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
    }

    #[test]
    fn replace_file_is_atomic_and_never_writes_through_links() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let p = t.path().join("usage.json");
        replace_file(&p, b"longer text").unwrap();
        replace_file(&p, b"short").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
        assert!(!t.path().join("usage.json.tmp").exists(), "the temporary file stayed");
        // A leftover temporary file (an agent killed before its rename) is no obstacle.
        std::fs::write(t.path().join("usage.json.tmp"), b"half").unwrap();
        replace_file(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        // Links planted at the path or at the temporary path are replaced, not written through.
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("usage.json.tmp")).unwrap();
        replace_file(&p, b"x").unwrap();
        assert!(!p.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        std::fs::remove_file(&p).unwrap();
        std::fs::hard_link(&victim, &p).unwrap();
        replace_file(&p, b"y").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"y");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn a_private_ancestor_makes_a_directory_unreachable() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let inner = t.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(t.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A user that owns nothing here: `nobody`-like ids.
        let u = QemuUser { name: "someone".into(), uid: 65000, gid: 65000, groups: vec![65000] };
        u.check_reachable(&inner).expect("searchable all the way");
        std::fs::set_permissions(t.path().join("a"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = u.check_reachable(&inner).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("mode 700") && msg.contains("/a"), "{msg}");
        // Owned by the user: the owner bits count.
        let owner = QemuUser { uid: nix::unistd::geteuid().as_raw(), ..u };
        owner.check_reachable(&inner).expect("the owner may search");
    }
}
