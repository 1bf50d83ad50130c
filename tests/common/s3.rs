//! A real S3 server for tests: SeaweedFS (`weed mini`, from the PyPI venv that
//! `scripts/install-deps.sh` makes) on 127.0.0.1 with its own ports and data directory, telemetry
//! off, one bucket, killed when dropped. Its data survives [`S3Server::kill`] for
//! [`S3Server::restart`].
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "vgridtest";
pub const SECRET_KEY: &str = "vgridtestsecret";

pub struct S3Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// master, volume, filer, s3, admin: each with its gRPC port at +10000.
    ports: [u16; 5],
    pub bucket: String,
}

/// Five ports p whose p and p + 10000 are both free, below the kernel's ephemeral range.
fn free_ports() -> [u16; 5] {
    // Servers started by one test binary at once must not pick the same ports.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let offset = NEXT.fetch_add(40, std::sync::atomic::Ordering::SeqCst);
    let mut out = Vec::new();
    let mut p = 12000 + ((std::process::id() % 200) as u16 * 40 + offset) % 9000;
    while out.len() < 5 {
        let ok = TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok();
        if ok {
            out.push(p);
        }
        p += 1;
        if p >= 22000 {
            p = 12000;
        }
    }
    out.try_into().unwrap()
}

pub fn weed_binary() -> PathBuf {
    let py = super::tool_python("seaweedfs-4.48");
    py.parent().unwrap().join("weed")
}

impl S3Server {
    /// Starts SeaweedFS with bucket `bucket` and waits until its S3 port answers.
    pub fn start(bucket: &str) -> S3Server {
        let dir = tempfile::Builder::new().prefix("vgs3").tempdir_in("/tmp").unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let ids = serde_json::json!({"identities": [{
            "name": "vgrid",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(dir.path().join("identities.json"), ids.to_string()).unwrap();
        let mut s = S3Server { child: None, dir, ports: free_ports(), bucket: bucket.into() };
        s.spawn();
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }

    /// The environment an S3 client of this server needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let [master, volume, filer, s3, admin] = self.ports;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("weed.log")).unwrap();
        let child = Command::new(weed_binary())
            .arg("mini")
            .arg(format!("-dir={}", d.join("data").display()))
            // Loopback only, and no reports to the outside (its defaults do both).
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false", "-webdav=false"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-admin.port={admin}"))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", d.join("identities.json").display()))
            .arg(format!("-bucket={}", self.bucket))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting SeaweedFS (weed mini)");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until an anonymous request to the bucket gets an S3 answer (403: the server is up
    /// and the bucket exists; it needs credentials).
    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        let url = format!("{}/{}", self.endpoint(), self.bucket);
        loop {
            let o = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", &url]).output().unwrap();
            let code = String::from_utf8_lossy(&o.stdout).to_string();
            if code == "403" || code == "200" {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("SeaweedFS exited ({st}); its log:\n{}", self.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "SeaweedFS did not start (last answer {code:?}); its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// SIGKILL: the server is gone; its data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed server again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
