//! Who the CLI is: the user's SSH key, login (a signed challenge), the token kept per
//! coordinator, and the `login`, `logout`, `whoami`, `user` and `audit` commands.
//!
//! Files, in the config directory (`$VGRID_CONFIG_DIR`, else `$XDG_CONFIG_HOME/vgrid`, else
//! `~/.config/vgrid`): `tokens.json` (a token per coordinator URL, mode 0600) and, when the
//! user has no SSH key, the `id_ed25519` key pair made for them by `vgrid up`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use ssh_key::PrivateKey;
use vgrid_api::auth::{AuditEntry, Challenge, ChallengeRequest, LoginRequest, LoginToken, Quota, UserCreate, UserInfo};

use crate::output::{print_json, table};
use crate::{Api, Ctx};

pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VGRID_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(d).join("vgrid");
    }
    home().join(".config").join("vgrid")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// The local user's name as a vgrid user name (`$VGRID_USER`, else the login name).
pub fn local_user() -> String {
    if let Ok(u) = std::env::var("VGRID_USER") {
        return u;
    }
    let raw = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        // SAFETY: getpwuid returns a pointer into static storage or null; read at once.
        unsafe {
            let pw = libc::getpwuid(libc::geteuid());
            if pw.is_null() {
                "user".into()
            } else {
                std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned()
            }
        }
    });
    let mut name: String = raw
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') { c } else { '-' })
        .take(32)
        .collect();
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        name.insert(0, 'u');
        name.truncate(32);
    }
    name
}

/// Private keys tried, in order: `$VGRID_KEY`, the key `vgrid up` made, then the usual SSH keys.
fn key_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(k) = std::env::var_os("VGRID_KEY") {
        v.push(PathBuf::from(k));
    }
    v.push(config_dir().join("id_ed25519"));
    for k in ["id_ed25519", "id_ecdsa", "id_rsa"] {
        v.push(home().join(".ssh").join(k));
    }
    v
}

fn read_private_key(path: &Path) -> anyhow::Result<PrivateKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the private key {}", path.display()))?;
    PrivateKey::from_openssh(&text).map_err(|e| anyhow!("{} is not an OpenSSH private key: {e}", path.display()))
}

/// The first private key found, with its path.
pub fn find_key() -> Option<(PathBuf, PrivateKey)> {
    key_candidates().into_iter().filter(|p| p.exists()).find_map(|p| read_private_key(&p).ok().map(|k| (p, k)))
}

/// The local user's key for bootstrapping the first admin: an existing one, or an ed25519 key
/// made in the config directory. Returns the public key line and where the private key is.
pub fn local_key_or_create() -> anyhow::Result<(String, PathBuf)> {
    if let Some((p, k)) = find_key() {
        return Ok((k.public_key().to_openssh().map_err(|e| anyhow!("{e}"))?, p));
    }
    let dir = config_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join("id_ed25519");
    let key = PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).map_err(|e| anyhow!("making a key: {e}"))?;
    let mut key = key;
    key.set_comment(format!("{}@vgrid", local_user()));
    let pem = key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| anyhow!("{e}"))?;
    let tmp = dir.join(format!(".id_ed25519.{}", std::process::id()));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(pem.as_bytes())?;
    }
    // Another process may have made one meanwhile: keep the first.
    let _ = std::fs::hard_link(&tmp, &dest);
    let _ = std::fs::remove_file(&tmp);
    let key = read_private_key(&dest)?;
    let public = key.public_key().to_openssh().map_err(|e| anyhow!("{e}"))?;
    let _ = std::fs::write(dir.join("id_ed25519.pub"), format!("{public}\n"));
    eprintln!("vgrid: made an ed25519 key for you in {}", dest.display());
    Ok((public, dest))
}

