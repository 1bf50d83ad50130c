//! The cloud-init NoCloud seed of a VM: a small FAT volume labelled `CIDATA` holding
//! `meta-data`, `user-data` and `network-config`, written into the runtime directory before
//! QEMU starts and attached read-only as the guest's last virtio disk. It is made from the VM's
//! configuration alone and byte for byte the same on every host (fixed volume id, no
//! timestamps), so a migrated or resumed VM finds the same disk it booted with.

use std::io::{Cursor, Write};
use std::path::Path;

use vgrid_api::cloudinit::CloudInit;

/// Size of the seed volume: FAT12, room for the largest user-data.
const SEED_BYTES: usize = 1024 * 1024;
/// The volume id (`vgrd`): any fixed value keeps the volume identical everywhere.
const VOLUME_ID: u32 = 0x7667_7264;

/// The guest's side of staging (`vm run --stage-in/--stage-out`) on a cloud-init guest: a
/// boothook that copies the inputs in and installs the unit that copies the outputs out at
/// shutdown (see the script).
const STAGE_BOOTHOOK: &str = include_str!("stage-boothook.sh");

/// Whether VM `spec` has a staging volume (read-write, serial `vgrid-stage`): its seed's
/// user-data then carries [`STAGE_BOOTHOOK`].
pub fn has_staging(spec: &crate::spec::VmSpec) -> bool {
    spec.volumes().any(|(_, a, _)| !a.readonly && a.serial.as_deref() == Some(vgrid_api::volume::STAGE_SERIAL))
}

/// The files of VM `id`'s seed, in the order they are written; `staging`: the VM has a staging
/// volume ([`has_staging`]).
pub fn seed_files(id: &str, c: &CloudInit, staging: bool) -> Vec<(&'static str, String)> {
    let mut meta = format!("instance-id: vgrid-{id}\n");
    if let Some(h) = &c.hostname {
        meta.push_str(&format!("local-hostname: {h}\n"));
    }
    // The data source gives these to the image's default user whatever the user-data says.
    if !c.ssh_keys.is_empty() {
        meta.push_str("public-keys:\n");
        for k in &c.ssh_keys {
            meta.push_str(&format!("  - {}\n", yaml_string(k)));
        }
    }
    let mut user = match &c.user_data {
        Some(u) => u.clone(),
        None => default_user_data(c),
    };
    if staging {
        user = with_staging(&user);
    }
    vec![("meta-data", meta), ("user-data", user), ("network-config", NETWORK_CONFIG.to_string())]
}

/// `user` (any user-data: `#cloud-config`, a script, a MIME multipart, ...) and the staging
/// boothook as one MIME multipart: the user's part unchanged (a MIME message as a nested part,
/// anything else as `text/plain`, whose type cloud-init finds from its first line as it does
/// for a whole user-data), then a `text/cloud-boothook` part. No key of the user's
/// cloud-config is touched (the boothook is a part of its own), and the bytes are the same on
/// every host (a fixed boundary that occurs in neither part).
fn with_staging(user: &str) -> String {
    let mut boundary = String::from("vgrid-stage-part");
    while user.contains(&boundary) {
        boundary.push('x');
    }
    let head = user.get(..user.len().min(300)).unwrap_or(user).to_ascii_lowercase();
    let user_part = if head.starts_with("content-type:") || head.starts_with("mime-version:") {
        user.trim_end().to_string()
    } else {
        part("text/plain", "user-data", user)
    };
    let b = &boundary;
    format!(
        "Content-Type: multipart/mixed; boundary=\"{b}\"\nMIME-Version: 1.0\n\n--{b}\n{user_part}\n--{b}\n{}\n--{b}--\n",
        part("text/cloud-boothook", "vgrid-stage", STAGE_BOOTHOOK)
    )
}

