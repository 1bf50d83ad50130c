//! Importing disk image files into an image server, and exporting images back to files.
//!
//! Import reads the file in chunk-size pieces on a reader thread, hashes and compresses them on
//! a small worker pool, asks the server in batches which chunks it lacks (pinning the others in
//! the upload session), uploads only those, and finally commits the manifest: until the commit
//! nothing is visible, and an interrupted import leaves only orphan chunks for the next GC.
//! All-zero chunks are never uploaded. qcow2 files are streamed as raw through
//! `nbdcopy -- [ qemu-nbd -r -f qcow2 FILE ] -`.
//!
//! Export writes a sparse raw file (zero chunks stay holes) from verified chunks, under a
//! temporary name that is renamed into place only when complete.

use crate::client::{ClientError, StoreClient, UploadId};
use crate::codec;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use tracing::Instrument;
use vgrid_api::manifest::validate_name;
use vgrid_api::{Blob, Boot, ChunkHash, ImageMeta, ImageRef, Manifest, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// How many chunk hashes one "which are missing?" request carries.
const MISSING_BATCH: usize = 64;
/// Concurrent chunk uploads (per batch) / downloads.
const TRANSFERS: usize = 4;
/// Batches being checked/uploaded at once, so reading and compressing go on meanwhile.
const BATCHES_IN_FLIGHT: usize = 2;

/// Format of a disk image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown image format {s:?}: use raw or qcow2")),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// What to import and how to describe it.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Image name; the server assigns the next version.
    pub name: String,
    /// `None`: detect (qcow2 by its magic, raw otherwise).
    pub format: Option<Format>,
    pub chunk_size: u32,
    /// Direct kernel boot: kernel (and optional initrd) files stored in the same manifest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub os: String,
    pub arch: String,
    /// Import as a volume (the user's data) instead of an image.
    pub volume: Option<vgrid_api::volume::VolumeMeta>,
}