/// Reads a public key file (OpenSSH `.pub`), or the public half of a private key file.
pub fn read_public_key(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the key {}", path.display()))?;
    if text.contains("PRIVATE KEY") {
        let k = PrivateKey::from_openssh(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        return k.public_key().to_openssh().map_err(|e| anyhow!("{e}"));
    }
    let line = text.lines().find(|l| !l.trim().is_empty() && !l.starts_with('#')).unwrap_or("").trim().to_string();
    ssh_key::PublicKey::from_openssh(&line).map_err(|e| anyhow!("{} is not an OpenSSH public key: {e}", path.display()))?;
    Ok(line)
}

type Tokens = BTreeMap<String, LoginToken>;

fn tokens_path() -> PathBuf {
    config_dir().join("tokens.json")
}

fn load_tokens() -> Tokens {
    std::fs::read(tokens_path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn save_tokens(t: &Tokens) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = config_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".tokens.{}.json", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(t)?)?;
    drop(f);
    std::fs::rename(&tmp, tokens_path()).context("saving the token")?;
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The saved, unexpired token for a coordinator URL.
pub fn saved_token(base: &str) -> Option<String> {
    load_tokens().get(base).filter(|t| t.expires > now() + 5).map(|t| t.token.clone())
}

/// Logs in to `api` as `user` (default: the saved user for this URL, else the local user) with
/// the private key `key` (default: the first key found), keeps the token and returns it.
pub async fn login(api: &Api, user: Option<&str>, key: Option<&Path>) -> anyhow::Result<LoginToken> {
    let (path, key) = match key {
        Some(p) => (p.to_path_buf(), read_private_key(p)?),
        None => find_key().ok_or_else(|| {
            anyhow!("no SSH private key found (tried $VGRID_KEY, {}, ~/.ssh/id_ed25519, id_ecdsa, id_rsa); give one with --key", config_dir().join("id_ed25519").display())
        })?,
    };
    let user = match user {
        Some(u) => u.to_string(),
        None => load_tokens().get(&api.base).map(|t| t.user.clone()).unwrap_or_else(local_user),
    };
    let c: Challenge = api.post("/api/v1/auth/challenge", &ChallengeRequest { user: user.clone() }).await?;
    let signature = vgrid_coordinator::auth::sign_challenge(&key, &c.message).map_err(|e| anyhow!("signing with {}: {e}", path.display()))?;
    let t: LoginToken = api
        .post("/api/v1/auth/login", &LoginRequest { user: user.clone(), nonce: c.nonce, signature })
        .await
        .with_context(|| format!("logging in to {} as {user} with {}", api.base, path.display()))?;
    let mut all = load_tokens();
    all.retain(|_, v| v.expires > now());
    all.insert(api.base.clone(), t.clone());
    save_tokens(&all)?;
    api.set_token(Some(t.token.clone()));
    Ok(t)
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The vgrid user (default: the one of the last login here, else $VGRID_USER or your login name).
    #[arg(long)]
    pub user: Option<String>,
    /// The private key (OpenSSH format) whose public half is registered for the user (default:
    /// $VGRID_KEY, ~/.config/vgrid/id_ed25519, ~/.ssh/id_ed25519, id_ecdsa, id_rsa).
    #[arg(long)]
    pub key: Option<PathBuf>,
}

pub async fn login_cmd(ctx: &Ctx, a: LoginArgs) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    let t = login(&api, a.user.as_deref(), a.key.as_deref()).await?;
    if ctx.json {
        print_json(&t)?;
    } else {
        let left = t.expires.saturating_sub(now());
        println!("logged in to {} as {}{} (token valid for {}h{:02}m)", api.base, t.user, if t.admin { " (admin)" } else { "" }, left / 3600, left % 3600 / 60);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logout_cmd(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    if api.token().is_some() {
        let _: serde_json::Value = api.post("/api/v1/auth/logout", &serde_json::json!({})).await.unwrap_or_default();
    }
    let mut all = load_tokens();
    all.remove(&api.base);
    save_tokens(&all)?;
    if !ctx.json {
        println!("logged out of {}", api.base);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn whoami_cmd(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let u: UserInfo = ctx.api().get("/api/v1/whoami").await?;
    if ctx.json {
        print_json(&u)?;
    } else {
        println!("{}{}", u.name, if u.admin { " (admin)" } else { "" });
        for f in &u.fingerprints {
            println!("  key {f}");
        }
        println!("  quota: {}", quota_text(&u.quota));
    }
    Ok(ExitCode::SUCCESS)
}

fn quota_text(q: &Quota) -> String {
    let f = |v: Option<String>| v.unwrap_or_else(|| "unlimited".into());
    format!(
        "vms {}, cpus {}, memory {}, stored images {}",
        f(q.vms.map(|v| v.to_string())),
        f(q.cpus.map(|v| v.to_string())),
        f(q.memory_mib.map(|v| format!("{v} MiB"))),
        f(q.stored_bytes.map(crate::output::bytes))
    )
}

#[derive(Args, Debug, Clone, Default)]
pub struct QuotaArgs {
    /// At most this many VMs at once (not stopped or failed).
    #[arg(long = "max-vms")]
    pub vms: Option<u32>,
    /// At most this many virtual CPUs over those VMs.
    #[arg(long = "max-cpus")]
    pub cpus: Option<u32>,
    /// At most this much guest memory (MiB) over those VMs.
    #[arg(long = "max-memory")]
    pub memory_mib: Option<u64>,
    /// At most this many bytes of images (K, M, G suffixes) the user owns on each image server.
    #[arg(long = "max-stored", value_parser = crate::output::parse_size)]
    pub stored_bytes: Option<u64>,
}

impl From<QuotaArgs> for Quota {
    fn from(a: QuotaArgs) -> Quota {
        Quota { vms: a.vms, cpus: a.cpus, memory_mib: a.memory_mib, stored_bytes: a.stored_bytes }
    }
}

/// Manage users (admins only, except `show` of yourself).
#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Register a user with their SSH public key(s).
    Add {
        name: String,
        /// OpenSSH public key file (`id_ed25519.pub`; ed25519, ecdsa or rsa). Repeatable.
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        /// May manage hosts, users and public images.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// List users.
    Ls,
    /// Show a user.
    Show { name: String },
    /// Remove a user (their tokens stop working at once).
    Rm { name: String },
    /// Set a user's quotas (an option left out means unlimited).
    Quota {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
}

pub async fn user_cmd(ctx: &Ctx, c: UserCmd) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    let one = |u: &UserInfo| -> anyhow::Result<()> {
        if ctx.json {
            print_json(u)
        } else {
            println!("{}{}: {} key(s) {}; quota: {}", u.name, if u.admin { " (admin)" } else { "" }, u.keys.len(), u.fingerprints.join(", "), quota_text(&u.quota));
            Ok(())
        }
    };
    match c {
        UserCmd::Add { name, key, admin, quota } => {
            let keys = key.iter().map(|k| read_public_key(k)).collect::<anyhow::Result<Vec<_>>>()?;
            let u: UserInfo = api.post("/api/v1/users", &UserCreate { name, keys, admin, quota: quota.into() }).await?;
            one(&u)?;
        }
        UserCmd::Ls => {
            let users: Vec<UserInfo> = api.get("/api/v1/users").await?;
            if ctx.json {
                print_json(&users)?;
            } else {
                let rows = users
                    .iter()
                    .map(|u| vec![u.name.clone(), if u.admin { "yes".into() } else { "".into() }, u.fingerprints.join(" "), quota_text(&u.quota)])
                    .collect();
                println!("{}", table(&["NAME", "ADMIN", "KEYS", "QUOTA"], rows));
            }
        }
        UserCmd::Show { name } => one(&api.get(&format!("/api/v1/users/{name}")).await?)?,
        UserCmd::Rm { name } => {
            let u: UserInfo = api.delete(&format!("/api/v1/users/{name}")).await?;
            if ctx.json {
                print_json(&u)?;
            } else {
                println!("removed user {}", u.name);
            }
        }
        UserCmd::Quota { name, quota } => one(&api.put(&format!("/api/v1/users/{name}/quota"), &Quota::from(quota)).await?)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Only this user's requests (`-`: requests without a valid token). Admins only.
    #[arg(long)]
    pub user: Option<String>,
    /// Only the last DURATION (e.g. 30m, 2h, 1d) or since a Unix time.
    #[arg(long)]
    pub since: Option<String>,
}

fn parse_since(s: &str) -> anyhow::Result<f64> {
    let (num, mul) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1.0),
        Some('m') => (&s[..s.len() - 1], 60.0),
        Some('h') => (&s[..s.len() - 1], 3600.0),
        Some('d') => (&s[..s.len() - 1], 86400.0),
        _ => return s.parse::<f64>().map_err(|_| anyhow!("--since {s:?}: expected a duration like 30m, 2h, 1d or a Unix time")),
    };
    let n: f64 = num.parse().map_err(|_| anyhow!("--since {s:?}: expected a duration like 30m, 2h, 1d or a Unix time"))?;
    Ok(now() as f64 - n * mul)
}

pub async fn audit_cmd(ctx: &Ctx, a: AuditArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    if let Some(u) = &a.user {
        q.push(format!("user={u}"));
    }
    if let Some(s) = &a.since {
        q.push(format!("since={}", parse_since(s)?));
    }
    let path = if q.is_empty() { "/api/v1/audit".to_string() } else { format!("/api/v1/audit?{}", q.join("&")) };
    let entries: Vec<AuditEntry> = ctx.api().get(&path).await?;
    if ctx.json {
        print_json(&entries)?;
    } else {
        let rows = entries
            .iter()
            .map(|e| vec![format!("{:.0}", e.time), e.user.clone(), format!("{} {}", e.method, e.path), e.status.to_string(), e.error.clone().unwrap_or_default()])
            .collect();
        println!("{}", table(&["TIME", "USER", "REQUEST", "STATUS", "ERROR"], rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// For roles: bootstrap the first admin of a coordinator with no users.
pub fn bootstrap(auth: &vgrid_coordinator::auth::Auth, name: Option<String>, key: Option<PathBuf>) -> anyhow::Result<()> {
    if !auth.users().map_err(|e| anyhow!("{e}"))?.is_empty() {
        return Ok(());
    }
    let name = name.unwrap_or_else(local_user);
    let (public, from) = match key {
        Some(p) => (read_public_key(&p)?, p),
        None => local_key_or_create()?,
    };
    if auth.bootstrap_admin(&name, &public).map_err(|e| anyhow!("creating the first admin: {e}"))? {
        eprintln!("vgrid: created the first admin user {name} with the key {}", from.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_durations_and_times() {
        let n = now() as f64;
        assert!((parse_since("2h").unwrap() - (n - 7200.0)).abs() < 5.0);
        assert_eq!(parse_since("1700000000").unwrap(), 1_700_000_000.0);
        assert!(parse_since("soon").is_err());
    }

    #[test]
    fn local_user_is_a_valid_user_name() {
        assert!(vgrid_api::auth::validate_user_name(&local_user()).is_ok(), "{}", local_user());
    }
}
