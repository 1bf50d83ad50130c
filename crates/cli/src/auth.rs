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
    // A key whose private half only the ssh-agent holds: its `.pub` registers it.
    if let Some(found) = agent_held_pub() {
        return Ok(found);
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

/// The first of the usual keys present only as `PATH.pub` whose key the ssh-agent holds: its
/// public line and the `.pub` path.
fn agent_held_pub() -> Option<(String, PathBuf)> {
    let mut agent = crate::sshagent::SshAgent::from_env().ok().flatten()?;
    let held = agent.identities().ok()?;
    key_candidates().into_iter().find_map(|p| {
        let mut pubp = p.into_os_string();
        pubp.push(".pub");
        let pubp = PathBuf::from(pubp);
        let line = read_public_key(&pubp).ok()?;
        let k = ssh_key::PublicKey::from_openssh(&line).ok()?;
        held.iter().any(|i| i.public_key().is_some_and(|h| h.key_data() == k.key_data())).then_some((line, pubp))
    })
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

/// Forgets the tokens saved for coordinators at the address (host and port) of `url`.
pub fn forget_tokens_at(url: &str) {
    let Ok(addr) = vgrid_trust::tls::host_port(url) else { return };
    let mut t = load_tokens();
    let before = t.len();
    t.retain(|u, _| vgrid_trust::tls::host_port(u).ok().as_ref() != Some(&addr));
    if t.len() != before {
        let _ = save_tokens(&t);
    }
}

/// The saved, unexpired token for a coordinator URL.
pub fn saved_token(base: &str) -> Option<String> {
    load_tokens().get(base).filter(|t| t.expires > now() + 5).map(|t| t.token.clone())
}

/// What signs the login challenge: a private key file, or a key held by the ssh-agent.
enum Signer {
    /// Boxed: a private key is large, and the enum is moved around.
    File(PathBuf, Box<PrivateKey>),
    Agent(crate::sshagent::Identity, String),
}

impl Signer {
    fn describe(&self) -> String {
        match self {
            Signer::File(p, _) => p.display().to_string(),
            Signer::Agent(_, what) => what.clone(),
        }
    }
}

/// The public half of the key at `path`: from the file itself (private or `.pub`), else from
/// `PATH.pub`. With the private key when `path` holds one.
fn key_at(path: &Path) -> anyhow::Result<Option<(ssh_key::PublicKey, Option<PrivateKey>)>> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if text.contains("PRIVATE KEY") {
            let k = PrivateKey::from_openssh(&text).map_err(|e| anyhow!("{} is not an OpenSSH private key: {e}", path.display()))?;
            return Ok(Some((k.public_key().clone(), Some(k))));
        }
        let line = text.lines().find(|l| !l.trim().is_empty() && !l.starts_with('#')).unwrap_or("").trim();
        let k = ssh_key::PublicKey::from_openssh(line)
            .map_err(|e| anyhow!("{} is neither an OpenSSH private nor public key: {e}", path.display()))?;
        return Ok(Some((k, None)));
    }
    let mut pubp = path.as_os_str().to_owned();
    pubp.push(".pub");
    match std::fs::read_to_string(&pubp) {
        Ok(text) => {
            let line = text.lines().find(|l| !l.trim().is_empty() && !l.starts_with('#')).unwrap_or("").trim();
            let k = ssh_key::PublicKey::from_openssh(line)
                .map_err(|e| anyhow!("{} is not an OpenSSH public key: {e}", Path::new(&pubp).display()))?;
            Ok(Some((k, None)))
        }
        Err(_) => Ok(None),
    }
}

