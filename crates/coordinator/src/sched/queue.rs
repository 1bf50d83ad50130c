//! Requests that cannot be placed now wait for capacity, in arrival order.
//!
//! Waiters are kept in one queue ordered by ticket. Whenever capacity may have freed (a
//! reservation released or expired, a new advertisement, a host back), one pass goes over the
//! queue oldest first and places every waiter that fits: the oldest request gets freed capacity
//! first, and a younger one that fits in what is left is placed too (backfill) instead of
//! waiting behind a request no host can take yet. A new request does not overtake waiters: while
//! anyone waits it joins the queue and is tried after them in the same pass.

use super::{PlaceError, PlaceOptions, Placement, Scheduler};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;
use vgrid_api::grid::PlacementRequest;

/// The waiting requests, by ticket (arrival order).
#[derive(Default)]
pub(super) struct WaitQueue {
    next_ticket: u64,
    waiting: BTreeMap<u64, Waiter>,
}

pub(super) struct Waiter {
    req: PlacementRequest,
    opts: PlaceOptions,
    answer: oneshot::Sender<Result<Placement, PlaceError>>,
}

/// Takes a waiter out of the queue when its `place_or_wait` ends or is dropped; a placement made
/// for it that nobody will receive is released.
struct Ticket<'a> {
    sched: &'a Scheduler,
    id: u64,
    answer: oneshot::Receiver<Result<Placement, PlaceError>>,
    done: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.sched.dequeue(self.id);
        if let Ok(Ok(p)) = self.answer.try_recv() {
            let _ = self.sched.release(p.reservation);
        }
    }
}

impl Scheduler {
    /// Places `req`, waiting up to `wait` for capacity when no host can take it now.
    ///
    /// `wait == None` (`--no-wait`) fails at once with the refusals. A request that no host
    /// could take however much capacity freed (every refusal permanent: requirement, policy,
    /// arch, a host too small) fails at once too. Invalid expressions fail at once. Waiting
    /// requests are served in arrival order (see the module documentation).
    pub async fn place_or_wait(
        &self,
        req: &PlacementRequest,
        opts: &PlaceOptions,
        wait: Option<Duration>,
    ) -> Result<Placement, PlaceError> {
        let Some(wait) = wait else { return self.place_with(req, opts) };
        if self.waiting() == 0 {
            // Nobody to overtake: try at once.
            match self.place_with(req, opts) {
                Err(PlaceError::NoMatch(nm)) if nm.may_change() => {}
                other => return other,
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut ticket = self.enqueue(req.clone(), opts.clone());
        loop {
            // Registered before the pass, so that capacity freed after it wakes us.
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.drain();
            tokio::select! {
                answer = &mut ticket.answer => {
                    ticket.done = true;
                    return answer.unwrap_or_else(|_| Err(PlaceError::NoMatch(super::NoMatch { refusals: Vec::new() })));
                }
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if self.dequeue(ticket.id) {
                        ticket.done = true;
                        // One last try: capacity may have freed right at the deadline.
                        return match self.place_with(req, opts) {
                            Err(PlaceError::NoMatch(last)) => Err(PlaceError::TimedOut { waited: wait, last }),
                            other => other,
                        };
                    }
                    // A pass placed it just now: the answer is in the channel.
                    ticket.done = true;
                    return (&mut ticket.answer)
                        .await
                        .unwrap_or_else(|_| Err(PlaceError::NoMatch(super::NoMatch { refusals: Vec::new() })));
                }
            }
        }
    }

    /// Number of requests waiting for capacity.
    pub fn waiting(&self) -> usize {
        self.queue().waiting.len()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, WaitQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(&self, req: PlacementRequest, opts: PlaceOptions) -> Ticket<'_> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.queue();
        q.next_ticket += 1;
        let id = q.next_ticket;
        q.waiting.insert(id, Waiter { req, opts, answer: tx });
        self.queued.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        Ticket { sched: self, id, answer: rx, done: false }
    }

    /// Removes a waiter; false when a pass already answered it.
    fn dequeue(&self, id: u64) -> bool {
        let removed = self.queue().waiting.remove(&id).is_some();
        if removed {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        removed
    }

    /// Runs passes over the queue until no capacity change arrived during the last one. Only one
    /// caller runs passes at a time; a concurrent caller leaves a note for it and returns.
    fn drain(&self) {
        self.drain_again.store(true, Ordering::SeqCst);
        loop {
            if self.draining.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                return;
            }
            while self.drain_again.swap(false, Ordering::SeqCst) {
                self.drain_pass();
            }
            self.draining.store(false, Ordering::SeqCst);
            if !self.drain_again.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// One pass, oldest waiter first: every waiter that can be placed now is, and every waiter
    /// whose request can never be placed is answered with the refusal.
    fn drain_pass(&self) {
        let mut q = self.queue();
        let tickets: Vec<u64> = q.waiting.keys().copied().collect();
        for id in tickets {
            let w = &q.waiting[&id];
            let outcome = self.place_with(&w.req, &w.opts);
            if let Err(PlaceError::NoMatch(nm)) = &outcome {
                if nm.may_change() {
                    continue;
                }
            }
            let w = q.waiting.remove(&id).expect("ticket listed above");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            if let Err(Ok(p)) = w.answer.send(outcome) {
                // The waiter went away: give the capacity back.
                let _ = self.release(p.reservation);
            }
        }
    }
}
