//! The web dashboard (issue 17, items 1 and 5) in a real browser: headless Chromium driven by
//! Selenium (both installed by scripts/install-deps.sh) runs tests/ui/dashboard.py against a
//! `vgrid up` where alice runs the sample guest: she logs in with a token from `vgrid login
//! --print-token`, sees her VM running, sees a refusal worded by the API, answers the guest's
//! serial console, sees its graphical console draw, stops it from the page and logs out; bob
//! neither sees it nor opens its streams. Screenshots go to target/tmp/ui-screenshots.

mod common;

use common::*;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The Python with Selenium (scripts/install-deps.sh puts it there).
fn selenium_python() -> PathBuf {
    let py = tool_python("selenium-4.50.0");
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(bin).exists(), "{bin} is missing: run scripts/install-deps.sh");
    }
    py
}

/// A user of the test with their own key and CLI configuration.
struct Person {
    name: &'static str,
    key: PathBuf,
    config: PathBuf,
}

impl Person {
    fn new(up: &Up, dir: &Path, name: &'static str) -> Person {
        let config = dir.join(format!("cfg-{name}"));
        std::fs::create_dir_all(&config).unwrap();
        let k = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&key, k.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let public = dir.join(format!("{name}.key.pub"));
        std::fs::write(&public, k.public_key().to_openssh().unwrap()).unwrap();
        up.ok(&["user", "add", name, "--key", public.to_str().unwrap()]);
        Person { name, key, config }
    }

    fn cli(&self, up: &Up, args: &[&str]) -> Output {
        Command::new(vgrid_bin())
            .args(args)
            .env("VGRID_URL", &up.url)
            .env("VGRID_CONFIG_DIR", &self.config)
            .env("VGRID_KEY", &self.key)
            .env("VGRID_USER", self.name)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A token for the browser (`vgrid login --print-token`): alone on stdout.
    fn browser_token(&self, up: &Up) -> String {
        let o = self.cli(up, &["login", "--print-token"]);
        assert!(o.status.success(), "{}: {}", self.name, String::from_utf8_lossy(&o.stderr));
        let t = String::from_utf8(o.stdout).unwrap().trim().to_string();
        assert!(t.starts_with("vgt_") && !t.contains(char::is_whitespace), "{t:?}");
        t
    }

    /// Boots the sample guest (a boot slot, a timeout, one retry); returns its id.
    fn run_sample(&self, up: &Up, name: &str) -> String {
        let _slot = boot_slot().expect("boot slot");
        let mut last = String::new();
        for attempt in 1..=2 {
            let vm = if attempt == 1 { name.to_string() } else { format!("{name}-retry") };
            let o = self.cli(up, &["--json", "vm", "run", "sample", "--name", &vm, "--wait-for", PROMPT, "--timeout", "90"]);
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                return v["id"].as_str().unwrap().to_string();
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            eprintln!("boot attempt {attempt} failed: {last}");
            let _ = self.cli(up, &["vm", "rm", "--force", &vm]);
        }
        panic!("the sample VM did not boot twice: {last}\n{}", up.log_tail());
    }
}

/// The HTTP status of a request with the session cookie (and an `Origin`, if given).
fn with_cookie(up: &Up, method: &str, path: &str, token: &str, origin: Option<&str>) -> u16 {
    let mut c = curl_for(&up.url);
    c.args(["-o", "/dev/null", "-w", "%{http_code}", "-X", method, "-H", &format!("cookie: vgrid_session={token}")]);
    if let Some(o) = origin {
        c.args(["-H", &format!("origin: {o}")]);
    }
    let o = c.arg(format!("{}{path}", up.url)).output().unwrap();
    String::from_utf8_lossy(&o.stdout).parse().unwrap()
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let python = selenium_python();
    let up = Up::start();
    up.import_sample();
    let dir = tempfile::tempdir().unwrap();
    let alice = Person::new(&up, dir.path(), "alice");
    let bob = Person::new(&up, dir.path(), "bob");
    let id = alice.run_sample(&up, "alices");
    let vm = alice.cli(&up, &["--json", "vm", "show", &id]);
    let name = serde_json::from_slice::<serde_json::Value>(&vm.stdout).unwrap()["name"].as_str().unwrap().to_string();
    let (alice_token, bob_token) = (alice.browser_token(&up), bob.browser_token(&up));

    // The cookie is a credential only from the dashboard's own origin when it may change something.
    let own = up.url.trim_end_matches('/');
    assert_eq!(with_cookie(&up, "GET", "/api/v1/vms", &alice_token, None), 200);
    assert_eq!(with_cookie(&up, "POST", &format!("/api/v1/vms/{id}/stop"), &alice_token, Some("https://evil.example")), 403);
    assert_eq!(with_cookie(&up, "POST", &format!("/api/v1/vms/{id}/stop"), &alice_token, None), 403);
    assert_eq!(with_cookie(&up, "GET", "/api/v1/whoami", &alice_token, Some(own)), 200);

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/dashboard.py");
    let o = Command::new(&python)
        .arg(&script)
        .env("VGRID_URL", &up.url)
        .env("VM_NAME", &name)
        .env("VM_ID", &id)
        .env("ALICE_TOKEN", &alice_token)
        .env("BOB_TOKEN", &bob_token)
        .env("SHOTS", &shots)
        // Selenium Manager is never asked for anything (the driver's path is given); no statistics either.
        .env("SE_AVOID_STATS", "true")
        .env("SE_OFFLINE", "true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("{out}{err}");
    assert!(o.status.success(), "the browser test failed ({}):\n{out}\n{err}\n{}", o.status, up.log_tail());
    for expected in [
        "ok: logged in as alice",
        &format!("ok: vm {name} listed as running"),
        "ok: refusal shown: ",
        "ok: serial console answered: vgrid-ui-42",
        "ok: graphical console: canvas",
        "ok: stopped from the page",
        "ok: logged out: cookie cleared, whoami 401",
        "ok: logged in as bob",
        &format!("ok: bob's list does not show {name}"),
        "ok: bob's page of alice's VM: ",
        "ok: bob's console WebSocket to alice's VM refused",
        "ok: bob's vnc WebSocket to alice's VM refused",
        "dashboard: all checks passed",
    ] {
        assert!(out.lines().any(|l| l.starts_with(expected)), "no line {expected:?} in:\n{out}");
    }
    // The graphical console drew something.
    let frame = out.lines().find(|l| l.starts_with("ok: graphical console")).unwrap();
    assert!(!frame.contains(" 0 non-blank"), "{frame}");
    // What the page did, the API did: the VM is stopped, alice's browser token is revoked.
    let v: serde_json::Value = serde_json::from_slice(&alice.cli(&up, &["--json", "vm", "show", &id]).stdout).unwrap();
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(with_cookie(&up, "GET", "/api/v1/vms", &alice_token, None), 401);
    for png in ["vms", "refusal", "hosts", "images", "console", "vnc", "stopped", "bob-refused"] {
        let bytes = std::fs::read(shots.join(format!("{png}.png"))).unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "no screenshot {png}.png in {}", shots.display());
    }
}
