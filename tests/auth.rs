//! Users, keys and authorization through the real binary: every API call needs a token, a user
//! acts only on their own VMs, admins manage users, quotas name themselves, and the audit log
//! keeps every refused attempt.

mod common;

use common::*;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A user of the test: their own key and their own config directory (tokens).
struct Person {
    name: String,
    key: PathBuf,
    config: PathBuf,
}

impl Person {
    fn new(dir: &Path, name: &str, alg: Algorithm) -> Person {
        let config = dir.join(format!("cfg-{name}"));
        std::fs::create_dir_all(&config).unwrap();
        let k = PrivateKey::random(&mut rand::rngs::OsRng, alg).unwrap();
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, k.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
        std::fs::write(dir.join(format!("{name}.key.pub")), k.public_key().to_openssh().unwrap()).unwrap();
        Person { name: name.into(), key, config }
    }

    fn public(&self) -> String {
        format!("{}.pub", self.key.display())
    }

    fn cli(&self, up: &Up, args: &[&str]) -> Output {
        Command::new(vgrid_bin())
            .args(args)
            .env("VGRID_URL", &up.url)
            .env("VGRID_CONFIG_DIR", &self.config)
            .env("VGRID_KEY", &self.key)
            .env("VGRID_USER", &self.name)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn json(&self, up: &Up, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.cli(up, &a);
        assert!(o.status.success(), "{} vgrid {args:?}: {}", self.name, String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn refused(&self, up: &Up, args: &[&str], status: &str) -> String {
        let o = self.cli(up, args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(status), "{} vgrid {args:?} should be refused with {status}: {err}", self.name);
        err
    }
}

fn curl(up: &Up, method: &str, path: &str, token: Option<&str>) -> u16 {
    let mut c = curl_for(&up.url);
    c.args(["-o", "/dev/null", "-w", "%{http_code}", "-X", method, "-H", "content-type: application/json"]);
    if let Some(t) = token {
        c.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    if method != "GET" && method != "DELETE" {
        c.args(["--data", "{}"]);
    }
    let o = c.arg(format!("{}{path}", up.url)).output().unwrap();
    String::from_utf8_lossy(&o.stdout).parse().unwrap()
}

#[test]
fn every_endpoint_needs_a_valid_token_and_users_act_only_on_their_own_vms() {
    let up = Up::start();
    up.import_sample();
    let dir = tempfile::tempdir().unwrap();
    let alice = Person::new(dir.path(), "alice", Algorithm::Ed25519);
    let bob = Person::new(dir.path(), "bob", Algorithm::Ecdsa { curve: ssh_key::EcdsaCurve::NistP256 });

    // The first admin is this machine's user (made by `vgrid up`); it registers alice and bob.
    assert_eq!(up.json(&["whoami"])["admin"], true);
    up.ok(&["user", "add", "alice", "--key", &alice.public()]);
    up.ok(&["user", "add", "bob", "--key", &bob.public(), "--max-vms", "1", "--max-cpus", "1"]);
    let users = up.json(&["user", "ls"]);
    assert_eq!(users.as_array().unwrap().len(), 3, "{users}");

    // Without a token, with a forged one, and with a revoked one: 401 everywhere but the public routes.
    let admin_token = up.json(&["login"])["token"].as_str().unwrap().to_string();
    let forged = format!("vgt_{}", "ab".repeat(32));
    let protected = [
        ("GET", "/api/v1/vms"),
        ("POST", "/api/v1/vms"),
        ("GET", "/api/v1/vms/x"),
        ("DELETE", "/api/v1/vms/x"),
        ("POST", "/api/v1/vms/x/stop"),
        ("GET", "/api/v1/vms/x/console"),
        ("GET", "/api/v1/vms/x/console/ws"),
        ("GET", "/api/v1/hosts"),
        ("GET", "/api/v1/hosts/x"),
        ("GET", "/api/v1/image-servers"),
        ("POST", "/api/v1/futures"),
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/users"),
        ("GET", "/api/v1/users/alice"),
        ("DELETE", "/api/v1/users/alice"),
        ("PUT", "/api/v1/users/alice/quota"),
        ("GET", "/api/v1/whoami"),
        ("GET", "/api/v1/audit"),
        ("POST", "/api/v1/auth/logout"),
    ];
    for (m, p) in protected {
        assert_eq!(curl(&up, m, p, None), 401, "{m} {p} without a token");
        assert_eq!(curl(&up, m, p, Some(&forged)), 401, "{m} {p} with a forged token");
        assert_eq!(curl(&up, m, p, Some("garbage")), 401, "{m} {p} with a malformed token");
    }
    assert_eq!(curl(&up, "GET", "/api/v1/health", None), 200);
    assert_eq!(curl(&up, "GET", "/api/openapi.json", None), 200);
    assert_eq!(curl(&up, "GET", "/api/v1/vms", Some(&admin_token)), 200);

    // A key that is not alice's cannot log in as alice.
    let o = Command::new(vgrid_bin())
        .args(["login", "--user", "alice", "--key"])
        .arg(&bob.key)
        .env("VGRID_URL", &up.url)
        .env("VGRID_CONFIG_DIR", &bob.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("401") && err.contains("none of the user's keys"), "{err}");

    // alice runs a VM; bob can neither see nor touch it.
    let t = alice.json(&up, &["login"]);
    assert_eq!(t["user"], "alice");
    let _slot = boot_slot().unwrap();
    let v = alice.json(&up, &["vm", "run", "sample", "--name", "alices", "--wait-for", BOOTED_MARKER, "--timeout", "90"]);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["owner"], "alice");
    assert!(bob.json(&up, &["vm", "ls"]).as_array().unwrap().is_empty());
    for args in [
        vec!["vm", "show", id.as_str()],
        vec!["vm", "logs", id.as_str()],
        vec!["vm", "stop", id.as_str()],
        vec!["vm", "rm", "--force", id.as_str()],
        vec!["vm", "show", "alices"],
    ] {
        let err = bob.refused(&up, &args, "403");
        assert!(err.contains("belongs to another user"), "{err}");
    }
    // The console WebSocket too.
    let bob_token = bob.json(&up, &["login"])["token"].as_str().unwrap().to_string();
    assert_eq!(curl(&up, "GET", &format!("/api/v1/vms/{id}/console/ws"), Some(&bob_token)), 403);
    // bob is no admin.
    bob.refused(&up, &["user", "ls"], "403");
    bob.refused(&up, &["user", "add", "eve", "--key", &bob.public()], "403");
    bob.refused(&up, &["user", "quota", "bob", "--max-vms", "100"], "403");
    // The admin sees and may act on every VM.
    assert_eq!(up.json(&["vm", "show", &id])["owner"], "alice");
    assert_eq!(alice.json(&up, &["vm", "ls"]).as_array().unwrap().len(), 1);

    // Quotas name themselves.
    let err = bob.refused(&up, &["vm", "run", "sample", "--cpus", "2", "--no-wait"], "403");
    assert!(err.contains("quota exceeded") && err.contains("bob may have 1 cpus"), "{err}");

    // The audit log has bob's refused attempts, and alice's VM creation.
    let audit = up.json(&["audit", "--user", "bob"]);
    let entries = audit.as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["status"] == 403 && e["method"] == "POST" && e["path"] == format!("/api/v1/vms/{id}/stop")),
        "{audit}"
    );
    assert!(entries.iter().any(|e| e["status"] == 403 && e["path"] == format!("/api/v1/vms/{id}")), "{audit}");
    let alices = up.json(&["audit", "--user", "alice"]);
    assert!(
        alices.as_array().unwrap().iter().any(|e| e["method"] == "POST" && e["path"] == "/api/v1/vms" && e["status"] == 201),
        "{alices}"
    );
    let anon = up.json(&["audit", "--user", "-"]);
    assert!(anon.as_array().unwrap().iter().any(|e| e["status"] == 401), "{anon}");
    // A non-admin sees only their own entries.
    let own = bob.json(&up, &["audit", "--user", "alice"]);
    assert!(own.as_array().unwrap().iter().all(|e| e["user"] == "bob"), "{own}");

    // Removing bob ends his token at once; alice stops her own VM.
    up.ok(&["user", "rm", "bob"]);
    assert_eq!(curl(&up, "GET", "/api/v1/vms", Some(&bob_token)), 401);
    alice.json(&up, &["vm", "stop", &id]);
    // Logging out revokes the token.
    let tok = alice.json(&up, &["login"])["token"].as_str().unwrap().to_string();
    alice.cli(&up, &["logout"]);
    assert_eq!(curl(&up, "GET", "/api/v1/vms", Some(&tok)), 401);
}

/// Images belong to users: others neither see, run, change nor overwrite them; the host and
/// image server APIs answer the coordinator and admins only; a VM saved as an image belongs to
/// the VM's owner.
#[test]
fn images_and_snapshots_belong_to_their_owners() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start();
    up.import_sample();
    let img = dir.path().join("priv.raw");
    std::fs::write(&img, vec![5u8; 1 << 20]).unwrap();
    up.ok(&["image", "import", img.to_str().unwrap(), "--name", "adminonly", "--chunk-size", "64K"]);
    let alice = Person::new(dir.path(), "alice", Algorithm::Ed25519);
    let bob = Person::new(dir.path(), "bob", Algorithm::Ed25519);
    up.ok(&["user", "add", "alice", "--key", &alice.public()]);
    up.ok(&["user", "add", "bob", "--key", &bob.public()]);