/// One MIME part: headers, then `body` in base64 (lines of 76).
fn part(ctype: &str, name: &str, body: &str) -> String {
    let b64 = base64(body.as_bytes());
    let lines: Vec<&str> = b64.as_bytes().chunks(76).map(|l| std::str::from_utf8(l).expect("base64 is ASCII")).collect();
    format!(
        "Content-Type: {ctype}; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"{name}\"\n\n{}",
        lines.join("\n")
    )
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { A[(n >> shift & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// vgrid's user-data when the request gives none: root may log in with the keys too (a
/// stock image locks root and tells ssh users to log in as its default user instead).
fn default_user_data(c: &CloudInit) -> String {
    let mut u = String::from("#cloud-config\n# written by vgrid: root takes the VM's ssh keys as well\ndisable_root: false\n");
    if !c.ssh_keys.is_empty() {
        u.push_str("ssh_authorized_keys:\n");
        for k in &c.ssh_keys {
            u.push_str(&format!("  - {}\n", yaml_string(k)));
        }
    }
    u
}

/// DHCP on every Ethernet interface: user-mode and site networks both answer it.
const NETWORK_CONFIG: &str = "version: 2\nethernets:\n  all-en:\n    match:\n      name: \"e*\"\n    dhcp4: true\n";

/// `s` as a double-quoted YAML scalar (key comments may hold any character).
fn yaml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The seed volume's bytes.
pub fn seed_image(id: &str, c: &CloudInit, staging: bool) -> std::io::Result<Vec<u8>> {
    let mut disk = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     ").volume_id(VOLUME_ID))?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        for (name, text) in seed_files(id, c, staging) {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(text.as_bytes())?;
            f.flush()?;
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// Writes VM `id`'s seed to `path`, replacing what was there without following a link (the
/// runtime directory may have been QEMU's user's before).
pub fn write_seed(path: &Path, id: &str, c: &CloudInit, staging: bool) -> std::io::Result<()> {
    crate::qemu_user::replace_file(path, &seed_image(id, c, staging)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn data() -> CloudInit {
        CloudInit {
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq8 alice \"home\"".into()],
            hostname: Some("web-1".into()),
            user_data: None,
        }
    }

    #[test]
    fn the_seed_is_a_cidata_volume_with_the_three_files_and_the_same_everywhere() {
        let img = seed_image("vm-1234", &data(), false).unwrap();
        assert_eq!(img, seed_image("vm-1234", &data(), false).unwrap(), "two hosts make the same bytes");
        assert_ne!(img, seed_image("vm-5678", &data(), false).unwrap());
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let read = |name: &str| {
            let mut s = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut s).unwrap();
            s
        };
        let meta = read("meta-data");
        assert!(meta.starts_with("instance-id: vgrid-vm-1234\nlocal-hostname: web-1\npublic-keys:\n"), "{meta}");
        assert!(meta.contains(r#"  - "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq8 alice \"home\"""#), "{meta}");
        let user = read("user-data");
        assert!(user.starts_with("#cloud-config\n") && user.contains("disable_root: false"), "{user}");
        assert!(read("network-config").contains("dhcp4: true"));
    }

    #[test]
    fn given_user_data_is_kept_as_is() {
        let c = CloudInit { user_data: Some("#!/bin/sh\necho hi\n".into()), ..data() };
        let files = seed_files("vm-1", &c, false);
        assert_eq!(files[1], ("user-data", "#!/bin/sh\necho hi\n".to_string()));
        assert!(files[0].1.contains("public-keys:"), "keys still reach the default user");
    }
}

#[cfg(test)]
mod staging_tests {
    use super::*;

    #[test]
    fn base64_is_the_standard_one() {
        for (plain, coded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
        }
    }

    /// With a staging volume the user's user-data (of any kind) is one part, unchanged, and the
    /// boothook another; the same bytes on every host; without one, the user-data as given.
    #[test]
    fn staging_adds_the_boothook_as_a_part_of_its_own() {
        let c = CloudInit { user_data: Some("#cloud-config\nruncmd:\n  - [touch, /x]\n".into()), ..Default::default() };
        assert_eq!(seed_files("vm-1", &c, false)[1].1, "#cloud-config\nruncmd:\n  - [touch, /x]\n");
        let u = seed_files("vm-1", &c, true)[1].1.clone();
        assert_eq!(u, seed_files("vm-1", &c, true)[1].1, "deterministic");
        assert!(u.starts_with("Content-Type: multipart/mixed; boundary=\"vgrid-stage-part\"\n"), "{u}");
        let parts: Vec<&str> = u.split("\n--vgrid-stage-part").collect();
        assert_eq!(parts.len(), 4, "preamble, two parts, the end: {u}");
        assert!(parts[1].contains("Content-Type: text/plain") && parts[1].contains(&base64(c.user_data.as_ref().unwrap().as_bytes())));
        assert!(parts[2].contains("Content-Type: text/cloud-boothook") && parts[2].contains("filename=\"vgrid-stage\""));
        assert!(parts[2].contains(&base64(STAGE_BOOTHOOK.as_bytes())[..76]));
        assert_eq!(parts[3], "--\n");
        // A MIME user-data is nested as it is; a boundary it uses is not reused.
        let mime = "Content-Type: multipart/mixed; boundary=\"vgrid-stage-part\"\nMIME-Version: 1.0\n\n--vgrid-stage-part\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--vgrid-stage-part--\n";
        let u = with_staging(mime);
        assert!(u.starts_with("Content-Type: multipart/mixed; boundary=\"vgrid-stage-partx\"\n"), "{u}");
        assert!(u.contains(&format!("--vgrid-stage-partx\n{}\n--vgrid-stage-partx\n", mime.trim_end())), "{u}");
        // No cloud-init data given: vgrid's default user-data is the first part.
        let d = seed_files("vm-1", &CloudInit::default(), true)[1].1.clone();
        assert!(d.contains(&base64(default_user_data(&CloudInit::default()).as_bytes())[..76]), "{d}");
    }
}
