//! A real etcd for tests: Debian's `etcd` binary (`scripts/install-deps.sh`) started on
//! loopback with its own ports and data directory, killed when dropped. Tests that need it
//! skip, saying so, when the binary is missing.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::etcd::EtcdConfig;

/// One etcd member on 127.0.0.1.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// The etcd binary, if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("etcd")).find(|p| p.is_file())
}

impl EtcdServer {
    /// Starts one member and waits until it answers; `None` (after saying why) when the etcd
    /// binary is not installed.
    pub async fn start() -> Option<EtcdServer> {
        if etcd_binary().is_none() {
            eprintln!("SKIPPED: no etcd binary on PATH (scripts/install-deps.sh installs Debian's etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = EtcdServer { child: None, dir, client_port: free_port(), peer_port: free_port() };
        s.spawn().await;
        Some(s)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.client_port)
    }

    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig::parse(&self.url(prefix)).expect("a valid etcd URL")
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(etcd_binary().expect("etcd"))
            .args(["--name", "n1", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint(), "--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("n1={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([self.endpoint()], None).await {
                if c.status().await.is_ok() {
                    return;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "etcd did not start; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What etcd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills the member (SIGKILL): its data stays for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed member again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
