//! Trust between roles: hosts join only with a valid one-time token of this grid, heartbeats
//! need a certificate of the grid CA naming the node, a forged certificate is refused at the
//! handshake, and the CLI refuses a coordinator whose CA differs from the one it pinned.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn grid_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vgt").tempdir_in("/tmp").unwrap()
}

fn coordinator(dir: &Path, name: &str, listen: &str) -> Role {
    Role::start(
        &["coordinator", "--listen", listen, "--data-dir", dir.join(name).to_str().unwrap(), "--heartbeat-interval", "1"],
        dir.join(format!("{name}.log")),
    )
}

/// `vgrid host` that is expected to fail at start; returns its stderr.
fn host_fails(url: &str, dir: &Path, name: &str, token: Option<&str>) -> String {
    let mut c = Command::new(vgrid_bin());
    c.args(["host", "--coordinator", url, "--listen", "127.0.0.1:0", "--name", name, "--data-dir"]).arg(dir.join(name));
    if let Some(t) = token {
        c.args(["--join-token", t]);
    }
    let o = c.output().unwrap();
    assert!(!o.status.success(), "host {name} started without a valid join token");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn hosts(url: &str) -> Vec<String> {
    json_at(url, &["host", "ls"]).as_array().unwrap().iter().map(|h| h["ad"]["name"].as_str().unwrap().to_string()).collect()
}

/// A CA of nobody's grid and a certificate it signed that claims to be host `evil`.
fn forged_cert(dir: &Path) -> (String, String) {
    let [ca, cakey, key, csr, crt] =
        ["forged-ca.crt", "forged-ca.key", "evil.key", "evil.csr", "evil.crt"].map(|f| dir.join(f).to_str().unwrap().to_string());
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).output().unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/O=vgrid/CN=vgrid CA forged",
        "-keyout",
        &cakey,
        "-out",
        &ca,
    ]);
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/O=vgrid/OU=host/CN=evil",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    run(&["x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &cakey, "-CAcreateserial", "-days", "2", "-out", &crt]);
    (crt, key)
}

