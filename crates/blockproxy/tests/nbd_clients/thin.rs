//! A thin link: the image server reached through a relay that passes 1 MB/s, with more
//! chunk fetches in flight than that link finishes within one try's bound. The fetches share
//! it and keep moving, so none is cut half-way and fetched again: the whole image arrives
//! once, byte-exact, with no fetch counted as failed or waiting. (In `nbd_clients.rs`, whose
//! fixture this uses.)

use super::*;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

/// Bytes per second the relay passes from the image server to the proxy.
const RATE: u64 = 1_000_000;

/// A TCP relay to `to` passing at most [`RATE`] bytes per second from the server to its
/// clients, all connections together (one bucket: a link), in 4 KiB steps.
async fn thin_relay(to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let link = Arc::new(std::sync::Mutex::new(Instant::now()));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let link = link.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(to).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // The link is free again at `*next`; this piece holds it n/RATE s.
                    let free = {
                        let mut next = link.lock().unwrap();
                        let start = (*next).max(Instant::now());
                        *next = start + Duration::from_micros(n as u64 * 1_000_000 / RATE);
                        *next
                    };
                    tokio::time::sleep_until(free.into()).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_sharing_a_thin_link_are_not_cut_and_fetched_again() {
    let f = Fixture::new("thin").await;
    let relay = thin_relay(f.server.addr).await;
    let source = Arc::new(StoreSource::new(StoreClient::with_retry(&format!("http://{relay}"), quick_retry()).unwrap()));
    let mut cfg = ProxyConfig::new(f.path("cache"), 1 << 30);
    // 16 whole 64 KiB chunks at once (nbdcopy's reads and their readahead) need ~1 s of this
    // link; one try may take 0.5 s of silence, not 0.5 s in all.
    cfg.fetch_attempt_timeout = Duration::from_millis(500);
    cfg.fetch_concurrency = 16;
    cfg.fetch_timeout = Some(Duration::from_secs(60));
    let proxy = BlockProxy::new(cfg, source).unwrap();
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let t = Instant::now();
    nbdcopy_equals(&uri("thin", &sock), &f.path("out.raw"), &f.data).await;
    let s = proxy.stats();
    println!(
        "FAULTS-FIGURES\tthin-link\t{} MiB over a 1 MB/s relay in {:.1} s (16 fetches at once, a try's bound 0.5 s): {} fetches, {} bytes fetched, {} failed, {} waited",
        SIZE >> 20,
        t.elapsed().as_secs_f64(),
        s.fetches,
        s.bytes_fetched,
        s.fetch_errors,
        s.fetch_waits
    );
    assert_eq!(s.fetch_errors, 0, "fetches over a thin but moving link failed: {s:?}");
    assert_eq!(s.fetch_waits, 0, "reads over a thin but moving link waited as for an outage: {s:?}");
    assert!(s.bytes_fetched <= f.data.len() as u64 + (f.data.len() as u64 / 10), "chunks were fetched more than once: {s:?}");
}
