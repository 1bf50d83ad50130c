//! Images on S3 (issue 16, items 3-4): image servers with `--store s3://BUCKET/PREFIX` on a real
//! S3 server (SeaweedFS on loopback, `tests/common/s3.rs`). Two image servers share one bucket:
//! an image imported through one boots a real guest through the other; a collection on one
//! during an import on the other loses nothing; the S3 server stopped for 10 s makes requests
//! fail with an error naming it, and everything works again once it is back. (The pins-and-
//! lease protocol itself, interleaving by interleaving, is unit-tested in
//! `crates/imagestore/src/store/tests.rs`.)

mod common;
use common::grid::import_sample_at;
use common::s3::S3Server;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn image_server(dir: &Path, name: &str, coordinator: &str, s3: &S3Server, prefix: &str) -> Role {
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store = format!("s3://{}/{prefix}", s3.bucket);
    let data = dir.join(name);
    Role::start_env(
        &[
            "image-server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--coordinator",
            coordinator,
            "--name",
            name,
            "--store",
            &store,
        ],
        dir.join(format!("{name}.log")),
        &env,
    )
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `vgrid image export IMAGE` through `server`, compared with `disk` by qemu-img.
fn exported_equals(coordinator: &str, server: &str, image: &str, disk: &Path, dir: &Path) {
    let out = dir.join(format!("{image}.raw"));
    let _ = std::fs::remove_file(&out);
    ok(&cli_at(coordinator, &["image", "export", image, out.to_str().unwrap(), "--image-server", server]), "image export");
    let o = Command::new("qemu-img").args(["compare", "-q"]).arg(&out).arg(disk).output().unwrap();
    assert!(o.status.success(), "image {image} read back through {server} differs from its source: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn two_image_servers_on_one_bucket_import_boot_collect_and_ride_out_an_outage() {
    let g = sample_guest().unwrap();
    let mut s3 = S3Server::start("vgrid");
    let dir = tempfile::Builder::new().prefix("vgs3t").tempdir_in("/tmp").unwrap();
    let coord = Role::coordinator("127.0.0.1:0", &dir.path().join("coord"), 3, dir.path().join("coord.log"));
    let mut a = image_server(dir.path(), "a", &coord.url, &s3, "grid");
    let b = image_server(dir.path(), "b", &coord.url, &s3, "grid");
    // Each checked at start that the bucket honours conditional creates, and says where it keeps images.
    let a_log = std::fs::read_to_string(&a.log).unwrap();
    assert!(!a_log.contains("cannot be used"), "{a_log}");

    // Imported through a: the chunks land in the bucket, b lists the image too.
    import_sample_at(&coord.url, &a.url);
    let listed = ok(&cli_at(&coord.url, &["--json", "image", "ls", "--image-server", &b.url]), "image ls on b");
    assert!(listed.contains("\"sample\""), "b does not list the image imported through a: {listed}");

    // a is gone; a host boots the image from b alone.
    a.kill();
    let host_dir = dir.path().join("h1");
    let _h1 = Role::start(
        &["host", "--coordinator", &coord.url, "--listen", "127.0.0.1:0", "--name", "h1", "--data-dir", host_dir.to_str().unwrap()],
        dir.path().join("h1.log"),
    );
    let t0 = Instant::now();
    while json_at(&coord.url, &["host", "ls"]).as_array().map(|v| v.len()) != Some(1) {
        assert!(t0.elapsed() < Duration::from_secs(60), "h1 did not register");
        std::thread::sleep(Duration::from_millis(200));
    }
    {
        let _slot = boot_slot().unwrap();
        let mut booted = false;
        let mut last = String::new();
        for name in ["s3vm", "s3vm-retry"] {
            let o = cli_at(&coord.url, &["vm", "run", "sample", "--name", name, "--wait-for", BOOTED_MARKER, "--timeout", "120"]);
            let _ = cli_at(&coord.url, &["vm", "rm", "--force", name]);
            if o.status.success() {
                booted = true;
                break;
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
        }
        assert!(booted, "the guest did not boot from b twice: {last}");
    }

    // a again (same name and certificates); it collects (`image rm`) while b imports a copy
    // whose chunks are the ones being freed.
    a = image_server(dir.path(), "a", &coord.url, &s3, "grid");
    let disk = g.disk.clone();
    let (curl, burl) = (coord.url.clone(), b.url.clone());
    let import =
        std::thread::spawn(move || cli_at(&curl, &["image", "import", disk.to_str().unwrap(), "--name", "copy", "--image-server", &burl]));
    ok(&cli_at(&coord.url, &["image", "rm", "sample", "--image-server", &a.url]), "image rm on a");
    ok(&import.join().unwrap(), "import of the copy through b");
    exported_equals(&coord.url, &a.url, "copy", &g.disk, dir.path());

    // The S3 server is down for 10 s: a request fails with an error naming the image store
    // and the S3 endpoint, and the server keeps running.
    s3.kill();
    let t0 = Instant::now();
    let o = cli_at(&coord.url, &["image", "show", "copy", "--image-server", &b.url]);
    assert!(!o.status.success(), "image show succeeded with S3 down");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("image store") && err.contains(&s3.endpoint().replace("http://", "")), "unclear error with S3 down: {err}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(t0.elapsed()));
    s3.restart();
    // Back: the same servers answer again, and the data is intact.
    let t0 = Instant::now();
    loop {
        let o = cli_at(&coord.url, &["image", "show", "copy", "--image-server", &b.url]);
        if o.status.success() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "b did not recover after S3 came back: {}", String::from_utf8_lossy(&o.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
    exported_equals(&coord.url, &b.url, "copy", &g.disk, dir.path());
}

#[test]
fn an_image_server_refuses_a_bucket_it_cannot_reach_with_a_clear_error() {
    let s3 = S3Server::start("vgrid");
    let dir = tempfile::tempdir().unwrap();
    let mut env = s3.env();
    for (k, v) in env.iter_mut() {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "wrong-secret".into();
        }
    }
    let o = Command::new(vgrid_bin())
        .args(["image-server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--store", "s3://vgrid/x"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("opening the image store") && err.contains("s3://vgrid/x"), "{err}");
    // A malformed location is refused before anything is contacted.
    let o = Command::new(vgrid_bin()).args(["image-server", "--store", "s3://Bad_Bucket/x"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an S3 bucket name"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A volume version with no data (its chunks all zero).
fn volume_manifest(name: &str) -> vgrid_api::Manifest {
    vgrid_api::Manifest {
        schema: 1,
        name: name.into(),
        version: 0,
        created: 0,
        chunk_size: 4096,
        disk: vgrid_api::Blob { size: 8192, chunks: vec![None, None] },
        meta: vgrid_api::ImageMeta {
            os: String::new(),
            arch: "x86_64".into(),
            boot: vgrid_api::Boot::Firmware,
            volume: Some(vgrid_api::volume::VolumeMeta::default()),
        },
        parent: None,
        state: None,
    }
}

/// Issue 15's fencing on a real S3 server: two image servers' stores on one bucket, a holder
/// of epoch k committing volume `race` through one while the other raises the epoch to k+1,
/// 100 times, the raise starting a little later each round. Once a raise has returned, the
/// versions listed then are final: a commit answered with success is among them, any other was
/// refused as fenced, and nothing lands afterwards (the commit reserves its version with a
/// conditional write of the epoch object, `If-Match`, and a raise seals a reserved version
/// whose manifest has not landed).
#[test]
fn a_stale_commit_never_lands_after_the_epoch_raise_on_s3() {
    use vgrid_imagestore::shared::S3Location;
    use vgrid_imagestore::{ImageStore, StoreError};
    let s3 = S3Server::start("vgrid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        let mut at: S3Location = format!("s3://{}/fence", s3.bucket).parse().unwrap();
        at.endpoint = Some(s3.endpoint());
        for (k, v) in s3.env() {
            std::env::set_var(k, v);
        }
        let stale = std::sync::Arc::new(ImageStore::open_s3(&at, "a").await.unwrap());
        let raiser = std::sync::Arc::new(ImageStore::open_s3(&at, "b").await.unwrap());
        // The server honours If-Match (a conditional update with a stale e-tag is refused).
        let (probe, put) = (object_store::path::Path::from("fence/probe"), object_store::PutPayload::from_static(b"1"));
        let first = stale.objects().put(&probe, put.clone()).await.unwrap();
        let stale_tag = object_store::UpdateVersion { e_tag: Some("\"0123\"".into()), version: None };
        let update = |v| object_store::PutOptions { mode: object_store::PutMode::Update(v), ..Default::default() };
        let refused = stale.objects().put_opts(&probe, put.clone(), update(stale_tag)).await;
        assert!(matches!(refused, Err(object_store::Error::Precondition { .. })), "{refused:?}");
        let current = object_store::UpdateVersion { e_tag: first.e_tag, version: first.version };
        stale.objects().put_opts(&probe, put, update(current)).await.unwrap();
        stale.put_manifest(volume_manifest("race")).await.unwrap();
        let (mut landed, mut refused) = (0, 0);
        for k in 1..=100u64 {
            assert_eq!(raiser.raise_epoch("race", k).await.unwrap(), k);
            let s = stale.clone();
            let commit = tokio::spawn(async move {
                let id = s.begin_upload();
                s.commit_fenced(&id, volume_manifest("race"), Some(k)).await
            });
            let r = raiser.clone();
            let raise = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(k % 10 * 1500)).await;
                assert_eq!(r.raise_epoch("race", k + 1).await.unwrap(), k + 1);
                r.versions("race").await.unwrap()
            });
            let at_raise = raise.await.unwrap();
            let committed = commit.await.unwrap();
            assert_eq!(
                raiser.versions("race").await.unwrap(),
                at_raise,
                "round {k}: a version appeared after the raise returned ({committed:?})"
            );
            match committed {
                Ok(m) => {
                    assert!(at_raise.contains(&m.version), "round {k}: commit answered version {} but it is not listed", m.version);
                    landed += 1;
                }
                Err(StoreError::Fenced { epoch, current, .. }) => {
                    assert_eq!((epoch, current), (k, k + 1), "round {k}");
                    refused += 1;
                }
                Err(e) => panic!("round {k}: the commit failed otherwise: {e}"),
            }
        }
        eprintln!("on S3: {landed} stale commits landed before the raise returned, {refused} refused");
        assert_eq!(landed + refused, 100);
    });
}
