//! The errors of the host layer: what a launch, a save, a restore or a migration on this host
//! can fail with ([`AgentError`] and the two it wraps), each naming the VM and the cause. The
//! HTTP layer maps them to status codes (`crate::http`).

use std::path::PathBuf;

use vgrid_blockproxy::SourceError;

use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("image server {url}: {source}")]
    Source {
        url: String,
        #[source]
        source: SourceError,
    },
    #[error("block proxy: {0}")]
    Proxy(#[from] vgrid_blockproxy::ProxyError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("VM {0} is not on this host")]
    UnknownVm(String),
    #[error("VM {id}: {what} {path}: {source}")]
    Io {
        id: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id}: KVM was asked for but is not usable on this host")]
    NoKvm { id: String },
    #[error(transparent)]
    Admission(#[from] crate::resources::AdmissionError),
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("VM {id}: migration: {detail}")]
    Migration { id: String, detail: String },
    #[error(transparent)]
    QemuUser(#[from] crate::qemu_user::QemuUserError),
    /// A site interface that cannot be plugged in here (not attached, not allocated).
    #[error("{0}")]
    Network(String),
    /// A volume that cannot be attached or committed (the cause says which and why).
    #[error("VM {id}: volume {volume}: {cause}")]
    Volume { id: String, volume: String, cause: String },
    /// The host's network plumbing failed (a bridge, tap or filter; the command and its error).
    #[error("network: {0}")]
    Plumbing(#[source] vgrid_vnet::NetError),
}

impl AgentError {
    pub(crate) fn network(e: vgrid_vnet::NetError) -> AgentError {
        AgentError::Plumbing(e)
    }

    /// An image server of the list could not be used (its URL is the error's source name).
    pub(crate) fn servers(source: SourceError) -> AgentError {
        AgentError::Source { url: source.source_name().to_string(), source }
    }
}

/// A snapshot or suspend that failed ([`crate::save`]).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("VM {id}: cannot save it: {cause}")]
    Save { id: String, cause: String },
    #[error("VM {id}: uploading image {image} failed, nothing was stored: {cause}")]
    Upload { id: String, image: String, cause: String },
    #[error("invalid image name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
}

/// A warm image this host cannot start from ([`crate::restore`]).
#[derive(Debug, thiserror::Error)]
#[error("VM {id}: cannot restore image {image}: {cause}")]
pub struct RestoreError {
    pub id: String,
    pub image: String,
    pub cause: String,
}
