//! Requests that cannot be placed now wait for capacity: each waiter retries its placement
//! whenever capacity may have freed (a reservation released or expired, a new advertisement, a
//! host back), until it is placed or its time is up.

use super::{PlaceError, PlaceOptions, Placement, Scheduler};
use std::time::Duration;
use vgrid_api::grid::PlacementRequest;

impl Scheduler {
    /// Places `req`, waiting up to `wait` for capacity when no host can take it now.
    ///
    /// `wait == None` (`--no-wait`) fails at once with the refusals. A request that no host
    /// could take however much capacity freed (every refusal permanent: requirement, policy,
    /// arch, a host too small) fails at once too. Invalid expressions fail at once.
    pub async fn place_or_wait(
        &self,
        req: &PlacementRequest,
        opts: &PlaceOptions,
        wait: Option<Duration>,
    ) -> Result<Placement, PlaceError> {
        let Some(wait) = wait else { return self.place_with(req, opts) };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before trying, so that a release between the try and the wait wakes us.
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.place_with(req, opts) {
                Ok(p) => return Ok(p),
                Err(PlaceError::NoMatch(nm)) if nm.may_change() => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        // One last try: capacity may have freed right at the deadline.
                        return match self.place_with(req, opts) {
                            Err(PlaceError::NoMatch(last)) => Err(PlaceError::TimedOut { waited: wait, last }),
                            other => other,
                        };
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}
