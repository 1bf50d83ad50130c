//! Arbitrary bytes as a manifest: decoding never panics, whatever decodes is valid, and it
//! survives a round trip unchanged. Image references are parsed the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vgrid_api::{ImageRef, Manifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_json(data) {
        m.validate().expect("from_json returned an invalid manifest");
        let again = serde_json::to_vec(&m).expect("a manifest serialises");
        let back = Manifest::from_json(&again).expect("a valid manifest decodes again");
        assert_eq!(back, m);
        // Chunk arithmetic on accepted manifests stays in range.
        for i in 0..m.disk.chunks.len() {
            assert!(m.disk.chunk_len(m.chunk_size, i) <= m.chunk_size);
        }
        let _ = m.all_chunks().count();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(r) = s.parse::<ImageRef>() {
            let shown = r.to_string();
            assert_eq!(shown.parse::<ImageRef>().expect("a shown reference parses"), r);
        }
    }
});
