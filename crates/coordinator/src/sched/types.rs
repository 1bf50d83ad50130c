//! The scheduler's answers: where a request was placed, why not, and the capacity held for it.

use super::expr::ExprError;
use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant};
use thiserror::Error;

pub type ReservationId = u64;

/// Whether a host takes placements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Ready,
    /// Missed its heartbeats: nothing is placed on it until its next advertisement.
    Lost,
}

/// Why one host cannot take a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub host: String,
    /// The failing clause: its source text for a requirement or policy clause, or one of the
    /// built-in `state`, `arch`, `cpus`, `memory`, `free_cpus`, `free_memory_mib`.
    pub clause: String,
    /// What was found, e.g. `is false: host.labels.site is "ufl"`.
    pub detail: String,
    /// Whether the refusal may go away without the request changing (capacity frees, the host
    /// comes back, dynamic attributes change): a request refused only for such reasons waits.
    pub transient: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: `{}` {}", self.host, self.clause, self.detail)
    }
}

/// No host can take the request now; one refusal per known host, ordered by host name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoMatch {
    pub refusals: Vec<Refusal>,
}

impl NoMatch {
    /// Whether waiting could help: some host refused only for a transient reason, or there is
    /// no host at all yet.
    pub fn may_change(&self) -> bool {
        self.refusals.is_empty() || self.refusals.iter().any(|r| r.transient)
    }
}

impl fmt::Display for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.refusals.is_empty() {
            return f.write_str("no host matches: no host has joined");
        }
        write!(f, "no host matches ({} hosts)", self.refusals.len())?;
        const SHOWN: usize = 20;
        for r in self.refusals.iter().take(SHOWN) {
            write!(f, "; {r}")?;
        }
        if self.refusals.len() > SHOWN {
            write!(f, "; and {} more", self.refusals.len() - SHOWN)?;
        }
        Ok(())
    }
}

impl std::error::Error for NoMatch {}

/// Why a placement failed.
#[derive(Debug, Error)]
pub enum PlaceError {
    /// The request's requirement or rank is not a valid expression (an HTTP 400).
    #[error(transparent)]
    Invalid(ExprError),
    /// No host can take it (now).
    #[error(transparent)]
    NoMatch(NoMatch),
    /// It waited for capacity and none came.
    #[error("no host could take the request within {}s: {last}", .waited.as_secs())]
    TimedOut {
        waited: Duration,
        #[source]
        last: NoMatch,
    },
}

/// A reservation id that the scheduler does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("reservation {0} is unknown (released, expired, or its host was removed)")]
pub struct UnknownReservation(pub ReservationId);

/// Where a request was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub host: String,
    /// The host agent's URL (from its advertisement).
    pub url: String,
    pub reservation: ReservationId,
}

/// Constraints of a placement that are not in [`PlacementRequest`].
#[derive(Debug, Clone, Default)]
pub struct PlaceOptions {
    /// The image's architecture: only hosts of this `arch` match.
    pub arch: Option<String>,
}

/// Capacity held for a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    pub id: ReservationId,
    pub host: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The host reported the VM running; held until the host's next advertisement, whose free
    /// figures include the VM.
    pub confirmed: bool,
    #[serde(skip)]
    pub since: Instant,
    /// The host's slot (valid while the reservation exists: removing a host drops them).
    #[serde(skip)]
    pub(super) slot: usize,
}
