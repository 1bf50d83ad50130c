//! Which CA the CLI trusts for each coordinator: pinned at first contact, like ssh's
//! known_hosts. The CA of `https://HOST:PORT` is kept in
//! `CONFIG/known_coordinators/HOST_PORT.pem`; later connections accept only certificates that
//! CA signed, so a server with another CA at that address is refused with an explanation.
//! `vgrid up` and `vgrid coordinator` pin their own CA for their URL when they start, and
//! `$VGRID_CA_FINGERPRINT` (`sha256:<hex>`, from `vgrid ca`) makes the first contact check it.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context};
use vgrid_trust::tls::ProcessTls;

use crate::auth::config_dir;

fn pin_path(url: &str) -> anyhow::Result<PathBuf> {
    let (host, port) = vgrid_trust::tls::host_port(url).map_err(|e| anyhow!("{e}"))?;
    let safe: String = host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    Ok(config_dir().join("known_coordinators").join(format!("{safe}_{port}.pem")))
}

/// Records `ca_pem` as the CA of `url` (replacing a previous one): used by the roles that made
/// that CA themselves.
pub fn pin(url: &str, ca_pem: &str) -> anyhow::Result<()> {
    let p = pin_path(url)?;
    if std::fs::read_to_string(&p).is_ok_and(|old| old != ca_pem) {
        // Another grid now answers at this address: tokens from the old one mean nothing here.
        crate::auth::forget_tokens_at(url);
    }
    std::fs::create_dir_all(p.parent().unwrap_or(&p)).with_context(|| format!("creating {}", p.display()))?;
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, ca_pem).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

fn pinned(url: &str) -> Option<(PathBuf, String)> {
    let p = pin_path(url).ok()?;
    std::fs::read_to_string(&p).ok().map(|s| (p, s))
}

fn fp_of_pem(pem: &str) -> String {
    vgrid_trust::pem_to_der(pem).map(|d| vgrid_trust::fingerprint(&d)).unwrap_or_else(|e| format!("(unreadable: {e})"))
}

/// The CA of `url`: the pinned one, or, at first contact, the one its server presents (checked
/// against `$VGRID_CA_FINGERPRINT` when set), then pinned.
fn ca_for(url: &str) -> anyhow::Result<String> {
    if let Some((_, pem)) = pinned(url) {
        return Ok(pem);
    }
    let chain =
        vgrid_trust::tls::fetch_chain(url).map_err(|e| anyhow!("{e}. Is `vgrid up` running? Set VGRID_URL or --url to its address."))?;
    let ca = vgrid_trust::tls::ca_of_chain(&chain).ok_or_else(|| anyhow!("{url} presented no certificate"))?;
    let fp = vgrid_trust::fingerprint(ca);
    if let Ok(want) = std::env::var("VGRID_CA_FINGERPRINT") {
        if !want.trim().eq_ignore_ascii_case(&fp) {
            bail!("the server at {url} presents CA {fp}, not {} ($VGRID_CA_FINGERPRINT): refusing to trust it", want.trim());
        }
    }
    let pem = vgrid_trust::der_to_pem(ca);
    pin(url, &pem)?;
    eprintln!("vgrid: first contact with {url}: trusting its CA {fp} from now on (pinned in {})", pin_path(url)?.display());
    Ok(pem)
}

fn trusted() -> &'static Mutex<Vec<(String, String)>> {
    static T: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    &T
}

/// Makes every client of this process trust the CA of `url` (besides those trusted already).
/// Plain `http://` URLs need nothing.
pub fn trust(url: &str) -> anyhow::Result<()> {
    if !url.starts_with("https://") {
        return Ok(());
    }
    let mut t = trusted().lock().unwrap_or_else(|e| e.into_inner());
    if t.iter().any(|(u, _)| u == url) {
        return Ok(());
    }
    let pem = ca_for(url)?;
    t.push((url.to_string(), pem));
    let mut all: Vec<&str> = t.iter().map(|(_, p)| p.as_str()).collect();
    all.dedup();
    vgrid_trust::tls::install(ProcessTls { ca_pem: all.concat(), identity: None });
    Ok(())
}

/// Why a connection to `url` failed, when the cause is that it no longer shows the pinned CA.
pub fn explain_failure(url: &str) -> Option<String> {
    let (path, pem) = pinned(url)?;
    let chain = vgrid_trust::tls::fetch_chain(url).ok()?;
    let now = vgrid_trust::fingerprint(vgrid_trust::tls::ca_of_chain(&chain)?);
    let was = fp_of_pem(&pem);
    (now != was).then(|| {
        format!(
            "the server at {url} presents CA {now}, but {was} was pinned for it (in {}). Someone may be impersonating it; if it was re-installed, remove that file to trust the new CA",
            path.display()
        )
    })
}

/// `vgrid ca`: the CA pinned for the coordinator.
pub async fn ca_cmd(ctx: &crate::Ctx) -> anyhow::Result<std::process::ExitCode> {
    trust(&ctx.url)?;
    let (path, pem) = pinned(&ctx.url).ok_or_else(|| anyhow!("{} is not an https:// coordinator; it has no CA", ctx.url))?;
    let fp = fp_of_pem(&pem);
    if ctx.json {
        crate::output::print_json(&serde_json::json!({"url": ctx.url, "fingerprint": fp, "pinned_in": path, "pem": pem}))?;
    } else {
        println!("{fp}  {}  (pinned in {})", ctx.url, path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(clap::Subcommand, Debug)]
pub enum JoinTokenCmd {
    /// Make a one-time token; give it to the new node as `--join-token` (or $VGRID_JOIN_TOKEN).
    /// It carries the CA's fingerprint, so the node can check it reached this coordinator.
    Create {
        /// `host` or `image-server`.
        #[arg(long, default_value = "host")]
        role: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Tokens made, with their expiry and the node that used each (no secrets).
    Ls,
}

pub async fn join_token_cmd(ctx: &crate::Ctx, c: JoinTokenCmd) -> anyhow::Result<std::process::ExitCode> {
    use vgrid_api::auth::{JoinTokenCreate, JoinTokenInfo};
    let api = ctx.api();
    match c {
        JoinTokenCmd::Create { role, ttl } => {
            let t: JoinTokenInfo = api.post("/api/v1/join-tokens", &JoinTokenCreate { role, ttl_seconds: Some(ttl) }).await?;
            if ctx.json {
                crate::output::print_json(&t)?;
            } else {
                println!("{}", t.token.clone().unwrap_or_default());
                eprintln!(
                    "one-time token for a {} (id {}), valid {ttl} s: vgrid {} --coordinator {} --join-token TOKEN ...",
                    t.role, t.id, t.role, ctx.url
                );
            }
        }
        JoinTokenCmd::Ls => {
            let v: Vec<JoinTokenInfo> = api.get("/api/v1/join-tokens").await?;
            if ctx.json {
                crate::output::print_json(&v)?;
            } else {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let rows = v
                    .iter()
                    .map(|t| {
                        let state = match &t.used_by {
                            Some(n) => format!("used by {n}"),
                            None if t.expires <= now => "expired".into(),
                            None => format!("valid {} s more", t.expires - now),
                        };
                        vec![t.id.clone(), t.role.clone(), t.created_by.clone(), state]
                    })
                    .collect();
                println!("{}", crate::output::table(&["ID", "ROLE", "MADE BY", "STATE"], rows));
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