    // Alice imports her own image; she sees it and the public sample, not the admin's.
    alice.json(&up, &["image", "import", img.to_str().unwrap(), "--name", "alices", "--chunk-size", "64K"]);
    let names = |p: &Person| -> Vec<String> {
        p.json(&up, &["image", "ls"]).as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_string()).collect()
    };
    let seen = names(&alice);
    assert!(seen.contains(&"alices".into()) && seen.contains(&"sample".into()) && !seen.contains(&"adminonly".into()), "{seen:?}");
    assert!(!names(&bob).contains(&"alices".into()));
    // The grid's list of image servers (what the CLI asks where images are) names only the
    // images the caller may read: alice's shows once advertised, never to bob.
    let bob_token = bob.json(&up, &["login"])["token"].as_str().unwrap().to_string();
    let servers_as = |token: &str| {
        let o =
            curl_for(&up.url).args(["-H", &format!("authorization: Bearer {token}"), &format!("{}/api/v1/image-servers", up.url)]).output();
        String::from_utf8_lossy(&o.unwrap().stdout).into_owned()
    };
    let t0 = std::time::Instant::now();
    while !String::from_utf8_lossy(&api_get(&up.url, "/api/v1/image-servers")).contains("\"alices\"") {
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "alices never advertised");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let seen_by_bob = servers_as(&bob_token);
    assert!(
        seen_by_bob.contains("\"sample\"") && !seen_by_bob.contains("\"alices\"") && !seen_by_bob.contains("adminonly"),
        "{seen_by_bob}"
    );
    let all = up.json(&["image", "ls"]);
    let a = all.as_array().unwrap().iter().find(|i| i["name"] == "alices").unwrap();
    assert_eq!((a["owner"].as_str(), a["public"].as_bool()), (Some("alice"), Some(false)), "{a}");

    // A stored-bytes quota: alice holds 1 MiB; a second 1 MiB image would pass 1.5 MiB.
    up.ok(&["user", "quota", "alice", "--max-stored", "1536K"]);
    let e = alice.refused(&up, &["image", "import", img.to_str().unwrap(), "--name", "alices2", "--chunk-size", "64K"], "quota exceeded");
    assert!(e.contains("user alice may store 1.5 MiB") && e.contains("1.0 MiB stored"), "{e}");
    assert!(!names(&alice).contains(&"alices2".into()));
    assert!(alice.json(&up, &["whoami"])["quota"]["stored_bytes"] == 1536 * 1024);

    // Bob may not read, run, delete, overwrite or publish what is not his.
    assert!(bob.refused(&up, &["image", "show", "alices"], "403").contains("belongs to alice"));
    assert!(bob.refused(&up, &["vm", "run", "alices", "--no-wait"], "403").contains("belongs to alice"));
    bob.refused(&up, &["vm", "run", "adminonly", "--no-wait"], "403");
    bob.refused(&up, &["image", "rm", "alices"], "403");
    bob.refused(&up, &["image", "rm", "sample"], "403");
    bob.refused(&up, &["image", "import", img.to_str().unwrap(), "--name", "alices", "--chunk-size", "64K"], "403");
    bob.refused(&up, &["image", "import", img.to_str().unwrap(), "--name", "bobpub", "--chunk-size", "64K", "--public"], "403");
    bob.refused(&up, &["image", "show", "nonexistent"], "image nonexistent not found");

    // Every host and image server route: 401 without a token and with a forged one.
    for (m, path) in [
        ("GET", "/host/v1/vms"),
        ("POST", "/host/v1/vms"),
        ("GET", "/host/v1/cache/stats"),
        ("POST", "/host/v1/pull/sample"),
        ("POST", "/host/v1/vms/x/stop"),
        ("POST", "/host/v1/vms/x/snapshot"),
        ("POST", "/host/v1/migrate/incoming"),
        ("GET", "/host/v1/vms/x/console"),
        ("GET", "/store/v1/images"),
        ("GET", "/store/v1/images/sample"),
        ("DELETE", "/store/v1/images/sample"),
        ("GET", "/store/v1/chunks/00"),
        ("POST", "/store/v1/uploads"),
        ("POST", "/store/v1/gc"),
        ("PUT", "/store/v1/owners/sample"),
    ] {
        assert_eq!(curl(&up, m, path, None), 401, "{m} {path} without a token");
        assert_eq!(curl(&up, m, path, Some("vg-forged-token")), 401, "{m} {path} with a forged token");
    }

    // The host API: nobody without credentials, no user but admins.
    let bob_token = bob.json(&up, &["login"])["token"].as_str().unwrap().to_string();
    assert_eq!(curl(&up, "GET", "/host/v1/vms", None), 401);
    assert_eq!(curl(&up, "GET", "/host/v1/vms", Some(&bob_token)), 403);
    assert_eq!(curl(&up, "POST", "/host/v1/vms", Some(&bob_token)), 403);
    assert_eq!(curl(&up, "GET", "/store/v1/images", None), 401);
    assert_eq!(curl(&up, "POST", "/store/v1/gc", Some(&bob_token)), 403);
    assert_eq!(curl(&up, "GET", "/host/v1/cache/stats", Some(up.json(&["login"])["token"].as_str().unwrap())), 200);

    // A VM saved as an image belongs to the VM's owner; its name cannot take another's image.
    let v = bob.json(&up, &["vm", "run", "sample", "--wait-for", BOOTED_MARKER, "--timeout", "240"]);
    let id = v["id"].as_str().unwrap();
    assert!(bob.refused(&up, &["image", "snapshot", id, "--name", "alices"], "403").contains("belongs to alice"));
    bob.json(&up, &["image", "snapshot", id, "--name", "bobsnap"]);
    assert!(names(&bob).contains(&"bobsnap".into()));
    assert!(alice.refused(&up, &["vm", "run", "bobsnap", "--no-wait"], "403").contains("belongs to bob"));
    bob.json(&up, &["vm", "stop", id]);
    let audit = up.json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["user"] == "bob" && e["status"] == 403 && e["path"].as_str().unwrap().ends_with("/snapshot")),
        "{audit}"
    );
}

