//! Every role's HTTP API holds to the OpenAPI document it serves, and malformed input at its
//! boundary does no harm: schemathesis (scripts/contracts) fuzzes the coordinator's, the image
//! server's and the host agent's documents against a real `vgrid up`, as an admin and as a
//! plain user; forged heartbeats and join requests, credentials checked before bodies,
//! oversized bodies and slow-loris clients are tried by hand. Afterwards the server holds no
//! more file descriptors or threads than before.

mod common;

use common::*;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A plain (non-admin) user `name` added by the admin; returns their login token.
fn user_token(up: &Up, dir: &Path, name: &str) -> String {
    let k = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&key, k.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
    let public = dir.join(format!("{name}.key.pub"));
    std::fs::write(&public, k.public_key().to_openssh().unwrap()).unwrap();
    up.ok(&["user", "add", name, "--key", public.to_str().unwrap()]);
    let config = dir.join(format!("cfg-{name}"));
    std::fs::create_dir_all(&config).unwrap();
    let o = Command::new(vgrid_bin())
        .args(["--json", "login"])
        .env("VGRID_URL", &up.url)
        .env("VGRID_CONFIG_DIR", &config)
        .env("VGRID_KEY", &key)
        .env("VGRID_USER", name)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "login as {name}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token"].as_str().unwrap().to_string()
}

fn admin_token(up: &Up) -> String {
    up.json(&["login"])["token"].as_str().unwrap().to_string()
}

/// Open file descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The connections the server on `port` still holds open: its side of a TCP connection
/// established, or closed by the peer and not yet by the server (CLOSE_WAIT).
fn held_connections(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols.get(1).and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && matches!(cols.get(3), Some(&"01") | Some(&"08")) {
                n += 1;
            }
        }
    }
    n
}

/// Waits until the server `up` has at most a few more descriptors than `before` (a pooled
/// connection to its own host agent may open meanwhile; kept client connections would be one
/// each). The connections held on its port are only reported: `vgrid up`'s own agent keeps
/// keep-alives to it. Threads are not compared: tokio's blocking pool grows and shrinks with
/// the background work.
fn wait_for_no_leak(up: &Up, before: usize, after_what: &str) {
    let pid = up.child.as_ref().unwrap().id();
    let port: u16 = up.url.rsplit_once(':').and_then(|(_, p)| p.trim_end_matches('/').parse().ok()).unwrap();
    let t0 = Instant::now();
    let (held, fds) = loop {
        std::thread::sleep(Duration::from_millis(200));
        let (held, fds) = (held_connections(port), descriptors(pid));
        if fds <= before + 8 {
            break (held, fds);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "after {after_what}, 60 s on the server still holds {held} connections and {fds} descriptors (before: {before})\n{}",
            up.log_tail()
        );
    };
    eprintln!("after {after_what}: descriptors before {before}, after {fds}; connections held {held}");
}