/// Chooses what signs: for the key given (else the first of the usual keys that exists as a
/// private or `.pub` file), the ssh-agent when it holds that key, else the private key file.
/// With no key file at all, every key of the agent is a candidate, in the agent's order.
/// `force_agent`: only the agent may sign.
fn signers(key: Option<&Path>, force_agent: bool) -> anyhow::Result<(Vec<Signer>, Option<crate::sshagent::SshAgent>)> {
    let mut agent = match crate::sshagent::SshAgent::from_env() {
        Ok(a) => a,
        Err(e) if force_agent => return Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "ignoring the ssh-agent");
            None
        }
    };
    if force_agent && agent.is_none() {
        return Err(anyhow!("--agent: no ssh-agent ($SSH_AUTH_SOCK is not set); start one (eval $(ssh-agent)) and ssh-add your key"));
    }
    let held = match agent.as_mut() {
        Some(a) => a.identities()?,
        None => Vec::new(),
    };
    let in_agent =
        |public: &ssh_key::PublicKey| held.iter().find(|i| i.public_key().is_some_and(|k| k.key_data() == public.key_data())).cloned();
    let explicit = key.is_some();
    let candidates = match key {
        Some(p) => vec![p.to_path_buf()],
        None => key_candidates(),
    };
    let mut problems = Vec::new();
    for path in candidates {
        let found = match key_at(&path) {
            Ok(f) => f,
            Err(e) if explicit => return Err(e),
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let Some((public, private)) = found else {
            if explicit {
                return Err(anyhow!("no key at {} (nor {}.pub)", path.display(), path.display()));
            }
            continue;
        };
        if let Some(id) = in_agent(&public) {
            let what = format!("{} through the ssh-agent", path.display());
            return Ok((vec![Signer::Agent(id, what)], agent));
        }
        let problem = match (&private, force_agent) {
            (_, true) => format!("the ssh-agent does not hold the key {} (ssh-add it)", path.display()),
            (Some(k), false) if k.is_encrypted() => {
                format!("{} is encrypted with a passphrase and the ssh-agent does not hold it: ssh-add it", path.display())
            }
            (Some(k), false) => return Ok((vec![Signer::File(path.clone(), Box::new(k.clone()))], agent)),
            (None, false) if agent.is_some() => {
                format!("{} has only its public half here and the ssh-agent does not hold it: ssh-add its private key", path.display())
            }
            (None, false) => {
                format!("{} has only its public half here and there is no ssh-agent ($SSH_AUTH_SOCK) to sign with it", path.display())
            }
        };
        if explicit {
            return Err(anyhow!(problem));
        }
        problems.push(problem);
    }
    // No usable key file: any key the agent holds.
    let all: Vec<Signer> = held
        .into_iter()
        .filter(|i| i.public_key().is_some())
        .map(|i| {
            let what = format!("the ssh-agent's key {}", if i.comment.is_empty() { "(no comment)".to_string() } else { i.comment.clone() });
            Signer::Agent(i, what)
        })
        .collect();
    if !all.is_empty() {
        return Ok((all, agent));
    }
    let mut msg = format!(
        "no SSH key to log in with (tried $VGRID_KEY, {}, ~/.ssh/id_ed25519, id_ecdsa, id_rsa{}); give one with --key",
        config_dir().join("id_ed25519").display(),
        if agent.is_some() { ", and the ssh-agent holds none" } else { "" }
    );
    for p in problems {
        msg.push_str(&format!("\n  {p}"));
    }
    Err(anyhow!(msg))
}

/// Logs in to `api` as `user` (default: the saved user for this URL, else the local user) with
/// the key `key` (default: the first key found; signed by the ssh-agent when it holds the key),
/// keeps the token and returns it.
pub async fn login(api: &Api, user: Option<&str>, key: Option<&Path>) -> anyhow::Result<LoginToken> {
    login_with(api, user, key, false).await
}

/// [`login`]; `force_agent`: sign only through the ssh-agent.
pub async fn login_with(api: &Api, user: Option<&str>, key: Option<&Path>, force_agent: bool) -> anyhow::Result<LoginToken> {
    let t = sign_in(api, user, key, force_agent).await?;
    let mut all = load_tokens();
    all.retain(|_, v| v.expires > now());
    all.insert(api.base(), t.clone());
    save_tokens(&all)?;
    api.set_token(Some(t.token.clone()));
    Ok(t)
}

