//! Busy polling: a client with one read in flight at a time, sending each request right after
//! the last reply, gets its requests read by polling, and every byte right. (In
//! `nbd_clients.rs`, whose fixture this uses.)

use super::*;

/// A client with one 4 KiB read in flight at a time gets its requests read by busy polling,
/// and every byte right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_the_pace_is_busy_polled_and_reads_exact_bytes() {
    let f = Fixture::new("paced").await;
    let proxy = f.proxy("cache", 1 << 30);
    assert!(!proxy.config().busy_poll.is_zero(), "busy polling is on by default");
    let sock = f.path("nbd.sock");
    let _server = proxy.serve_unix(&sock).unwrap();
    let u = uri("paced", &sock);
    // Fill the cache first: the paced reads below are the cached fast path.
    nbdcopy_equals(&u, &f.path("fill.raw"), &f.data).await;
    let before = vgrid_blockproxy::metrics::nbd_busy_polled();
    // fio at depth 1 sends each request right after the last reply (nbdcopy's pipeline is too
    // slow for that); then nbdcopy at depth 1 checks every byte on the same proxy.
    let requests = f.data.len() as u64 / 4096;
    let size = format!("--size={}", f.data.len());
    ok("fio", &["--name=paced", "--ioengine=nbd", &format!("--uri={u}"), "--rw=read", "--bs=4k", "--iodepth=1", &size, "--loops=4"]).await;
    let polled = vgrid_blockproxy::metrics::nbd_busy_polled() - before;
    assert!(polled > 0, "none of {} paced requests was read by polling", 4 * requests);
    eprintln!("{polled} of {} paced requests read by busy polling", 4 * requests);
    let out = f.path("paced.raw");
    ok("nbdcopy", &["--connections=1", "--requests=1", "--request-size=4096", "--threads=1", &u, out.to_str().unwrap()]).await;
    assert!(std::fs::read(&out).unwrap() == f.data, "bytes read at depth 1 differ from the image");
}