#[test]
fn only_joined_nodes_register_and_forged_certificates_are_refused() {
    let dir = grid_dir();
    let c = coordinator(dir.path(), "coord", "127.0.0.1:0");
    let other = coordinator(dir.path(), "other", "127.0.0.1:0");

    // No token, a malformed one, a wrong secret, another grid's token, a token for another role.
    let e = host_fails(&c.url, dir.path(), "h-none", None);
    assert!(e.contains("has not joined the grid yet") && e.contains("--join-token"), "{e}");
    let e = host_fails(&c.url, dir.path(), "h-bad", Some("not-a-token"));
    assert!(e.contains("malformed join token"), "{e}");
    let good = join_token(&c.url, "host");
    let (cred, fp) = good.trim_start_matches("vgrid-join1:").split_once(':').unwrap();
    let (id, _) = cred.split_once('.').unwrap();
    let e = host_fails(&c.url, dir.path(), "h-secret", Some(&format!("vgrid-join1:{id}.00ff:{fp}")));
    assert!(e.contains("wrong secret"), "{e}");
    let e = host_fails(&c.url, dir.path(), "h-grid", Some(&join_token(&other.url, "host")));
    assert!(e.contains("not the one the join token names"), "{e}");
    let e = host_fails(&c.url, dir.path(), "h-role", Some(&join_token(&c.url, "image-server")));
    assert!(e.contains("not a host"), "{e}");
    assert!(hosts(&c.url).is_empty());

    // A valid token joins once; the certificate is kept, so a restart needs no token.
    let mut h1 = Role::start(
        &[
            "host",
            "--coordinator",
            &c.url,
            "--listen",
            "127.0.0.1:0",
            "--name",
            "h1",
            "--data-dir",
            dir.path().join("h1").to_str().unwrap(),
            "--join-token",
            &good,
        ],
        dir.path().join("h1.log"),
    );
    let e = host_fails(&c.url, dir.path(), "h-again", Some(&good));
    assert!(e.contains("already used by h1"), "{e}");
    let t0 = std::time::Instant::now();
    while !hosts(&c.url).contains(&"h1".to_string()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "h1 did not register");
        std::thread::sleep(Duration::from_millis(200));
    }
    h1.terminate();
    let _h1 = Role::start(
        &[
            "host",
            "--coordinator",
            &c.url,
            "--listen",
            "127.0.0.1:0",
            "--name",
            "h1",
            "--data-dir",
            dir.path().join("h1").to_str().unwrap(),
            "--join-token",
            "unused",
        ],
        dir.path().join("h1b.log"),
    );
    let tokens = json_at(&c.url, &["join-token", "ls"]);
    assert!(tokens.as_array().unwrap().iter().any(|t| t["used_by"] == "h1" && t["token"].is_null()), "{tokens}");

    // Heartbeats by hand: without a certificate 401; with h1's certificate for another name 403;
    // with a certificate of a forged CA the handshake itself fails. None registers.
    let beat = |name: &str, cert: Option<(&str, &str)>| -> (i32, String) {
        let body = format!(
            r#"{{"ad":{{"name":"{name}","url":"https://127.0.0.1:1","arch":"x86_64","cpus":4,"memory_mib":4096,"free_cpus":4,"free_memory_mib":4096,"accel":"tcg","qemu_version":"10","network_modes":["user"],"labels":{{}},"load_avg":0.0,"running_vms":0,"image_cache":{{}}}},"vms":[]}}"#
        );
        let mut cmd = curl_for(&c.url);
        cmd.args(["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "content-type: application/json", "--data", &body]);
        if let Some((crt, key)) = cert {
            cmd.args(["--cert", crt, "--key", key]);
        }
        let o = cmd.arg(format!("{}/api/v1/hosts/heartbeat", c.url)).output().unwrap();
        (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert_eq!(beat("intruder", None), (0, "401".to_string()));
    let h1_tls = dir.path().join("h1/tls");
    let (crt, key) = (h1_tls.join("node.crt"), h1_tls.join("node.key"));
    assert_eq!(beat("h2", Some((crt.to_str().unwrap(), key.to_str().unwrap()))), (0, "403".to_string()));
    let (fcrt, fkey) = forged_cert(dir.path());
    let (code, http) = beat("evil", Some((&fcrt, &fkey)));
    assert!(code != 0 && http.trim_start_matches('0').is_empty(), "a forged certificate got through: curl exit {code}, HTTP {http}");
    let names = hosts(&c.url);
    assert!(!names.iter().any(|n| n == "intruder" || n == "h2" || n == "evil"), "{names:?}");
    assert!(c_log_mentions(&c.log, "TLS handshake refused"), "the coordinator did not log the refused handshake");
}

fn c_log_mentions(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).map(|s| s.contains(what)).unwrap_or(false)
}

#[test]
fn the_cli_refuses_a_coordinator_whose_ca_changed() {
    let dir = grid_dir();
    let mut a = coordinator(dir.path(), "a", "127.0.0.1:0");
    let fp_a = json_at(&a.url, &["ca"])["fingerprint"].as_str().unwrap().to_string();
    assert!(fp_a.starts_with("sha256:") && fp_a.len() == 71, "{fp_a}");
    let listen = a.url.trim_start_matches("https://").to_string();
    a.terminate();

    // Another coordinator (another CA) at the same address, and a CLI that pinned the first one
    // (a copy of the pin made before the second started: `vgrid coordinator` re-pins its own).
    let cfg = tempfile::tempdir().unwrap();
    let pins = cfg.path().join("known_coordinators");
    std::fs::create_dir_all(&pins).unwrap();
    let pin_a = dir.path().join("pin-a.pem");
    std::fs::write(&pin_a, std::fs::read_to_string(pinned_ca_file(&listen)).unwrap()).unwrap();
    let b = coordinator(dir.path(), "b", &listen);
    std::fs::copy(&pin_a, pins.join(format!("{}.pem", listen.replace(':', "_")))).unwrap();
    let o = Command::new(vgrid_bin()).args(["vm", "ls"]).env("VGRID_URL", &b.url).env("VGRID_CONFIG_DIR", cfg.path()).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("was pinned for it") && e.contains(&fp_a), "{e}");

    // First contact with a fingerprint given out of band: a wrong one is refused, nothing pinned.
    let fresh = tempfile::tempdir().unwrap();
    let o = Command::new(vgrid_bin())
        .args(["ca"])
        .env("VGRID_URL", &b.url)
        .env("VGRID_CONFIG_DIR", fresh.path())
        .env("VGRID_CA_FINGERPRINT", &fp_a)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("refusing to trust it"), "{e}");
    assert!(!fresh.path().join("known_coordinators").exists());
    let fp_b = json_at(&b.url, &["ca"])["fingerprint"].as_str().unwrap().to_string();
    let o = Command::new(vgrid_bin())
        .args(["ca"])
        .env("VGRID_URL", &b.url)
        .env("VGRID_CONFIG_DIR", fresh.path())
        .env("VGRID_CA_FINGERPRINT", &fp_b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The pin file the local user's CLI keeps for `host:port`.
fn pinned_ca_file(listen: &str) -> std::path::PathBuf {
    pinned_ca(&format!("https://{listen}"))
}

/// The DNS names and IP addresses in a certificate file (openssl's view of its SAN).
fn cert_names(crt: &Path) -> String {
    let o = Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in"]).arg(crt).output().unwrap();
    assert!(o.status.success(), "openssl x509 {}: {}", crt.display(), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Issue 18: a joined image server restarted with the same data directory on an address its
/// certificate does not name (here 127.0.0.2, a loopback alias) gets a new certificate for it
/// from the coordinator, authenticated by the old one (no join token), and clients that verify
/// the server's name connect; where no new certificate can be had, it refuses to start and
/// names the address and the certificate's names.
#[test]
fn a_node_restarted_on_another_address_gets_a_certificate_for_it() {
    let dir = grid_dir();
    let mut c = coordinator(dir.path(), "coord", "127.0.0.1:0");
    let data = dir.path().join("is1");
    let data_s = data.to_str().unwrap();
    let crt = data.join("tls/node.crt");
    let images_via = |url: &str| -> (String, String) {
        let token = json_at(&c.url, &["login"])["token"].as_str().unwrap().to_string();
        let o = curl_for(&c.url)
            .args(["-w", "\n%{http_code}", "-H", &format!("authorization: Bearer {token}"), &format!("{url}/store/v1/images")])
            .output()
            .unwrap();
        assert!(o.status.success(), "curl {url}: exit {:?}: {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    };

    let mut first = Role::start(
        &["image-server", "--listen", "127.0.0.1:0", "--data-dir", data_s, "--coordinator", &c.url, "--name", "is1"],
        dir.path().join("is1-a.log"),
    );
    assert!(first.url.starts_with("https://127.0.0.1:"), "{}", first.url);
    assert_eq!(images_via(&first.url).0, "200");
    first.terminate();
    let before = cert_names(&crt);
    assert!(before.contains("127.0.0.1") && !before.contains("127.0.0.2"), "{before}");

    // Same data directory on 127.0.0.2. The join token given cannot be used (not a token):
    // the new certificate must come from renewing the old one.
    let second = Role::start(
        &[
            "image-server",
            "--listen",
            "127.0.0.2:0",
            "--data-dir",
            data_s,
            "--coordinator",
            &c.url,
            "--name",
            "is1",
            "--join-token",
            "not-a-token",
        ],
        dir.path().join("is1-b.log"),
    );
    assert!(second.url.starts_with("https://127.0.0.2:"), "{}", second.url);
    let after = cert_names(&crt);
    assert!(after.contains("127.0.0.2"), "{after}");
    let (code, body) = images_via(&second.url);
    assert_eq!(code, "200", "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok(), "{body}");
    let log = std::fs::read_to_string(&second.log).unwrap();
    assert!(log.contains("renewed the certificate of image-server is1"), "{log}");
    drop(second);

    // No coordinator to renew with and no token: it refuses to start, naming the address and
    // the certificate's names.
    c.terminate();
    let o = Command::new(vgrid_bin())
        .args(["image-server", "--listen", "127.0.0.3:0", "--data-dir", data_s, "--coordinator", &c.url, "--name", "is1"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "started with a certificate not valid for its address: {e}");
    assert!(e.contains("127.0.0.3") && e.contains("does not name") && e.contains("127.0.0.2"), "{e}");
}
