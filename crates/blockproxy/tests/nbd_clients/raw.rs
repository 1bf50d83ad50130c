//! Just enough NBD on a raw socket to send broken input: the phases of
//! `malformed_input_gets_errors_or_a_closed_connection` (in `nbd_clients.rs`, whose fixture
//! this uses).

use super::*;
use tokio::net::UnixStream;
use vgrid_blockproxy::protocol as p;

async fn connect(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    s
}
async fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}
async fn reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), p::OPTION_REPLY_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, ty, d)
}
async fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}
fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}
fn req(cookie: u64, kind: u16, offset: u64, len: u32) -> [u8; p::REQUEST_LEN] {
    p::encode_request(&p::Request { flags: 0, kind, cookie, offset, len })
}

/// Bad options get error replies and the session goes on; bad requests get error replies
/// and the connection stays usable, until a bad request magic closes it.
pub(super) async fn bad_options_then_bad_requests(f: &Fixture, proxy: &BlockProxy, sock: &Path) {
    // Unknown option → ERR_UNSUP; truncated GO → ERR_INVALID; the session goes on.
    let mut s = connect(sock).await;
    option(&mut s, 0xdead, b"whatever").await;
    assert_eq!(reply(&mut s).await.1, p::REP_ERR_UNSUP);
    option(&mut s, p::OPT_GO, &[0, 0, 0, 9, b'r']).await;
    assert_eq!(reply(&mut s).await.1, p::REP_ERR_INVALID);
    option(&mut s, p::OPT_GO, &go_data("nope")).await;
    let (_, ty, msg) = reply(&mut s).await;
    assert_eq!(ty, p::REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    // Structured replies, then GO, then a read past the end → EINVAL, then a good read.
    option(&mut s, p::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(reply(&mut s).await.1, p::REP_ACK);
    option(&mut s, p::OPT_GO, &go_data("raw")).await;
    loop {
        let (_, ty, _) = reply(&mut s).await;
        if ty == p::REP_ACK {
            break;
        }
        assert_eq!(ty, p::REP_INFO);
    }
    s.write_all(&req(1, p::CMD_READ, SIZE as u64 - 10, 11)).await.unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), p::REPLY_TYPE_ERROR);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 1);
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).await.unwrap();
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), p::EINVAL);
    // A write is refused with EPERM (its payload consumed), the connection stays usable.
    s.write_all(&req(2, p::CMD_WRITE, 0, 4)).await.unwrap();
    s.write_all(b"abcd").await.unwrap();
    s.read_exact(&mut h).await.unwrap();
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).await.unwrap();
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), p::EPERM);
    s.write_all(&req(3, p::CMD_READ, SIZE as u64 - 10, 10)).await.unwrap();
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), p::REPLY_TYPE_OFFSET_DATA);
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).await.unwrap();
    assert_eq!(&d[8..], &f.data[SIZE - 10..]);
    // NBD_CMD_CACHE fetches the range into the cache and answers with a final NONE chunk.
    let c5 = f.manifest.disk.chunks[5].unwrap();
    assert!(!proxy.cache().contains(&c5));
    s.write_all(&req(4, p::CMD_CACHE, 5 * CHUNK as u64, CHUNK)).await.unwrap();
    s.read_exact(&mut h).await.unwrap();
    assert_eq!((u16::from_be_bytes([h[6], h[7]]), u64::from_be_bytes(h[8..16].try_into().unwrap())), (p::REPLY_TYPE_NONE, 4));
    assert!(proxy.cache().contains(&c5));
    // Block status without a negotiated base:allocation context → EINVAL.
    s.write_all(&req(5, p::CMD_BLOCK_STATUS, 0, 4096)).await.unwrap();
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), p::REPLY_TYPE_ERROR);
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).await.unwrap();
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), p::EINVAL);
    // Bad request magic → the server closes the connection.
    s.write_all(&[0u8; 28]).await.unwrap();
    assert!(closed(&mut s).await);
}