/// A new token from a signed challenge, neither kept nor used here.
async fn sign_in(api: &Api, user: Option<&str>, key: Option<&Path>, force_agent: bool) -> anyhow::Result<LoginToken> {
    let (signers, mut agent) = signers(key, force_agent)?;
    let user = match user {
        Some(u) => u.to_string(),
        None => load_tokens().get(&api.base()).map(|t| t.user.clone()).unwrap_or_else(local_user),
    };
    let mut result = Err(anyhow!("no key to log in with"));
    for signer in &signers {
        let c: Challenge = api.post_retryable("/api/v1/auth/challenge", &ChallengeRequest { user: user.clone() }).await?;
        let signature = match signer {
            Signer::File(path, key) => {
                vgrid_coordinator::auth::sign_challenge(key, &c.message).map_err(|e| anyhow!("signing with {}: {e}", path.display()))?
            }
            Signer::Agent(id, _) => {
                let a = agent.as_mut().ok_or_else(|| anyhow!("the ssh-agent went away"))?;
                crate::sshagent::sign_challenge(a, id, &c.message)?
            }
        };
        result = api
            .post::<_, LoginToken>("/api/v1/auth/login", &LoginRequest { user: user.clone(), nonce: c.nonce, signature })
            .await
            .with_context(|| format!("logging in to {} as {user} with {}", api.base(), signer.describe()));
        if result.is_ok() {
            break;
        }
    }
    result
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The vgrid user (default: the one of the last login here, else $VGRID_USER or your login name).
    #[arg(long)]
    pub user: Option<String>,
    /// The key whose public half is registered for the user: a private key file (OpenSSH
    /// format), or its `.pub` when the private key is in the ssh-agent (default: $VGRID_KEY,
    /// ~/.config/vgrid/id_ed25519, ~/.ssh/id_ed25519, id_ecdsa, id_rsa). A key the ssh-agent
    /// ($SSH_AUTH_SOCK) holds is signed by the agent; with no key file at all, the agent's keys
    /// are tried in turn.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Sign only through the ssh-agent ($SSH_AUTH_SOCK), never with a key file.
    #[arg(long)]
    pub agent: bool,
    /// Print a new token alone on stdout, for the web dashboard's login page
    /// (`https://COORDINATOR/ui/`), and keep it nowhere: the CLI's own login is unchanged, and
    /// logging out of the dashboard ends only this token.
    #[arg(long)]
    pub print_token: bool,
}

pub async fn login_cmd(ctx: &Ctx, a: LoginArgs) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    if a.print_token {
        let t = sign_in(&api, a.user.as_deref(), a.key.as_deref(), a.agent).await?;
        println!("{}", t.token);
        return Ok(ExitCode::SUCCESS);
    }
    let t = login_with(&api, a.user.as_deref(), a.key.as_deref(), a.agent).await?;
    if ctx.json {
        print_json(&t)?;
    } else {
        let left = t.expires.saturating_sub(now());
        println!(
            "logged in to {} as {}{} (token valid for {}h{:02}m)",
            api.base(),
            t.user,
            if t.admin { " (admin)" } else { "" },
            left / 3600,
            left % 3600 / 60
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logout_cmd(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    if api.token().is_some() {
        let _: serde_json::Value = api.post("/api/v1/auth/logout", &serde_json::json!({})).await.unwrap_or_default();
    }
    let mut all = load_tokens();
    all.remove(&api.base());
    save_tokens(&all)?;
    if !ctx.json {
        println!("logged out of {}", api.base());
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
            println!(
                "{}{}: {} key(s) {}; quota: {}",
                u.name,
                if u.admin { " (admin)" } else { "" },
                u.keys.len(),
                u.fingerprints.join(", "),
                quota_text(&u.quota)
            );
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
                    .map(|u| {
                        vec![u.name.clone(), if u.admin { "yes".into() } else { "".into() }, u.fingerprints.join(" "), quota_text(&u.quota)]
                    })
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
            .map(|e| {
                vec![
                    format!("{:.0}", e.time),
                    e.user.clone(),
                    format!("{} {}", e.method, e.path),
                    e.status.to_string(),
                    e.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        println!("{}", table(&["TIME", "USER", "REQUEST", "STATUS", "ERROR"], rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// For roles: bootstrap the first admin of a coordinator with no users.
pub async fn bootstrap(auth: &vgrid_coordinator::auth::Auth, name: Option<String>, key: Option<PathBuf>) -> anyhow::Result<()> {
    if !auth.users().await.map_err(|e| anyhow!("{e}"))?.is_empty() {
        return Ok(());
    }
    let name = name.unwrap_or_else(local_user);
    let (public, from) = match key {
        Some(p) => (read_public_key(&p)?, p),
        None => local_key_or_create()?,
    };
    if auth.bootstrap_admin(&name, &public).await.map_err(|e| anyhow!("creating the first admin: {e}"))? {
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
