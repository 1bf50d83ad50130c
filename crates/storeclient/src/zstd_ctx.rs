//! zstd with one compression and one decompression context per thread, made once. Chunks and
//! their ranges compressed or decompressed in one call go through these (whole chunks in
//! [`crate::codec`], ranges in [`crate::tree`]); the output is the same as `zstd::bulk`'s.

thread_local! {
    /// This thread's zstd contexts, made once: creating them per call (what `zstd::bulk`'s free
    /// functions do) cost more than the work itself for a ranged read's few KiB, and it is paid
    /// on every chunk miss on both ends (perf of 4 KiB range fetches: `ZSTD_createDCtx` and
    /// `ZSTD_createCCtx` with the page faults of their fresh tables, ~5% of the CPU).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// zstd of `data` at `level`, with this thread's compression context. The output is the
/// same as `zstd::bulk::compress`'s.
pub fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match c.as_mut() {
            Some(c) => {
                c.set_compression_level(level)?;
                c
            }
            None => c.insert(zstd::bulk::Compressor::new(level)?),
        };
        c.compress(data)
    })
}

/// Decompresses one zstd frame of at most `capacity` plain bytes (more is an error), with this
/// thread's decompression context.
pub fn decompress_bounded(z: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let d = match d.as_mut() {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(z, capacity)
    })
}