/// `curl` with `token` (if any): the status and the body.
fn call(up: &Up, method: &str, path: &str, token: Option<&str>, body: Option<&Path>) -> (u16, String) {
    let mut c = curl_for(&up.url);
    c.args(["-o", "-", "-w", "\n%{http_code}", "-X", method, "-H", "content-type: application/json"]);
    if let Some(t) = token {
        c.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.arg("--data-binary").arg(format!("@{}", b.display()));
    }
    let o = c.arg(format!("{}{path}", up.url)).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn healthy(up: &Up) {
    let (code, body) = call(up, "GET", "/api/v1/health", None, None);
    assert_eq!(code, 200, "the server stopped answering: {body}\n{}", up.log_tail());
}

/// Generated cases per operation and phase when VGRID_CONTRACT_EXAMPLES is not set.
const CI_EXAMPLES: &str = "3";

/// Runs scripts/contracts against `up` as the holder of `token`, for `roles`; panics with its
/// findings when it finds anything.
fn fuzz(up: &Up, token: &str, roles: &[&str]) {
    let script = repo().join("scripts/contracts");
    let t = Instant::now();
    let mut fuzzer = Command::new(&script);
    if std::env::var_os("VGRID_CONTRACT_EXAMPLES").is_none() {
        // CI's share: every operation, every phase, few generated cases (the README's longer
        // local run sets more).
        fuzzer.env("VGRID_CONTRACT_EXAMPLES", CI_EXAMPLES);
    }
    let o = fuzzer
        .arg(&up.url)
        .arg(token)
        .args(roles)
        .env("VGRID_CA", pinned_ca(&up.url))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("scripts/contracts {roles:?}: {:.1} s", t.elapsed().as_secs_f64());
    assert!(o.status.success(), "the fuzzer found something ({roles:?}):\n{out}\nserver log:\n{}", up.log_tail());
}

#[test]
fn every_roles_api_holds_to_its_document_under_fuzzing() {
    let up = Up::start();
    let dir = tempfile::tempdir().unwrap();
    let pid = up.child.as_ref().unwrap().id();
    let admin = admin_token(&up);
    healthy(&up);
    let before = descriptors(pid);

    fuzz(&up, &admin, &["api", "store", "host"]);
    // The plain user joins after the admin's run, which deletes the users it finds.
    let bob = user_token(&up, dir.path(), "bob");
    fuzz(&up, &bob, &["api", "store"]);

    // Neither token was revoked by the run, and the server is fine.
    healthy(&up);
    for t in [&admin, &bob] {
        assert_eq!(call(&up, "GET", "/api/v1/whoami", Some(t), None).0, 200);
    }
    // Nothing leaked: once the fuzzer's connections are gone, no descriptor is left over.
    wait_for_no_leak(&up, before, "the fuzzing");
}

#[test]
fn credentials_are_checked_before_bodies_and_oversized_bodies_are_413() {
    let up = Up::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_token(&up);
    let forged = format!("vgt_{}", "ab".repeat(32));
    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, b"{\"image\": [not json").unwrap();
    let big = |name: &str, bytes: usize| {
        let p = dir.path().join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"{\"image\": \"").unwrap();
        f.write_all(&vec![b'a'; bytes]).unwrap();
        f.write_all(b"\"}").unwrap();
        p
    };
    let (api_big, host_big) = (big("api.json", 2 << 20), big("host.json", 6 << 20));
    let store_big = big("store.json", 65 << 20);
    let chunk = format!("/store/v1/uploads/x/chunks/{}", "0".repeat(64));
    let routes: [(&str, &str, &Path); 6] = [
        ("POST", "/api/v1/vms", api_big.as_path()),
        ("POST", "/api/v1/users", api_big.as_path()),
        ("PUT", "/api/v1/users/bob/quota", api_big.as_path()),
        ("POST", "/store/v1/uploads/x/commit", store_big.as_path()),
        ("PUT", chunk.as_str(), store_big.as_path()),
        ("POST", "/host/v1/vms", host_big.as_path()),
    ];
    for (method, path, oversized) in routes {
        // A bad token is a 401 whatever the body: malformed, oversized or none.
        for body in [Some(malformed.as_path()), Some(oversized), None] {
            let (code, text) = call(&up, method, path, Some(&forged), body);
            assert_eq!(code, 401, "{method} {path} with a forged token and body {body:?}: {text}");
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["error"].is_string()), "{text}");
        }
        // Authenticated: over the limit is a 413 that says so, as JSON. The server answers and
        // closes while curl may still be sending the body: curl then reports no final status
        // (100 or 0, the answer unread). Such a client-side race is tried again.
        let mut answer = call(&up, method, path, Some(&admin), Some(oversized));
        for _ in 0..4 {
            if answer.0 != 100 && answer.0 != 0 {
                break;
            }
            answer = call(&up, method, path, Some(&admin), Some(oversized));
        }
        let (code, text) = answer;
        assert_eq!(code, 413, "{method} {path} with an oversized body: {text}");
        assert!(text.contains("large"), "{text}");
        healthy(&up);
    }
    // The coordinator's own limit is in its document.
    let (_, doc) = call(&up, "GET", "/api/openapi.json", None, None);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"]["/api/v1/vms"]["post"]["responses"]["413"].is_object(), "413 undocumented");
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let public = op["security"].as_array().is_some_and(|s| s.iter().all(|r| r.as_object().is_some_and(|o| o.is_empty())));
            if !public {
                for status in ["401", "403"] {
                    assert!(op["responses"][status].is_object(), "{method} {path}: {status} undocumented");
                }
            }
        }
    }
}