impl ImportOptions {
    /// Defaults: detected format, [`DEFAULT_CHUNK_SIZE`], firmware boot, x86_64.
    pub fn new(name: impl Into<String>) -> Self {
        ImportOptions {
            name: name.into(),
            format: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            os: String::new(),
            arch: "x86_64".into(),
            volume: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {what}: {source}")]
    File {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a qcow2 image; import it with --format qcow2")]
    Qcow2AsRaw { path: PathBuf },
    #[error("{path} is not a qcow2 image (it lacks the QFI\\xfb magic); import it with --format raw")]
    NotQcow2 { path: PathBuf },
    #[error("{path}: ended after {got} bytes, expected {expected}")]
    ShortRead { path: PathBuf, got: u64, expected: u64 },
    #[error("{path}: reading the qcow2 image with `{command}` failed: {cause}")]
    Convert {
        path: PathBuf,
        command: String,
        #[source]
        cause: ConvertFailure,
    },
    /// `cause` stays text: an invalid name's error (`ManifestError::BadName`) is nothing but its
    /// text, like the other option checks' messages.
    #[error("image {image}: {cause}")]
    Options { image: String, cause: String },
    #[error("image {image}: upload failed, nothing was stored: {source}")]
    Upload {
        image: String,
        #[source]
        source: ClientError,
    },
    #[error("image {image}: download failed: {source}")]
    Download {
        image: String,
        #[source]
        source: ClientError,
    },
    #[error("image {image}: writing {path} failed: {source}")]
    Write {
        image: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why reading a qcow2 image through `qemu-img` or `nbdcopy` failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertFailure {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the converter to exit failed.
    #[error("{0}")]
    Wait(#[source] std::io::Error),
    #[error("unreadable output: {0}")]
    Output(#[source] serde_json::Error),
    /// What the tool said (its diagnostic, its exit status) or what is wrong with its output.
    #[error("{0}")]
    Said(String),
}

/// Progress callback: `(bytes done, bytes total)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

fn file_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ImportError + 'a {
    move |source| ImportError::File { path: path.to_path_buf(), what, source }
}

/// Detects the format of `path` from its first bytes.
pub fn detect_format(path: &Path) -> Result<Format, ImportError> {
    let mut f = File::open(path).map_err(file_err(path, "cannot open"))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f.read(&mut magic[got..]).map_err(file_err(path, "cannot read"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(if got == 4 && magic == QCOW2_MAGIC { Format::Qcow2 } else { Format::Raw })
}

/// A source of a blob's bytes: a file, or the raw stream of a qcow2 image.
struct Source {
    path: PathBuf,
    input: Input,
    size: u64,
    /// The converter process of a qcow2 source, and its captured stderr.
    child: Option<(Child, String, std::thread::JoinHandle<String>)>,
}

fn open_raw(path: &Path) -> Result<Source, ImportError> {
    let mut f = File::open(path).map_err(file_err(path, "cannot open"))?;
    let meta = f.metadata().map_err(file_err(path, "cannot stat"))?;
    if meta.is_dir() {
        return Err(ImportError::File { path: path.into(), what: "cannot import", source: std::io::Error::other("is a directory") });
    }
    // Works for block devices too, whose metadata length is 0.
    let size = f.seek(SeekFrom::End(0)).map_err(file_err(path, "cannot seek"))?;
    f.seek(SeekFrom::Start(0)).map_err(file_err(path, "cannot seek"))?;
    Ok(Source { path: path.into(), input: Input::File { file: f, data_from: 0 }, size, child: None })
}

fn qcow2_virtual_size(path: &Path) -> Result<u64, ImportError> {
    let command = format!("qemu-img info --output=json -f qcow2 {}", path.display());
    let err = |cause| ImportError::Convert { path: path.into(), command: command.clone(), cause };
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| err(ConvertFailure::Spawn { program: "qemu-img", source }))?;
    if !out.status.success() {
        return Err(err(ConvertFailure::Said(String::from_utf8_lossy(&out.stderr).trim().to_string())));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| err(ConvertFailure::Output(e)))?;
    v.get("virtual-size").and_then(|s| s.as_u64()).ok_or_else(|| err(ConvertFailure::Said("no virtual-size in its output".into())))
}

/// Runs `qemu-img check`: a qcow2 file with corrupt metadata (a truncated copy, say) would
/// otherwise read as zeroes where its data is missing.
fn qcow2_check(path: &Path) -> Result<(), ImportError> {
    let command = format!("qemu-img check --output=json -f qcow2 {}", path.display());
    let err = |cause| ImportError::Convert { path: path.into(), command: command.clone(), cause };
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| err(ConvertFailure::Spawn { program: "qemu-img", source }))?;
    let report: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let count = |k: &str| report.as_ref().and_then(|r| r.get(k)).and_then(|v| v.as_u64()).unwrap_or(0);
    match out.status.code() {
        Some(0) => Ok(()),
        // Leaked clusters only: wasted space, the data is intact.
        Some(3) => {
            tracing::warn!(path = %path.display(), leaks = count("leaks"), "qcow2 image has leaked clusters; importing anyway");
            Ok(())
        }
        Some(2) => Err(err(ConvertFailure::Said(format!(
            "the qcow2 image is corrupt ({} corruptions, {} check errors); repair it with `qemu-img check -r all` or convert it again",
            count("corruptions"),
            count("check-errors")
        )))),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("no diagnostic").trim().to_string();
            Err(err(ConvertFailure::Said(format!("{} ({first})", out.status))))
        }
    }
}

fn open_qcow2(path: &Path) -> Result<Source, ImportError> {
    // Fail early and clearly on unreadable files.
    File::open(path).map_err(file_err(path, "cannot open"))?;
    let size = qcow2_virtual_size(path)?;
    qcow2_check(path)?;
    let abs = std::fs::canonicalize(path).map_err(file_err(path, "cannot resolve"))?;
    let command = format!("nbdcopy -- [ qemu-nbd -r -f qcow2 {} ] -", abs.display());
    let mut child = Command::new("nbdcopy")
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2"])
        .arg(&abs)
        .args(["]", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImportError::Convert {
            path: path.into(),
            command: command.clone(),
            cause: ConvertFailure::Spawn { program: "nbdcopy", source },
        })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    Ok(Source {
        path: path.into(),
        input: Input::Stream(Box::new(std::io::BufReader::with_capacity(1 << 20, stdout))),
        size,
        child: Some((child, command, errs)),
    })
}

/// Where a source's bytes come from.
enum Input {
    /// A seekable file, read with positional reads; `data_from` caches the last `SEEK_DATA`
    /// answer (no data before it, from the offset it was asked for).
    File { file: File, data_from: u64 },
    /// A stream, read sequentially.
    Stream(Box<dyn Read + Send>),
}

/// `lseek(SEEK_DATA)`: the first offset at or after `off` holding data; `u64::MAX` when there
/// is none; `off` itself when the filesystem cannot say.
fn seek_data(file: &File, off: u64) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid, owned descriptor; it only moves the offset, which positional
    // reads do not use.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        r as u64
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        u64::MAX
    } else {
        off
    }
}

impl Source {
    /// True when `[off, off+len)` is known to be a hole (reads as zeroes without reading).
    fn is_hole(&mut self, off: u64, len: u64) -> bool {
        match &mut self.input {
            Input::File { file, data_from } => {
                if off >= *data_from {
                    *data_from = seek_data(file, off);
                }
                *data_from >= off + len
            }
            Input::Stream(_) => false,
        }
    }

    /// Fills `buf` with the bytes at `off` (the next bytes, for a stream); returns how many
    /// were read (fewer only at the end of the input).
    fn read_chunk(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.input {
            Input::Stream(r) => read_full(&mut **r, buf),
            Input::File { file, .. } => {
                let mut got = 0;
                while got < buf.len() {
                    match file.read_at(&mut buf[got..], off + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(got)
            }
        }
    }

    /// Ends the converter process: kills it if the stream was abandoned, otherwise checks that
    /// it exited cleanly.
    fn finish(&mut self, completed: bool) -> Result<(), ImportError> {
        let Some((mut child, command, errs)) = self.child.take() else { return Ok(()) };
        if !completed {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        let status = child.wait();
        let stderr = errs.join().unwrap_or_default();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(ImportError::Convert {
                path: self.path.clone(),
                command,
                cause: ConvertFailure::Said(format!("{s}: {}", stderr.trim())),
            }),
            Err(e) => Err(ImportError::Convert { path: self.path.clone(), command, cause: ConvertFailure::Wait(e) }),
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.finish(false);
    }
}

/// Reads exactly `buf.len()` bytes unless the stream ends first; returns how many were read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A piece of a blob read from its source.
enum Piece {
    Data(usize, Vec<u8>),
    Hole(usize, u32),
}

/// One processed chunk: index, length, and (hash, compressed bytes) unless all-zero.
type Encoded = (usize, u32, Option<(ChunkHash, Bytes)>);

/// Bytes done of all blobs of an import, reported to the progress callback.
struct Tally<'a> {
    done: u64,
    total: u64,
    progress: Progress<'a>,
}

impl Tally<'_> {
    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        (self.progress)(self.done, self.total);
    }
}

/// A chunk waiting for its batch: index, length, hash, compressed bytes.
type Pending = (usize, u32, ChunkHash, Bytes);

/// Asks which of the batch's chunks the server lacks (pinning the others in the session) and
/// uploads those. Returns (index, length, hash) of every chunk of the batch.
async fn send_batch(client: &StoreClient, id: &UploadId, batch: Vec<Pending>) -> Result<Vec<(usize, u32, ChunkHash)>, ClientError> {
    let hashes: Vec<ChunkHash> = batch.iter().map(|b| b.2).collect();
    let missing: std::collections::HashSet<ChunkHash> = client.missing(id, &hashes).await?.into_iter().collect();
    // Upload each missing hash once, even if it repeats within the batch.
    let mut sent = std::collections::HashSet::new();
    let uploads: Vec<(ChunkHash, Bytes)> =
        batch.iter().filter(|b| missing.contains(&b.2) && sent.insert(b.2)).map(|b| (b.2, b.3.clone())).collect();
    futures::stream::iter(uploads)
        .map(|(h, z)| async move { client.put_chunk(id, &h, z).await })
        .buffer_unordered(TRANSFERS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(batch.into_iter().map(|(i, len, h, _)| (i, len, h)).collect())
}

/// How hard an import compresses a blob's chunks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Effort {
    /// [`codec::ZSTD_LEVEL`]: a disk's chunks, fast to make (a 2 GiB disk in about a second).
    Fast,
    /// A kernel or initrd: every first boot on every host fetches it whole before its guest
    /// can start, so a chunk that compresses at all is compressed again at
    /// [`codec::BOOT_FILE_LEVEL`] (the Debian cloud kernel, LZ4 inside: 12.4 MB at level 3,
    /// 11.1 MB at 15, for ~1 s of CPU once).
    Boot,
}

fn encode_piece(i: usize, data: Vec<u8>, effort: Effort) -> Encoded {
    if codec::is_zero(&data) {
        return (i, data.len() as u32, None);
    }
    let (h, mut z) = codec::encode(&data);
    // Already compressed data (an initrd is zstd inside) gains nothing from trying harder.
    if effort == Effort::Boot && z.len() < data.len() / 100 * 97 {
        if let Ok(harder) = crate::zstd_ctx::compress(&data, codec::BOOT_FILE_LEVEL) {
            if harder.len() < z.len() {
                z = harder;
            }
        }
    }
    (i, data.len() as u32, Some((h, Bytes::from(z))))
}

/// Where the reader thread leaves the error that ended it (read failure, short read, a
/// converter that failed or produced too much).
type ReadError = Arc<Mutex<Option<ImportError>>>;

/// Streams `src` through the hash+compress pool and uploads the chunks the server lacks.
async fn upload_blob(
    client: &StoreClient,
    id: &UploadId,
    image: &str,
    src: Source,
    chunk_size: u32,
    effort: Effort,
    tally: &mut Tally<'_>,
) -> Result<Blob, ImportError> {
    let size = src.size;
    let n = size.div_ceil(chunk_size as u64) as usize;
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 4);
    let (raw_tx, raw_rx) = std::sync::mpsc::sync_channel::<Piece>(workers * 2);
    let (enc_tx, enc_rx) = tokio::sync::mpsc::channel::<Encoded>(workers * 2);
    let read_error: ReadError = Arc::default();
    let reader = {
        let read_error = read_error.clone();
        std::thread::spawn(move || read_pieces(src, chunk_size, raw_tx, &read_error))
    };
    spawn_encoders(workers, raw_rx, enc_tx, effort);
    // An upload error ends the import at once: the reader and the encoders stop at their next
    // send into the dropped channels.
    let (chunks, seen) = upload_encoded(client, id, image, enc_rx, n, tally).await?;
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    if let Some(e) = read_error.lock().unwrap().take() {
        return Err(e);
    }
    debug_assert_eq!(seen, n);
    if seen != n {
        return Err(ImportError::Options { image: image.into(), cause: format!("internal: {seen} of {n} chunks processed") });
    }
    Ok(Blob { size, chunks })
}

/// The reader thread: owns the source and sends its chunks (or holes) in order; reports an
/// error through `read_error` and stops early when the uploader gave up.
fn read_pieces(mut src: Source, chunk_size: u32, raw_tx: std::sync::mpsc::SyncSender<Piece>, read_error: &ReadError) {
    let size = src.size;
    let n = size.div_ceil(chunk_size as u64) as usize;
    let mut completed = true;
    for i in 0..n {
        let off = i as u64 * chunk_size as u64;
        let len = (size - off).min(chunk_size as u64) as usize;
        if src.is_hole(off, len as u64) {
            if raw_tx.send(Piece::Hole(i, len as u32)).is_err() {
                completed = false;
                break;
            }
            continue;
        }
        let mut buf = vec![0u8; len];
        match src.read_chunk(off, &mut buf) {
            Ok(got) if got == len => {}
            Ok(got) => {
                // A converter that stops early says why on its stderr.
                let e = match src.finish(true) {
                    Err(e) => e,
                    Ok(()) => ImportError::ShortRead { path: src.path.clone(), got: off + got as u64, expected: size },
                };
                *read_error.lock().unwrap() = Some(e);
                completed = false;
                break;
            }
            Err(e) => {
                *read_error.lock().unwrap() = Some(ImportError::File { path: src.path.clone(), what: "read failed", source: e });
                completed = false;
                break;
            }
        }
        if raw_tx.send(Piece::Data(i, buf)).is_err() {
            completed = false; // the uploader gave up
            break;
        }
    }
    drop(raw_tx);
    finish_source(src, completed, read_error);
}

/// Ends the reader's source: a converter must end exactly at the virtual size and exit
/// cleanly.
fn finish_source(mut src: Source, completed: bool, read_error: &ReadError) {
    let size = src.size;
    if let (true, Input::Stream(r)) = (completed, &mut src.input) {
        let mut extra = [0u8; 1];
        if let Ok(1..) = r.read(&mut extra) {
            let _ = src.finish(false);
            *read_error.lock().unwrap() = Some(ImportError::Convert {
                path: src.path.clone(),
                command: "nbdcopy".into(),
                cause: ConvertFailure::Said(format!("produced more than the {size}-byte virtual size")),
            });
            return;
        }
    }
    if let Err(e) = src.finish(completed) {
        *read_error.lock().unwrap() = Some(e);
    }
}

/// Starts `workers` threads that hash and compress the reader's pieces.
fn spawn_encoders(workers: usize, raw_rx: std::sync::mpsc::Receiver<Piece>, enc_tx: tokio::sync::mpsc::Sender<Encoded>, effort: Effort) {
    let raw_rx = Arc::new(Mutex::new(raw_rx));
    for _ in 0..workers {
        let raw_rx = raw_rx.clone();
        let enc_tx = enc_tx.clone();
        std::thread::spawn(move || loop {
            let item = raw_rx.lock().unwrap().recv();
            let out = match item {
                Err(_) => break,
                Ok(Piece::Hole(i, len)) => (i, len, None),
                Ok(Piece::Data(i, data)) => encode_piece(i, data, effort),
            };
            if enc_tx.blocking_send(out).is_err() {
                break;
            }
        });
    }
}

/// Batches the encoded chunks, asks the server which it lacks and uploads those, at most
/// [`BATCHES_IN_FLIGHT`] batches at a time. Returns the blob's chunk list and how many chunks
/// were seen.
async fn upload_encoded(
    client: &StoreClient,
    id: &UploadId,
    image: &str,
    mut enc_rx: tokio::sync::mpsc::Receiver<Encoded>,
    n: usize,
    tally: &mut Tally<'_>,
) -> Result<(Vec<Option<ChunkHash>>, usize), ImportError> {
    let up_err = |source| ImportError::Upload { image: image.to_string(), source };
    let mut chunks: Vec<Option<ChunkHash>> = vec![None; n];
    let mut seen = 0usize;
    let mut batch: Vec<Pending> = Vec::with_capacity(MISSING_BATCH);
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut closed = false;
    loop {
        let flush = !batch.is_empty() && (closed || batch.len() >= MISSING_BATCH);
        if flush && inflight.len() < BATCHES_IN_FLIGHT {
            inflight.push(send_batch(client, id, std::mem::take(&mut batch)));
            continue;
        }
        if closed && batch.is_empty() && inflight.is_empty() {
            break;
        }
        let can_read = !closed && batch.len() < MISSING_BATCH;
        tokio::select! {
            next = enc_rx.recv(), if can_read => match next {
                None => closed = true,
                Some((i, len, enc)) => {
                    seen += 1;
                    match enc {
                        None => tally.add(len as u64),
                        Some((h, z)) => batch.push((i, len, h, z)),
                    }
                }
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                let mut bytes = 0;
                for (i, len, h) in done.map_err(up_err)? {
                    chunks[i] = Some(h);
                    bytes += len as u64;
                }
                tally.add(bytes);
            }
        }
    }
    Ok((chunks, seen))
}

fn check_options(opts: &ImportOptions) -> Result<(), ImportError> {
    let bad = |cause: String| ImportError::Options { image: opts.name.clone(), cause };
    validate_name(&opts.name).map_err(|e| bad(e.to_string()))?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size) || !opts.chunk_size.is_power_of_two() {
        return Err(bad(format!(
            "chunk size {} is invalid: must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}",
            opts.chunk_size
        )));
    }
    if opts.kernel.is_none() && (opts.initrd.is_some() || !opts.cmdline.is_empty()) {
        return Err(bad("an initrd or kernel command line needs a kernel".into()));
    }
    Ok(())
}

/// Imports the disk image file `path` (plus optional kernel/initrd) as a new version of
/// `opts.name`. Returns the stored manifest (with its assigned version).
pub async fn import_file(client: &StoreClient, path: &Path, opts: &ImportOptions, progress: Progress<'_>) -> Result<Manifest, ImportError> {
    let span = tracing::info_span!("import", image = %opts.name, server = %client.base_url());
    import_file_inner(client, path, opts, progress).instrument(span).await
}

async fn import_file_inner(
    client: &StoreClient,
    path: &Path,
    opts: &ImportOptions,
    progress: Progress<'_>,
) -> Result<Manifest, ImportError> {
    check_options(opts)?;
    let detected = detect_format(path)?;
    let format = match (opts.format, detected) {
        (Some(Format::Raw), Format::Qcow2) => return Err(ImportError::Qcow2AsRaw { path: path.into() }),
        (Some(Format::Qcow2), Format::Raw) => return Err(ImportError::NotQcow2 { path: path.into() }),
        (_, d) => d,
    };
    let disk = match format {
        Format::Raw => open_raw(path)?,
        Format::Qcow2 => open_qcow2(path)?,
    };
    let kernel = opts.kernel.as_deref().map(open_raw).transpose()?;
    let initrd = opts.initrd.as_deref().map(open_raw).transpose()?;
    let total = disk.size + kernel.as_ref().map_or(0, |s| s.size) + initrd.as_ref().map_or(0, |s| s.size);
    tracing::info!(image = %opts.name, path = %path.display(), %format, size = disk.size, "importing image");

    let id = client.begin_upload().await.map_err(|source| ImportError::Upload { image: opts.name.clone(), source })?;
    let r = async {
        let mut tally = Tally { done: 0, total, progress };
        progress(0, total);
        let cs = opts.chunk_size;
        let disk = upload_blob(client, &id, &opts.name, disk, cs, Effort::Fast, &mut tally).await?;
        let boot = match kernel {
            None => Boot::Firmware,
            Some(k) => {
                let kernel = upload_blob(client, &id, &opts.name, k, cs, Effort::Boot, &mut tally).await?;
                let initrd = match initrd {
                    Some(i) => Some(upload_blob(client, &id, &opts.name, i, cs, Effort::Boot, &mut tally).await?),
                    None => None,
                };
                Boot::Kernel { kernel, initrd, cmdline: opts.cmdline.clone() }
            }
        };
        let m = Manifest {
            schema: vgrid_api::manifest::SCHEMA_VERSION,
            name: opts.name.clone(),
            version: 0,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            chunk_size: cs,
            disk,
            meta: ImageMeta { os: opts.os.clone(), arch: opts.arch.clone(), boot, volume: opts.volume.clone() },
            parent: None,
            state: None,
        };
        client.commit(&id, &m).await.map_err(|source| ImportError::Upload { image: opts.name.clone(), source })
    }
    .await;
    match r {
        Ok(m) => {
            tracing::info!(image = %m.image_ref(), "import committed");
            Ok(m)
        }
        Err(e) => {
            if let Err(ae) = client.abort_upload(&id).await {
                tracing::debug!(upload = %id, error = %ae, "could not abort upload session (it will expire)");
            }
            Err(e)
        }
    }
}

/// Removes the temp file unless disarmed.
struct TempGuard(Option<PathBuf>);
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes `blob` (chunks of `chunk_size`) as a sparse file at `dest`, atomically (temp name
/// then rename). `image` names the image in errors.
pub async fn export_blob(
    client: &StoreClient,
    image: &str,
    blob: &Blob,
    chunk_size: u32,
    dest: &Path,
    progress: Progress<'_>,
) -> Result<(), ImportError> {
    let werr = |source| ImportError::Write { image: image.to_string(), path: dest.to_path_buf(), source };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = dest.file_name().ok_or_else(|| werr(std::io::Error::other("destination has no file name")))?;
    let tmp = dir.join(format!(".{}.partial-{}", fname.to_string_lossy(), hex::encode(rand::random::<[u8; 4]>())));
    let file = File::create(&tmp).map_err(werr)?;
    let mut guard = TempGuard(Some(tmp.clone()));
    file.set_len(blob.size).map_err(werr)?;
    let total = blob.size;
    let mut done =
        blob.chunks.iter().enumerate().filter(|(_, c)| c.is_none()).map(|(i, _)| blob.chunk_len(chunk_size, i) as u64).sum::<u64>();
    progress(done, total);
    let fetches = blob.chunks.iter().enumerate().filter_map(|(i, c)| c.map(|h| (i, h)));
    let mut stream = futures::stream::iter(fetches)
        .map(|(i, h)| async move {
            let data = client.chunk(&h, chunk_size as usize).await?;
            Ok::<_, ClientError>((i, h, data))
        })
        .buffer_unordered(TRANSFERS);
    while let Some(r) = stream.next().await {
        let (i, h, data) = r.map_err(|source| ImportError::Download { image: image.to_string(), source })?;
        let want = blob.chunk_len(chunk_size, i) as usize;
        if data.len() != want {
            return Err(ImportError::Download {
                image: image.to_string(),
                source: ClientError::Corrupt {
                    url: client.base_url().to_string(),
                    hash: h,
                    cause: format!("chunk {i} is {} bytes, the manifest says {want}", data.len()),
                },
            });
        }
        file.write_all_at(&data, i as u64 * chunk_size as u64).map_err(werr)?;
        done += data.len() as u64;
        progress(done, total);
    }
    file.sync_all().map_err(werr)?;
    drop(file);
    std::fs::rename(&tmp, dest).map_err(werr)?;
    guard.0 = None;
    Ok(())
}

/// Exports image `r` (latest version when none is given) to a sparse raw file at `dest`.
/// Returns the manifest of the exported version.
pub async fn export_image(client: &StoreClient, r: &ImageRef, dest: &Path, progress: Progress<'_>) -> Result<Manifest, ImportError> {
    let span = tracing::info_span!("export", image = %r, server = %client.base_url());
    export_image_inner(client, r, dest, progress).instrument(span).await
}

async fn export_image_inner(client: &StoreClient, r: &ImageRef, dest: &Path, progress: Progress<'_>) -> Result<Manifest, ImportError> {
    let m = client.manifest(r).await.map_err(|source| ImportError::Download { image: r.to_string(), source })?;
    export_blob(client, &m.image_ref().to_string(), &m.disk, m.chunk_size, dest, progress).await?;
    tracing::info!(image = %m.image_ref(), dest = %dest.display(), "image exported");
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"x", 32 << 20).unwrap();
        drop(f);
        let mut src = open_raw(&p).unwrap();
        assert!(src.is_hole(0, 1 << 20));
        assert!(src.is_hole(1 << 20, 1 << 20));
        assert!(!src.is_hole(32 << 20, 1 << 20));
        assert!(src.is_hole(48 << 20, 1 << 20));
        let mut buf = vec![1u8; 4];
        assert_eq!(src.read_chunk((64 << 20) - 2, &mut buf).unwrap(), 2);
    }

    #[test]
    fn format_detection_and_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        assert_eq!(detect_format(&q).unwrap(), Format::Qcow2);
        let r = dir.path().join("r");
        std::fs::write(&r, b"QF").unwrap();
        assert_eq!(detect_format(&r).unwrap(), Format::Raw);
        assert!(detect_format(&dir.path().join("none")).unwrap_err().to_string().contains("none"));
        assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
        assert!("vmdk".parse::<Format>().unwrap_err().contains("vmdk"));
    }
}