/// Old-style NBD_OPT_EXPORT_NAME: size and flags, no zero padding (NO_ZEROES), then reads;
/// an unknown name there can only close the connection.
pub(super) async fn old_style_export_name(f: &Fixture, sock: &Path) {
    let mut s = connect(sock).await;
    option(&mut s, p::OPT_EXPORT_NAME, b"raw").await;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE as u64);
    assert_eq!(u16::from_be_bytes([b[8], b[9]]) & p::FLAG_READ_ONLY, p::FLAG_READ_ONLY);
    s.write_all(&req(9, p::CMD_READ, 100, 50)).await.unwrap();
    let mut r = [0u8; 16 + 50];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 0);
    assert_eq!(&r[16..], &f.data[100..150]);
    // ... and an unknown name there can only close the connection.
    let mut s = connect(sock).await;
    option(&mut s, p::OPT_EXPORT_NAME, b"nosuch").await;
    assert!(closed(&mut s).await);
}

/// A bad option magic closes the connection; random garbage after the greeting never
/// hangs or crashes the server.
pub(super) async fn bad_magic_and_garbage(sock: &Path) {
    // Bad option magic → closed.
    let mut s = connect(sock).await;
    s.write_all(&[0x11u8; 16]).await.unwrap();
    assert!(closed(&mut s).await);

    // Random garbage after the greeting: never a hang, never a crash.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..100 {
        let mut s = UnixStream::connect(sock).await.unwrap();
        let n = rng.gen_range(0..300);
        let mut junk = vec![0u8; n];
        rng.fill_bytes(&mut junk);
        if rng.gen_bool(0.5) && n >= 4 {
            junk[..4].copy_from_slice(&3u32.to_be_bytes());
            if n >= 12 {
                junk[4..12].copy_from_slice(&p::IHAVEOPT.to_be_bytes());
            }
        }
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "server did not close a connection fed garbage");
    }
}

/// Structure-aware fuzzing of the transmission phase: `cases` sessions, each negotiated
/// properly (GO on export `raw`, structured replies or not), then fed 1 to 8 requests with
/// random flags, commands (known and unknown), offsets and lengths (inside, across and far past
/// the end), write payloads or none, and now and then a broken header, before the client stops
/// sending. The server must answer or close every session (never hang, never crash); the
/// caller then checks a real client still reads byte-exact data. Returns (sessions, requests).
pub(super) async fn fuzz_requests(sock: &Path, cases: u64, seed: u64) -> (u64, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sent = 0;
    for _ in 0..cases {
        let mut s = connect(sock).await;
        if rng.gen_bool(0.5) {
            option(&mut s, p::OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(reply(&mut s).await.1, p::REP_ACK);
        }
        option(&mut s, p::OPT_GO, &go_data("raw")).await;
        while reply(&mut s).await.1 != p::REP_ACK {}
        let mut bytes = Vec::new();
        for cookie in 0..rng.gen_range(1..=8u64) {
            sent += 1;
            if rng.gen_bool(0.05) {
                let mut junk = [0u8; p::REQUEST_LEN];
                rng.fill_bytes(&mut junk);
                bytes.extend_from_slice(&junk);
                continue;
            }
            let kind = if rng.gen_bool(0.9) { rng.gen_range(0..=8u16) } else { rng.gen() };
            let offset = match rng.gen_range(0..4) {
                0 => rng.gen(),
                1 => SIZE as u64 - rng.gen_range(0..1000u64).min(SIZE as u64),
                _ => rng.gen_range(0..SIZE as u64),
            };
            let len = match rng.gen_range(0..4) {
                0 => rng.gen(),
                _ => rng.gen_range(0..256 * 1024u32),
            };
            let flags = if rng.gen_bool(0.7) { 0 } else { rng.gen::<u16>() & 0x3f };
            bytes.extend_from_slice(&p::encode_request(&p::Request { flags, kind, cookie, offset, len }));
            if kind == p::CMD_WRITE && len <= 64 * 1024 && rng.gen_bool(0.8) {
                let mut payload = vec![0u8; len as usize];
                rng.fill_bytes(&mut payload);
                bytes.extend_from_slice(&payload);
            }
        }
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "the server neither answered nor closed a session after {} request bytes", bytes.len());
    }
    (cases, sent)
}
