//! What the QEMU driver's operations report: [`VmError`] names the VM (or binary, or
//! directory) and keeps the cause.

use std::path::PathBuf;
use std::time::Duration;

use crate::qmp::QmpError;
use vgrid_api::host::ExitInfo;

/// What failed, on which VM (or binary, or directory).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM {id}: invalid spec: {reason}")]
    InvalidSpec { id: String, reason: String },
    #[error("VM {id}: {what} {path} does not exist or is not a readable file")]
    MissingFile { id: String, what: &'static str, path: PathBuf },
    #[error("VM {id}: runtime directory {path}: {source}")]
    RuntimeDir {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: socket path {path} is longer than {max} bytes; use a shorter runtime directory")]
    SocketPathTooLong { id: String, path: PathBuf, max: usize },
    #[error("VM {id}: runtime directory {dir} is in use by running QEMU pid {pid}")]
    AlreadyRunning { id: String, dir: PathBuf, pid: u32 },
    #[error("VM {id}: cannot run {binary}: {source}")]
    Spawn {
        id: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: creating overlay {path} over {backing} failed: {detail}")]
    Overlay { id: String, path: PathBuf, backing: String, detail: String },
    #[error("VM {id}: QEMU exited during startup ({exit}); QEMU said: {stderr}{console}")]
    EarlyExit { id: String, exit: ExitInfo, stderr: String, console: String },
    #[error("VM {id}: QEMU did not open its QMP socket within {after:?}; QEMU said: {stderr}")]
    StartTimeout { id: String, after: Duration, stderr: String },
    #[error("VM {id}: {source}")]
    Qmp {
        id: String,
        #[source]
        source: QmpError,
    },
    #[error("VM {id}: {text:?} did not appear on the console within {after:?}; last console lines:\n{tail}")]
    ConsoleTimeout { id: String, text: String, after: Duration, tail: String },
    #[error("VM {id}: QEMU exited ({exit}) before {text:?} appeared on the console; last console lines:\n{tail}")]
    ConsoleExited { id: String, text: String, exit: ExitInfo, tail: String },
    #[error("VM {id}: {path}: {source}")]
    Io {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot adopt the VM in {dir}: {reason}")]
    Adopt { dir: PathBuf, reason: String },
    #[error("VM {id}: saving its state to {path} failed: {detail}")]
    SaveState { id: String, path: PathBuf, detail: String },
    #[error("VM {id}: restoring its state from {path} failed: {detail}")]
    Restore { id: String, path: PathBuf, detail: String },
    #[error("{binary} --version: {detail}")]
    Version { binary: PathBuf, detail: String },
}