#[test]
fn forged_heartbeats_and_joins_are_refused_and_change_nothing() {
    let up = Up::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_token(&up);
    let hosts = |up: &Up| -> Vec<String> {
        up.json(&["host", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["ad"]["name"].as_str().or(h["name"].as_str()).unwrap_or_default().to_string())
            .collect()
    };
    let before = hosts(&up);
    let hb = dir.path().join("hb.json");
    std::fs::write(
        &hb,
        serde_json::json!({"ad": {"name": "intruder", "url": "https://127.0.0.1:1", "cpus": 64, "memory_mib": 1 << 20}, "vms": []})
            .to_string(),
    )
    .unwrap();
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, b"\x00\x01 not a heartbeat").unwrap();
    // No certificate: an admin's token does not make a host, and neither does nothing; the
    // body is not even read.
    for token in [Some(admin.as_str()), None] {
        for body in [&hb, &garbage] {
            let (code, text) = call(&up, "POST", "/api/v1/hosts/heartbeat", token, Some(body));
            assert_eq!(code, 401, "a heartbeat without a certificate: {text}");
            assert!(text.contains("has not joined"), "{text}");
            let (code, text) = call(&up, "POST", "/api/v1/image-servers/heartbeat", token, Some(body));
            assert_eq!(code, 401, "an image server's heartbeat without a certificate: {text}");
        }
    }
    assert_eq!(hosts(&up), before, "a forged heartbeat registered a host");

    // Join requests with a malformed, unknown, wrong-secret or expired token: 401 saying why.
    let made = |ttl: u64| -> String {
        let body = dir.path().join("jt.json");
        std::fs::write(&body, serde_json::json!({"role": "host", "ttl_seconds": ttl}).to_string()).unwrap();
        let (code, text) = call(&up, "POST", "/api/v1/join-tokens", Some(&admin), Some(&body));
        assert_eq!(code, 200, "{text}");
        let t: serde_json::Value = serde_json::from_str(&text).unwrap();
        // vgrid-join1:<id>.<secret>:<fingerprint>
        t["token"].as_str().unwrap().split(':').nth(1).unwrap().to_string()
    };
    let short = made(1);
    let good = made(3600);
    let (id, _) = good.split_once('.').unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let wrong = format!("{id}.00ff");
    for (token, why) in
        [("nodot", "malformed"), ("0123456789ab.00", "unknown token"), (wrong.as_str(), "wrong secret"), (short.as_str(), "expired")]
    {
        let body = dir.path().join("join.json");
        std::fs::write(&body, serde_json::json!({"token": token, "role": "host", "name": "h9", "csr": "not a CSR"}).to_string()).unwrap();
        let (code, text) = call(&up, "POST", "/api/v1/join", None, Some(&body));
        assert_eq!(code, 401, "join with token {token:?}: {text}");
        assert!(text.contains(why), "join with token {token:?} should say {why:?}: {text}");
    }
    // The good token is still unspent (a refused join spends nothing).
    let tokens = up.json(&["join-token", "ls"]);
    let t = tokens.as_array().unwrap().iter().find(|t| t["id"] == id).unwrap();
    assert!(t["used_by"].is_null(), "{t}");
    assert_eq!(hosts(&up), before);
}

/// A slow-loris client in Python (its `ssl` module): `n` TLS connections that each send a
/// request line and then one header byte per second; prints, per connection, the seconds
/// until the server closed it (or `open` after `limit` seconds).
const SLOWLORIS: &str = r#"
import socket, ssl, sys, time, select
host, port, n, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
conns = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    conns.append([s, time.time(), None])
print("ready", flush=True)
start = time.time()
while time.time() - start < limit and any(c[2] is None for c in conns):
    for c in conns:
        if c[2] is not None:
            continue
        try:
            c[0].sendall(b"X")
            r, _, _ = select.select([c[0]], [], [], 0)
            if r and c[0].recv(1) == b"":
                c[2] = time.time() - c[1]
        except (OSError, ssl.SSLError):
            c[2] = time.time() - c[1]
    time.sleep(1)
for c in conns:
    print("open" if c[2] is None else "%.1f" % c[2], flush=True)
"#;

#[test]
fn slowloris_clients_neither_stop_the_server_nor_keep_their_connections() {
    let up = Up::start();
    let pid = up.child.as_ref().unwrap().id();
    healthy(&up);
    let before = descriptors(pid);
    let addr = up.url.trim_start_matches("https://").to_string();
    let (host, port) = addr.split_once(':').unwrap();
    let mut loris = Command::new("python3")
        .args(["-c", SLOWLORIS, host, port, "100", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(loris.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the slow-loris client did not connect");
    // While 100 connections drip their headers, others are answered.
    for _ in 0..5 {
        healthy(&up);
        assert_eq!(call(&up, "GET", "/api/v1/whoami", Some(&admin_token(&up)), None).0, 200);
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = loris.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(status.success(), "slow-loris client failed: {rest}");
    let closed: Vec<&str> = rest.lines().collect();
    assert_eq!(closed.len(), 100, "{rest}");
    // The server closed each of them: a client gets a bounded time to send its headers.
    assert!(closed.iter().all(|c| *c != "open"), "connections the server kept open for 120 s:\n{rest}");
    healthy(&up);
    wait_for_no_leak(&up, before, "the slow-loris clients");
}
