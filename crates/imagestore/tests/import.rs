//! Import and export of image files against a real image server, checked with qemu-img.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use vgrid_api::{Boot, ImageRef};
use vgrid_storeclient::{codec, export_blob, export_image, import_file, Format, ImportError, ImportOptions};

const CS: u32 = 64 * 1024;

fn r(s: &str) -> ImageRef {
    s.parse().unwrap()
}

fn no_progress() -> impl Fn(u64, u64) + Send + Sync {
    |_, _| {}
}

/// Random data, zero regions, a chunk repeated, and a size that is not a multiple of CS.
fn write_test_disk(path: &Path, seed: u64) -> Vec<u8> {
    let cs = CS as usize;
    let mut d = Vec::new();
    d.extend(chunk_data(seed, 3 * cs));
    d.extend(vec![0u8; 2 * cs]); // zero chunks
    d.extend(chunk_data(seed + 1, cs / 2));
    d.extend(vec![0u8; cs / 2]); // half-zero chunk: stored
    let repeated = chunk_data(seed + 2, cs);
    d.extend(&repeated);
    d.extend(&repeated);
    d.extend(vec![0u8; 3 * cs + 17]);
    d.extend(chunk_data(seed + 3, 1234)); // short tail
    std::fs::write(path, &d).unwrap();
    d
}

fn qemu_img_compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b).output().unwrap();
    assert!(out.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&out.stdout));
}

