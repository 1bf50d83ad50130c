//! Warm-cache read speed next to qemu-nbd and nbdkit's file plugin on the same file, all read
//! by `nbdcopy … null:`. Prints ratios; asserts only correctness (no timing thresholds: the
//! machine is shared). Run by hand: `cargo test -p vgrid-blockproxy --test perf_probe -- --ignored --nocapture`.

use rand::{RngCore, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;
use vgrid_blockproxy::{BlockProxy, ProxyConfig, StoreSource};
use vgrid_imagestore::ImageStore;
use vgrid_storeclient::import::{Format, ImportOptions};
use vgrid_storeclient::StoreClient;

async fn time_nbdcopy(uri: &str, rounds: usize) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        let o = Command::new("nbdcopy").args([uri, "null:"]).output().await.unwrap();
        assert!(o.status.success(), "nbdcopy {uri}: {}", String::from_utf8_lossy(&o.stderr));
        best = best.min(t.elapsed());
    }
    best
}

/// Small-request latency/throughput: `qemu-img bench` with 4 KiB reads, queue depth 16.
async fn time_bench(uri: &str, rounds: usize) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        let o = Command::new("qemu-img")
            .args(["bench", "-f", "raw", "-c", "100000", "-d", "16", "-s", "4096", "-S", "1048576", uri])
            .output()
            .await
            .unwrap();
        assert!(o.status.success(), "qemu-img bench {uri}: {}", String::from_utf8_lossy(&o.stderr));
        best = best.min(t.elapsed());
    }
    best
}

/// User+system CPU seconds used so far by process `pid` (all threads).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn wait_for(sock: &Path) {
    for _ in 0..100 {
        if sock.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never appeared", sock.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn warm_reads_against_qemu_nbd_and_nbdkit() {
    let size: usize = std::env::var("PERF_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256) << 20;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("img.raw");
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
    std::fs::write(&file, &data).unwrap();
    drop(data);

    let store = Arc::new(ImageStore::open_local(tmp.path().join("store")).unwrap());
    let (addr, _srv) = vgrid_imagestore::server::spawn(store, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = StoreClient::new(&format!("http://{addr}")).unwrap();
    let mut opts = ImportOptions::new("perf");
    opts.format = Some(Format::Raw);
    vgrid_storeclient::import_file(&client, &file, &opts, &|_, _| {}).await.unwrap();

    let proxy = BlockProxy::new(ProxyConfig::new(tmp.path().join("cache"), 4 << 30), Arc::new(StoreSource::new(client))).unwrap();
    let t = Instant::now();
    proxy.pull(&"perf".parse().unwrap(), &|_, _| {}).await.unwrap();
    println!("pull of {} MiB: {:.2} s", size >> 20, t.elapsed().as_secs_f64());
    let sock = tmp.path().join("vgrid.sock");
    let _h = proxy.serve_unix(&sock).unwrap();
    let ours = format!("nbd+unix:///perf?socket={}", sock.display());

    let qsock = tmp.path().join("qemu.sock");
    let mut qemu = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "raw", "-x", "perf", "-e", "8", "-k", qsock.to_str().unwrap(), file.to_str().unwrap()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(&qsock).await;
    let ksock = tmp.path().join("kit.sock");
    let mut kit = Command::new("nbdkit")
        .args(["-f", "-r", "-U", ksock.to_str().unwrap(), "file", file.to_str().unwrap()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(&ksock).await;

    let rounds = std::env::var("PERF_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    if std::env::var("PERF_ONLY_VGRID").is_ok() {
        let v = time_nbdcopy(&ours, rounds).await;
        println!("vgrid:    {:.0} MiB/s", (size >> 20) as f64 / v.as_secs_f64());
        return;
    }
    let (qpid, kpid, me) = (qemu.id().unwrap(), kit.id().unwrap(), std::process::id());
    let c0 = (cpu_secs(qpid), cpu_secs(kpid), cpu_secs(me));
    let q = time_nbdcopy(&format!("nbd+unix:///perf?socket={}", qsock.display()), rounds).await;
    let c1 = cpu_secs(qpid);
    let k = time_nbdcopy(&format!("nbd+unix:///?socket={}", ksock.display()), rounds).await;
    let c2 = cpu_secs(kpid);
    let m0 = cpu_secs(me);
    let v = time_nbdcopy(&ours, rounds).await;
    let m1 = cpu_secs(me);
    println!("server CPU for {rounds} full reads: qemu-nbd {:.2} s, nbdkit {:.2} s, vgrid {:.2} s", c1 - c0.0, c2 - c0.1, m1 - m0);
    let _ = c0.2;
    let mib = (size >> 20) as f64;
    println!("qemu-nbd: {:.0} MiB/s", mib / q.as_secs_f64());
    println!("nbdkit:   {:.0} MiB/s", mib / k.as_secs_f64());
    println!(
        "vgrid:    {:.0} MiB/s  ({:.2}x qemu-nbd, {:.2}x nbdkit)",
        mib / v.as_secs_f64(),
        q.as_secs_f64() / v.as_secs_f64(),
        k.as_secs_f64() / v.as_secs_f64()
    );
    let c0 = (cpu_secs(qpid), cpu_secs(kpid));
    let q = time_bench(&format!("nbd+unix:///perf?socket={}", qsock.display()), rounds).await;
    let c1 = cpu_secs(qpid);
    let k = time_bench(&format!("nbd+unix:///?socket={}", ksock.display()), rounds).await;
    let c2 = cpu_secs(kpid);
    let m0 = cpu_secs(me);
    let v = time_bench(&ours, rounds).await;
    let m1 = cpu_secs(me);
    println!("server CPU for 4k reads: qemu-nbd {:.2} s, nbdkit {:.2} s, vgrid {:.2} s", c1 - c0.0, c2 - c0.1, m1 - m0);
    println!(
        "4k reads: qemu-nbd {:.2} s, nbdkit {:.2} s, vgrid {:.2} s ({:.2}x qemu-nbd, {:.2}x nbdkit)",
        q.as_secs_f64(),
        k.as_secs_f64(),
        v.as_secs_f64(),
        q.as_secs_f64() / v.as_secs_f64(),
        k.as_secs_f64() / v.as_secs_f64()
    );
    println!("{}", serde_json::to_string_pretty(&proxy.stats()).unwrap());
    let _ = qemu.kill().await;
    let _ = kit.kill().await;
}