/// A real `ssh-agent` on its own socket, killed on drop.
struct SshAgent {
    child: std::process::Child,
    sock: PathBuf,
}

impl SshAgent {
    fn start(dir: &Path) -> SshAgent {
        let sock = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(sock.exists(), "ssh-agent made no socket");
        SshAgent { child, sock }
    }

    fn add(&self, key: &Path) {
        let o = Command::new("ssh-add").arg(key).env("SSH_AUTH_SOCK", &self.sock).output().unwrap();
        assert!(o.status.success(), "ssh-add {}: {}", key.display(), String::from_utf8_lossy(&o.stderr));
    }

    fn remove_all(&self) {
        let o = Command::new("ssh-add").arg("-D").env("SSH_AUTH_SOCK", &self.sock).output().unwrap();
        assert!(o.status.success(), "ssh-add -D: {}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ssh-keygen -t ALG` without a passphrase: the private key at `path`, the public at `path.pub`.
fn keygen(path: &Path, alg: &str) {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", alg, "-N", "", "-C", &format!("{alg}@test"), "-f"]).arg(path);
    if alg == "rsa" {
        c.args(["-b", "2048"]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&o.stderr));
}

/// The CLI as `user` with `VGRID_KEY=key`, talking to `agent` (or to no agent).
fn cli_as(up: &Up, user: &str, config: &Path, key: &Path, agent: Option<&SshAgent>, args: &[&str]) -> Output {
    let mut c = Command::new(vgrid_bin());
    c.args(args)
        .env("VGRID_URL", &up.url)
        .env("VGRID_CONFIG_DIR", config)
        .env("VGRID_KEY", key)
        .env("VGRID_USER", user)
        .stdin(Stdio::null());
    match agent {
        Some(a) => c.env("SSH_AUTH_SOCK", &a.sock),
        None => c.env_remove("SSH_AUTH_SOCK"),
    };
    c.output().unwrap()
}

#[test]
fn login_signs_through_ssh_agent_with_ed25519_rsa_and_ecdsa_keys() {
    let up = Up::start();
    let dir = tempfile::tempdir().unwrap();
    let agent = SshAgent::start(dir.path());
    for (user, alg) in [("edna", "ed25519"), ("rosa", "rsa"), ("ecco", "ecdsa")] {
        let key = dir.path().join(format!("{user}_key"));
        keygen(&key, alg);
        let public = format!("{}.pub", key.display());
        up.ok(&["user", "add", user, "--key", &public]);
        agent.add(&key);
        // Only the public half stays on disk: the agent signs.
        std::fs::remove_file(&key).unwrap();
        let config = dir.path().join(format!("cfg-{user}"));
        let o = cli_as(&up, user, &config, &key, Some(&agent), &["--json", "login"]);
        assert!(o.status.success(), "{user} ({alg}) login through the agent: {}", String::from_utf8_lossy(&o.stderr));
        let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(t["user"], user);
        let token = t["token"].as_str().unwrap();
        assert_eq!(curl(&up, "GET", "/api/v1/whoami", Some(token)), 200);
        // --agent with the .pub named explicitly, and the token works for the CLI.
        let o = cli_as(&up, user, &config, Path::new("/nonexistent"), Some(&agent), &["--json", "login", "--agent", "--key", &public]);
        assert!(o.status.success(), "{user} login --agent --key {public}: {}", String::from_utf8_lossy(&o.stderr));
        let o = cli_as(&up, user, &config, &key, Some(&agent), &["--json", "whoami"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["name"], user);
        // Without the agent there is nothing to sign with: a clear error.
        let o = cli_as(&up, user, &dir.path().join("cfg-none"), &key, None, &["login"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("only its public half") && err.contains("ssh-agent"), "{err}");
    }
    // An agent that no longer holds the key: the error names the fix.
    agent.remove_all();
    let key = dir.path().join("edna_key");
    let o = cli_as(&up, "edna", &dir.path().join("cfg-x"), &key, Some(&agent), &["login", "--agent"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("does not hold") && err.contains("ssh-add"), "{err}");
}

#[test]
fn expired_tokens_get_401_naming_expiry_and_the_cli_logs_in_again() {
    let up = Up::start_with(&["--token-ttl", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let carol = Person::new(dir.path(), "carol", Algorithm::Ed25519);
    up.ok(&["user", "add", "carol", "--key", &carol.public()]);
    let t = carol.json(&up, &["login"]);
    let old = t["token"].as_str().unwrap().to_string();
    assert_eq!(curl(&up, "GET", "/api/v1/whoami", Some(&old)), 200);
    std::thread::sleep(std::time::Duration::from_secs(3));
    // A raw request with the old token: 401, and the body says why.
    let o = curl_for(&up.url)
        .args(["-w", "\n%{http_code}", "-H", &format!("authorization: Bearer {old}")])
        .arg(format!("{}/api/v1/whoami", up.url))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(body.trim_end().ends_with("401"), "{body}");
    assert!(body.contains("expired"), "the 401 does not name the expiry: {body}");
    // The CLI logs in again by itself, even when it believes its token still valid (the
    // coordinator's clock is what counts): make the saved token look fresh.
    let tokens = carol.config.join("tokens.json");
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&tokens).unwrap()).unwrap();
    let far = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    for (_, v) in saved.as_object_mut().unwrap() {
        assert_eq!(v["token"], old.as_str());
        v["expires"] = far.into();
    }
    std::fs::write(&tokens, serde_json::to_vec(&saved).unwrap()).unwrap();
    let me = carol.json(&up, &["whoami"]);
    assert_eq!(me["name"], "carol");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&tokens).unwrap()).unwrap();
    let new = saved.as_object().unwrap().values().next().unwrap()["token"].as_str().unwrap().to_string();
    assert_ne!(new, old, "the CLI kept the expired token");
    // The audit log has the refused request with the expired token and the new login.
    let audit = up.json(&["audit"]);
    let entries = audit.as_array().unwrap();
    assert!(entries.iter().any(|e| e["status"] == 401 && e["error"].as_str().is_some_and(|m| m.contains("expired"))), "{audit}");
}

/// Reads one RFB (VNC) session up to a full framebuffer update from `addr`: the version, security
/// None, ClientInit (shared), ServerInit, one non-incremental FramebufferUpdateRequest. Returns
/// the framebuffer's size and how many of its bytes are non-zero.
fn rfb_frame(addr: &str) -> (u16, u16, usize) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut version = [0u8; 12];
    s.read_exact(&mut version).unwrap();
    assert_eq!(&version, b"RFB 003.008\n", "{}", String::from_utf8_lossy(&version));
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut n = [0u8; 1];
    s.read_exact(&mut n).unwrap();
    let mut types = vec![0u8; n[0] as usize];
    s.read_exact(&mut types).unwrap();
    assert!(types.contains(&1), "security type None not offered: {types:?}");
    s.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    s.read_exact(&mut result).unwrap();
    assert_eq!(u32::from_be_bytes(result), 0, "security handshake failed");
    s.write_all(&[1]).unwrap(); // ClientInit: shared
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    let (w, h, bpp) = (u16::from_be_bytes([init[0], init[1]]), u16::from_be_bytes([init[2], init[3]]), init[4] as usize);
    let mut name = vec![0u8; u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize];
    s.read_exact(&mut name).unwrap();
    assert!(w > 0 && h > 0 && bpp % 8 == 0, "ServerInit {w}x{h} at {bpp} bpp");
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0, "expected a FramebufferUpdate, got message type {}", head[0]);
    let mut nonzero = 0;
    for _ in 0..u16::from_be_bytes([head[2], head[3]]) {
        let mut r = [0u8; 12];
        s.read_exact(&mut r).unwrap();
        let (rw, rh) = (u16::from_be_bytes([r[4], r[5]]) as usize, u16::from_be_bytes([r[6], r[7]]) as usize);
        assert_eq!(i32::from_be_bytes([r[8], r[9], r[10], r[11]]), 0, "raw encoding expected (none other was asked for)");
        let mut pixels = vec![0u8; rw * rh * bpp / 8];
        s.read_exact(&mut pixels).unwrap();
        nonzero += pixels.iter().filter(|&&b| b != 0).count();
    }
    (w, h, nonzero)
}

/// Issue 17, item 2: a guest's VNC display (a unix socket in its runtime directory, no TCP port
/// on the host) reaches its owner's viewer through `vgrid vm vnc` and the coordinator; another
/// user is refused with 403.
#[test]
fn vm_vnc_forwards_the_graphical_console_to_its_owner_only() {
    let up = Up::start();
    up.import_sample();
    let dir = tempfile::tempdir().unwrap();
    let alice = Person::new(dir.path(), "alice", Algorithm::Ed25519);
    let bob = Person::new(dir.path(), "bob", Algorithm::Ed25519);
    up.ok(&["user", "add", "alice", "--key", &alice.public()]);
    up.ok(&["user", "add", "bob", "--key", &bob.public()]);
    let v = {
        let _slot = boot_slot().unwrap();
        alice.json(&up, &["vm", "run", "sample", "--name", "shown", "--wait-for", PROMPT, "--timeout", "120"])
    };
    let id = v["id"].as_str().unwrap().to_string();
    assert!(up.runtime_dir(&id).join("vnc.sock").exists(), "no VNC socket in the runtime directory");
    // Text on the VGA console, so the frame is not blank whatever the guest showed before.
    console_exec(&up, &id, "echo on-the-screen-$((6*7)) > /dev/tty1; echo tty-$((1+1))", "tty-2");

    let mut vnc = Command::new(vgrid_bin())
        .args(["vm", "vnc", &id, "--listen", "127.0.0.1:0"])
        .env("VGRID_URL", &up.url)
        .env("VGRID_CONFIG_DIR", &alice.config)
        .env("VGRID_KEY", &alice.key)
        .env("VGRID_USER", &alice.name)
        .env_remove("SSH_AUTH_SOCK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(vnc.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.split(" at ").nth(1).and_then(|r| r.split(": ").next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
    let (w, h, nonzero) = rfb_frame(&addr);
    // A second viewer gets its own session.
    let (w2, h2, _) = rfb_frame(&addr);
    let _ = vnc.kill();
    let _ = vnc.wait();
    eprintln!("VNC frame {w}x{h}, {nonzero} non-zero bytes");
    assert!(nonzero > 0, "the frame is blank");
    assert_eq!((w2, h2), (w, h));

    let err = bob.refused(&up, &["vm", "vnc", &id, "--listen", "127.0.0.1:0"], "403");
    assert!(err.contains("belongs to another user"), "{err}");
    let bob_token = bob.json(&up, &["login"])["token"].as_str().unwrap().to_string();
    assert_eq!(curl(&up, "GET", &format!("/api/v1/vms/{id}/vnc/ws"), Some(&bob_token)), 403);
    assert_eq!(curl(&up, "GET", &format!("/api/v1/vms/{id}/vnc/ws"), None), 401);
    // The ssh port (`vgrid vm ssh`) on the same terms.
    assert_eq!(curl(&up, "GET", &format!("/api/v1/vms/{id}/ssh/ws"), Some(&bob_token)), 403);
    assert_eq!(curl(&up, "GET", &format!("/api/v1/vms/{id}/ssh/ws"), None), 401);
    let err = bob.refused(&up, &["vm", "ssh", &id], "403");
    assert!(err.contains("belongs to another user"), "{err}");
}

/// Volumes belong to users like images: the quota counts them (the refusal names it), others
/// neither see, attach, commit nor remove them, and no user moves a volume's fencing epoch.
#[test]
fn volumes_belong_to_their_owners_and_count_in_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start();
    up.import_sample();
    let data = dir.path().join("data.raw");
    std::fs::write(&data, vec![7u8; 1 << 20]).unwrap();
    let alice = Person::new(dir.path(), "alice", Algorithm::Ed25519);
    let bob = Person::new(dir.path(), "bob", Algorithm::Ed25519);
    up.ok(&["user", "add", "alice", "--key", &alice.public()]);
    up.ok(&["user", "add", "bob", "--key", &bob.public()]);

    alice.json(&up, &["volume", "create", "scratch", "--size", "8M"]);
    alice.json(&up, &["volume", "import", "data", data.to_str().unwrap()]);
    let ls = alice.json(&up, &["volume", "ls"]);
    let names: Vec<&str> = ls.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["data", "scratch"], "{ls}");
    assert_eq!(ls[0]["owner"], "alice", "{ls}");
    assert_eq!(ls[0]["stored_bytes"], 1 << 20, "{ls}");
    // Volumes are not images: `image ls` keeps listing them (kind shown in JSON), and an image
    // import over a volume's name is refused.
    alice.refused(&up, &["image", "import", data.to_str().unwrap(), "--name", "data"], "data is a volume, not an image");

    // The stored-bytes quota counts volumes: 1 MiB held, another 1 MiB would pass 1.5 MiB.
    up.ok(&["user", "quota", "alice", "--max-stored", "1536K"]);
    let e = alice.refused(&up, &["volume", "import", "data2", data.to_str().unwrap()], "quota exceeded");
    assert!(e.contains("user alice may store 1.5 MiB") && e.contains("1.0 MiB stored"), "{e}");

    // Bob neither sees nor uses alice's volumes.
    assert!(bob.json(&up, &["volume", "ls"]).as_array().unwrap().is_empty());
    assert!(bob.refused(&up, &["volume", "show", "data"], "403").contains("belongs to alice"));
    assert!(bob.refused(&up, &["vm", "run", "sample", "--volume", "data:ro", "--no-wait"], "403").contains("belongs to alice"));
    bob.refused(&up, &["vm", "run", "sample", "--volume", "data", "--no-wait"], "403");
    bob.refused(&up, &["volume", "commit", "data"], "403");
    bob.refused(&up, &["volume", "snapshot", "data", "mine"], "403");
    bob.refused(&up, &["volume", "rm", "data"], "403");
    bob.refused(&up, &["volume", "show", "nosuch"], "nosuch");
    // Only grid nodes move an epoch (the coordinator, at a read-write attach).
    let token = alice.json(&up, &["login"])["token"].as_str().unwrap().to_string();
    let mut c = curl_for(&up.url);
    c.args(["-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-H", "content-type: application/json"]);
    c.args(["-H", &format!("authorization: Bearer {token}"), "--data", r#"{"epoch": 99999999999999}"#]);
    let o = c.arg(format!("{}/store/v1/volumes/data/epoch", up.url)).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "403");

    // Alice removes hers.
    alice.json(&up, &["volume", "rm", "scratch"]);
    let ls = alice.json(&up, &["volume", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
}