fn opts(name: &str) -> ImportOptions {
    ImportOptions { chunk_size: CS, ..ImportOptions::new(name) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_export_roundtrip_and_dedup() {
    let s = start().await;
    let src = s.dir.path().join("disk.raw");
    let data = write_test_disk(&src, 1);

    let last = AtomicU64::new(0);
    let prog = |done: u64, total: u64| {
        assert!(done <= total);
        last.store(done, Ordering::SeqCst);
    };
    let m = import_file(&s.client, &src, &opts("disk"), &prog).await.unwrap();
    assert_eq!(last.load(Ordering::SeqCst), data.len() as u64);
    assert_eq!(m.version, 1);
    assert_eq!(m.disk.size, data.len() as u64);
    assert_eq!(m.disk.chunks.len(), data.len().div_ceil(CS as usize));
    assert_eq!(m.disk.chunks[3], None);
    assert_eq!(m.disk.chunks[4], None);
    assert!(m.disk.chunks[5].is_some());
    assert_eq!(m.disk.chunks[6], m.disk.chunks[7]);
    // 3 random + half chunk + repeated (once) + tail.
    assert_eq!(s.chunk_files(), 6);

    let out = s.dir.path().join("out.raw");
    let em = export_image(&s.client, &r("disk"), &out, &no_progress()).await.unwrap();
    assert_eq!(em, m);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    qemu_img_compare(&src, &out);

    // The same file under another name stores no new chunk.
    let m2 = import_file(&s.client, &src, &opts("disk-copy"), &no_progress()).await.unwrap();
    assert_eq!(m2.disk.chunks, m.disk.chunks);
    assert_eq!(s.chunk_files(), 6);

    // Deleting one of them frees nothing; deleting both frees everything.
    assert_eq!(s.client.delete(&r("disk")).await.unwrap().chunks_freed, 0);
    assert_eq!(s.client.delete(&r("disk-copy")).await.unwrap().chunks_freed, 6);
    assert_eq!(s.chunk_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_import_and_format_errors() {
    let s = start().await;
    let raw = s.dir.path().join("src.raw");
    write_test_disk(&raw, 7);
    let qcow = s.dir.path().join("src.qcow2");
    let st = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow).status().unwrap();
    assert!(st.success());

    // qcow2 imported as raw: the clear error, and nothing stored.
    let e = import_file(&s.client, &qcow, &ImportOptions { format: Some(Format::Raw), ..opts("q") }, &no_progress()).await.unwrap_err();
    assert!(matches!(e, ImportError::Qcow2AsRaw { .. }));
    assert_eq!(e.to_string(), format!("{} is a qcow2 image; import it with --format qcow2", qcow.display()));
    // raw imported as qcow2 is refused too.
    let e = import_file(&s.client, &raw, &ImportOptions { format: Some(Format::Qcow2), ..opts("q") }, &no_progress()).await.unwrap_err();
    assert!(matches!(e, ImportError::NotQcow2 { .. }), "{e}");
    assert!(s.client.list().await.unwrap().is_empty());

    // Auto-detected qcow2 import: the export equals the raw source.
    let m = import_file(&s.client, &qcow, &opts("q"), &no_progress()).await.unwrap();
    // qcow2 rounds the virtual size up to whole 512-byte sectors, padding with zeroes.
    let raw_len = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(m.disk.size, raw_len.next_multiple_of(512));
    let out = s.dir.path().join("q.raw");
    export_image(&s.client, &r("q@1"), &out, &no_progress()).await.unwrap();
    qemu_img_compare(&raw, &out);
    let exported = std::fs::read(&out).unwrap();
    assert_eq!(&exported[..raw_len as usize], &std::fs::read(&raw).unwrap()[..]);
    assert!(exported[raw_len as usize..].iter().all(|&b| b == 0));

    // Importing the raw source too shares every chunk but the (unpadded) tail.
    let before = s.chunk_files();
    let mr = import_file(&s.client, &raw, &opts("r"), &no_progress()).await.unwrap();
    let n = mr.disk.chunks.len();
    assert_eq!(mr.disk.chunks[..n - 1], m.disk.chunks[..n - 1]);
    assert_ne!(mr.disk.chunks[n - 1], m.disk.chunks[n - 1]);
    assert_eq!(s.chunk_files(), before + 1);

    // A corrupt qcow2 (magic, garbage header) fails clearly, naming the file.
    let bad = s.dir.path().join("bad.qcow2");
    let mut f = std::fs::File::create(&bad).unwrap();
    f.write_all(b"QFI\xfb").unwrap();
    f.write_all(&[0xffu8; 1000]).unwrap();
    drop(f);
    let e = import_file(&s.client, &bad, &opts("bad"), &no_progress()).await.unwrap_err();
    assert!(matches!(e, ImportError::Convert { .. }), "{e}");
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
    assert!(s.client.manifest(&r("bad")).await.unwrap_err().is_not_found());

    // A truncated qcow2 (data clusters missing, which qemu would read as zeroes) is refused.
    let cut = s.dir.path().join("cut.qcow2");
    std::fs::copy(&qcow, &cut).unwrap();
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(len / 2).unwrap();
    let e = import_file(&s.client, &cut, &opts("cut"), &no_progress()).await.unwrap_err();
    assert!(matches!(e, ImportError::Convert { .. }), "{e}");
    assert!(e.to_string().contains("cut.qcow2") && e.to_string().contains("corrupt"), "{e}");
    assert!(s.client.manifest(&r("cut")).await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_boot_blobs_and_bad_inputs() {
    let s = start().await;
    let disk = s.dir.path().join("d.raw");
    write_test_disk(&disk, 20);
    let kernel = s.dir.path().join("vmlinuz");
    // Text-like (compressible) data, as a kernel's is in part.
    let words: Vec<Vec<u8>> =
        (0..400).map(|i| chunk_data(1000 + i, 3 + (i as usize % 7)).iter().map(|b| b'a' + b % 26).collect()).collect();
    let picks = chunk_data(32, 60_000);
    let text: Vec<u8> =
        picks.chunks(2).flat_map(|p| words[(p[0] as usize * 256 + p[1] as usize) % 400].iter().copied().chain([b' '])).collect();
    std::fs::write(&kernel, &text).unwrap();
    let initrd = s.dir.path().join("initrd");
    std::fs::write(&initrd, chunk_data(31, 5000)).unwrap();
    let o = ImportOptions {
        kernel: Some(kernel.clone()),
        initrd: Some(initrd.clone()),
        cmdline: "console=ttyS0".into(),
        os: "debian".into(),
        ..opts("k")
    };
    let m = import_file(&s.client, &disk, &o, &no_progress()).await.unwrap();
    let Boot::Kernel { kernel: kb, initrd: Some(ib), cmdline } = &m.meta.boot else { panic!("{:?}", m.meta.boot) };
    assert_eq!(cmdline, "console=ttyS0");
    let kout = s.dir.path().join("k.out");
    export_blob(&s.client, "k", kb, m.chunk_size, &kout, &no_progress()).await.unwrap();
    assert_eq!(std::fs::read(&kout).unwrap(), std::fs::read(&kernel).unwrap());
    let iout = s.dir.path().join("i.out");
    export_blob(&s.client, "k", ib, m.chunk_size, &iout, &no_progress()).await.unwrap();
    assert_eq!(std::fs::read(&iout).unwrap(), std::fs::read(&initrd).unwrap());
    // Boot files that compress are stored compressed harder than a disk's chunks (every first
    // boot fetches them whole); those that do not (an initrd is compressed inside) as usual.
    let cs = m.chunk_size as usize;
    for (i, h) in kb.chunks.iter().enumerate() {
        let plain = &text[i * cs..((i + 1) * cs).min(text.len())];
        let (h2, fast) = codec::encode(plain);
        assert_eq!(Some(h2), *h);
        let stored = std::fs::metadata(s.chunk_file(&h2)).unwrap().len() as usize;
        assert!(stored < fast.len(), "kernel chunk {i}: {stored} bytes stored, {} at the disk's level", fast.len());
    }
    let (h, fast) = codec::encode(&std::fs::read(&initrd).unwrap());
    assert_eq!(ib.chunks, vec![Some(h)]);
    assert_eq!(std::fs::read(s.chunk_file(&h)).unwrap(), fast);

    // Unreadable / absent files are named.
    let ghost = s.dir.path().join("nope.raw");
    let e = import_file(&s.client, &ghost, &opts("g"), &no_progress()).await.unwrap_err();
    assert!(e.to_string().contains("nope.raw"), "{e}");
    let e = import_file(&s.client, &disk, &ImportOptions { kernel: Some(ghost.clone()), ..opts("g") }, &no_progress()).await.unwrap_err();
    assert!(e.to_string().contains("nope.raw"), "{e}");
    let e = import_file(&s.client, s.dir.path(), &opts("g"), &no_progress()).await.unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
    // Bad name and chunk size are refused before anything is uploaded.
    let e = import_file(&s.client, &disk, &opts("../x"), &no_progress()).await.unwrap_err();
    assert!(matches!(e, ImportError::Options { .. }), "{e}");
    let e = import_file(&s.client, &disk, &ImportOptions { chunk_size: 5000, ..opts("x") }, &no_progress()).await.unwrap_err();
    assert!(e.to_string().contains("5000"), "{e}");
    assert_eq!(s.client.list().await.unwrap().len(), 1);

    // Export of an unknown image names it and leaves no file behind.
    let dest = s.dir.path().join("never");
    let e = export_image(&s.client, &r("ghost"), &dest, &no_progress()).await.unwrap_err();
    assert!(e.to_string().contains("ghost"), "{e}");
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_stops_on_corrupt_chunk_and_leaves_no_file() {
    let s = start().await;
    let src = s.dir.path().join("c.raw");
    write_test_disk(&src, 40);
    let m = import_file(&s.client, &src, &opts("c"), &no_progress()).await.unwrap();
    let h = m.disk.chunks[1].unwrap();
    std::fs::write(s.chunk_file(&h), b"rotten").unwrap();
    let dest = s.dir.path().join("c.out");
    let e = export_image(&s.client, &r("c"), &dest, &no_progress()).await.unwrap_err();
    assert!(e.to_string().contains(&h.to_hex()), "{e}");
    assert!(!dest.exists());
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_import_and_delete_of_sharing_image() {
    let s = start().await;
    let a = s.dir.path().join("a.raw");
    let data = write_test_disk(&a, 50);
    // "b" = the same content as "a" plus more, so most of its chunks dedup against "a".
    let b = s.dir.path().join("b.raw");
    let mut bd = data.clone();
    bd.extend(chunk_data(99, 5 * CS as usize));
    std::fs::write(&b, &bd).unwrap();
    for round in 0..3 {
        import_file(&s.client, &a, &opts("a"), &no_progress()).await.unwrap();
        let name = format!("b{round}");
        let (o, np, ra) = (opts(&name), no_progress(), r("a"));
        let (imp, del) = tokio::join!(import_file(&s.client, &b, &o, &np), s.client.delete(&ra));
        del.unwrap();
        imp.unwrap();
        let out = s.dir.path().join(format!("{name}.out"));
        export_image(&s.client, &r(&name), &out, &no_progress()).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bd, "round {round}");
    }
}

/// Unmounts (lazily) on drop, even when the test fails.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_space_names_the_image_and_stores_nothing_visible() {
    // A real full filesystem: a 256 KiB tmpfs under the data dir (needs CAP_SYS_ADMIN).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let out = Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"]).arg(&data).output().unwrap();
    assert!(out.status.success(), "this test needs to mount a tmpfs (run as root): {}", String::from_utf8_lossy(&out.stderr));
    let _m = Mount(data.clone());
    let s = start_full(dir, &data, |st| st).await;
    let src = s.dir.path().join("big.raw");
    std::fs::write(&src, chunk_data(77, 2 * 1024 * 1024)).unwrap();
    let e = import_file(&s.client, &src, &opts("big"), &no_progress()).await.unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, ImportError::Upload { .. }), "{msg}");
    assert!(msg.contains("image big") && msg.contains("out of space"), "{msg}");
    assert!(s.client.list().await.unwrap().is_empty());
    assert!(s.client.manifest(&r("big")).await.unwrap_err().is_not_found());
    // The aborted session's chunks are garbage now.
    s.store.gc().await.unwrap();
    assert_eq!(s.chunk_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_file_holes_become_zero_chunks() {
    use std::os::unix::fs::FileExt;
    let s = start().await;
    let src = s.dir.path().join("sparse.raw");
    let size: u64 = 256 * 1024 * 1024 + 4096 + 3;
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    // Data straddling a chunk boundary, data in the middle of a hole, data at the very end.
    f.write_all_at(&chunk_data(1, 10_000), CS as u64 * 10 - 5000).unwrap();
    f.write_all_at(&chunk_data(2, 100), 100 * 1024 * 1024 + 12345).unwrap();
    f.write_all_at(&chunk_data(3, 7), size - 7).unwrap();
    drop(f);
    let m = import_file(&s.client, &src, &opts("sparse"), &no_progress()).await.unwrap();
    assert_eq!(m.disk.size, size);
    let stored: Vec<usize> = m.disk.chunks.iter().enumerate().filter(|(_, c)| c.is_some()).map(|(i, _)| i).collect();
    let last = m.disk.chunks.len() - 1;
    assert_eq!(stored, vec![9, 10, (100 * 1024 * 1024 + 12345) / CS as usize, last]);
    let out = s.dir.path().join("sparse.out");
    export_image(&s.client, &r("sparse"), &out, &no_progress()).await.unwrap();
    qemu_img_compare(&src, &out);
    // The export is sparse too: far fewer blocks allocated than its length.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), size);
    assert!(meta.blocks() * 512 < size / 4, "export not sparse: {} blocks", meta.blocks());
}
