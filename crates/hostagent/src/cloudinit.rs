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

/// The files of VM `id`'s seed, in the order they are written.
pub fn seed_files(id: &str, c: &CloudInit) -> Vec<(&'static str, String)> {
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
    let user = match &c.user_data {
        Some(u) => u.clone(),
        None => default_user_data(c),
    };
    vec![("meta-data", meta), ("user-data", user), ("network-config", NETWORK_CONFIG.to_string())]
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
pub fn seed_image(id: &str, c: &CloudInit) -> std::io::Result<Vec<u8>> {
    let mut disk = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     ").volume_id(VOLUME_ID))?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        for (name, text) in seed_files(id, c) {
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
pub fn write_seed(path: &Path, id: &str, c: &CloudInit) -> std::io::Result<()> {
    crate::qemu_user::replace_file(path, &seed_image(id, c)?)
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
        let img = seed_image("vm-1234", &data()).unwrap();
        assert_eq!(img, seed_image("vm-1234", &data()).unwrap(), "two hosts make the same bytes");
        assert_ne!(img, seed_image("vm-5678", &data()).unwrap());
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
        let files = seed_files("vm-1", &c);
        assert_eq!(files[1], ("user-data", "#!/bin/sh\necho hi\n".to_string()));
        assert!(files[0].1.contains("public-keys:"), "keys still reach the default user");
    }
}
