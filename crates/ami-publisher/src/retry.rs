//! Retries beyond the SDK's own, in one place.
//!
//! The SDK retries throttled and failed calls ([`crate::aws`] sets it up).
//! What it cannot know about EC2 is handled here:
//!
//! - **Fresh ids.** EC2 is eventually consistent: a resource this run has
//!   just created can be NotFound to the next call (a describe, CreateTags,
//!   AttachVolume, RegisterImage on a new snapshot) for a while. [`call`] and
//!   [`wait`] are told when the ids concerned were made (`fresh`) and treat
//!   NotFound as "not yet" for at most [`NOT_YET_FOR`]. An id given by the
//!   user or found by a query gets no such grace: NotFound on it is an error.
//! - **Creates.** [`token`] makes the idempotency token of one logical
//!   create (CreateVolume, RunInstances, CopyImage): the SDK sends the same
//!   token on each of its retries, so a retry after a lost answer returns
//!   the resource the first attempt made. Creates that take no token
//!   (CreateSnapshot, CopySnapshot, RegisterImage) go through
//!   [`create_untokened`]: each attempt is sent once, and after an attempt
//!   whose outcome is unknown, what it may have made is looked for before
//!   anything is sent again. A create refused for a per-resource limit
//!   that passes with time (a volume's snapshot rate and its pending
//!   snapshots) is asked again after a pause, for up to [`WAIT_OUT_FOR`].
//! - **Waits.** [`wait`] polls with a jittered, growing interval until a
//!   resource is ready, bounded by the user's timeout flag; NotFound on a
//!   fresh id and errors the SDK gave up on that are transient
//!   (throttling, 5xx) only make it poll again.
//! - **Pauses.** The loops that interleave their own calls (an unpacker's
//!   stream state, a volume modification, dialing an unpacker) stay beside
//!   those calls, and pause for the named durations here
//!   ([`BUSY_PAUSE`], [`STREAM_POLL`], [`MODIFICATION_POLL`],
//!   [`DIAL_FIRST_WAIT`]); [`look_for`] is the one look after a lost answer.
//!
//! What an error answer means (its code, NotFound, throttled, transient)
//! is [`crate::errors`]'s.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::bail;
use aws_sdk_ec2::{Client, config::retry::RetryConfig, error::ProvideErrorMetadata};

use crate::errors::{Failed, SdkResultExt as _, code, is_not_found, is_throttled, is_transient, sdk_error};

/// How long after its creation NotFound on an id this run made means "not
/// yet". EC2 documents no bound; in practice it is seconds.
pub const NOT_YET_FOR: Duration = Duration::from_secs(120);

/// How long, after a create whose answer was lost, the publisher looks for
/// what it may have made before sending it again: a new resource can take
/// a few seconds to appear in listings.
pub const LOOK_FOR: Duration = Duration::from_secs(20);

/// First pause before asking again about a fresh id, and the longest.
const NOT_YET_FIRST_WAIT: Duration = Duration::from_millis(250);
const NOT_YET_MAX_WAIT: Duration = Duration::from_secs(4);

/// A wait polls again after a quarter of the time it has waited so far
/// (with jitter: an eighth to a quarter), at least every half second
/// and at most every 15 s (the interval of EC2's own waiters for snapshots
/// and images). So noticing that a resource is ready comes at most ~25%
/// after it was, whether it takes 3 s or 30 min, and a 24-target fan-out
/// is not held up by the target whose poll happened to fall just before
/// its resource was ready. A doubling back-off (0.5, 1, 2, 4, 8 s) noticed
/// an AMI that was ready after 8 s at 15.5 s, nearly twice as late.
const POLL_FIRST_WAIT: Duration = Duration::from_millis(500);
const POLL_MAX_WAIT: Duration = Duration::from_secs(15);
const POLL_SHARE: f64 = 0.25;

/// How long one poll of a wait may take before the next is sent instead.
/// A poll is a describe, which EC2 answers in well under a second, and
/// asking again is harmless: one not answered in this time is as good as
/// lost, and waiting for it the whole `--call-timeout` (meant for calls
/// that act) would hold up noticing that the resource is ready.
const POLL_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The pause before the next poll of a wait that began at `started`.
fn poll_pause(started: Instant, deadline: Instant) -> Duration {
    let step = started.elapsed().mul_f64(POLL_SHARE).clamp(POLL_FIRST_WAIT, POLL_MAX_WAIT);
    let d = step / 2 + step.mul_f64(fastrand::f64() / 2.0);
    d.min(deadline.saturating_duration_since(Instant::now()))
}

/// Fixed pauses of the loops that wait on an unpacker or on an EC2 state
/// that no SDK waiter covers (they live beside the calls they pace, since
/// each interleaves its own calls; their pacing is here):
///
/// - the unpacker answered ABORTED: another caller's operation on the
///   stream runs; a bind ends in milliseconds, a capture in seconds;
pub const BUSY_PAUSE: Duration = Duration::from_millis(300);
/// - an unpacker's stream state (scanning, unpacking, a capture hold), asked
///   of the unpacker itself: cheap, and a waiting publish starts sooner;
pub const STREAM_POLL: Duration = Duration::from_millis(500);
/// - a volume modification, and the new size as the unpacker sees it: one
///   DescribeVolumesModifications a second per target is far within EC2's
///   20 per second for describes, and the kernel sees a new size in seconds;
pub const MODIFICATION_POLL: Duration = Duration::from_secs(1);
/// - dialing an unpacker that does not answer yet (starting, restarting):
///   doubling from [`DIAL_FIRST_WAIT`] to [`DIAL_MAX_WAIT`], since an
///   instance boots in tens of seconds.
pub const DIAL_FIRST_WAIT: Duration = Duration::from_millis(200);
pub const DIAL_MAX_WAIT: Duration = Duration::from_secs(5);

/// Look for what a call whose answer was lost may have made (or what holds
/// a name a create was refused for), for up to [`LOOK_FOR`]: `find` is
/// asked at once and then after pauses growing from 1 s to 4 s.
pub async fn look_for<T, F, Fut>(mut find: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + LOOK_FOR;
    let mut look = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
    loop {
        if let Some(t) = find().await? {
            return Ok(Some(t));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        look.sleep(Some(deadline)).await;
    }
}

/// The longest back-off between two attempts of an untokened create (the
/// SDK's own limit).
const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// Refusals for a per-resource limit that passes with time, with nothing
/// done, and how long to pause before asking again (jittered by up to a
/// fifth). EC2's error codes page: "Wait at least 15 seconds between
/// concurrent volume snapshots"; a volume may have at most 5 pending
/// snapshots, and one of them completes in seconds to minutes.
const WAIT_OUT: &[(&str, Duration)] = &[
    ("SnapshotCreationPerVolumeRateExceeded", Duration::from_secs(5)),
    ("ConcurrentSnapshotLimitExceeded", Duration::from_secs(15)),
];

/// How long such a refusal is waited out before it is the call's error:
/// long enough for a few snapshots of a big volume to complete.
pub const WAIT_OUT_FOR: Duration = Duration::from_secs(15 * 60);

/// The pause before asking again after a refusal for a per-resource limit
/// that passes with time ([`WAIT_OUT`]), or `None` for any other error.
pub fn wait_out<E: ProvideErrorMetadata>(e: &Failed<E>) -> Option<Duration> {
    let c = code(e)?;
    let pause = WAIT_OUT.iter().find(|(w, _)| *w == c)?.1;
    Some(pause + pause.mul_f64(fastrand::f64() / 5.0))
}

/// A jittered, exponentially growing pause.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, max }
    }

    /// The next pause: between half and all of the current step ("equal
    /// jitter", so that targets that failed together do not retry together),
    /// never past `deadline`.
    fn next(&mut self, deadline: Option<Instant>) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let d = step / 2 + step.mul_f64(fastrand::f64() / 2.0);
        match deadline {
            Some(t) => d.min(t.saturating_duration_since(Instant::now())),
            None => d,
        }
    }

    async fn sleep(&mut self, deadline: Option<Instant>) {
        tokio::time::sleep(self.next(deadline)).await;
    }
}

/// An idempotency token for one logical create: 32 random hex digits.
///
/// Random per logical create, not derived from its parameters: EC2 answers
/// a reused token with the resource it made the first time, even when that
/// resource has since been deleted (a replaced volume, a deregistered copy),
/// so a token derived from the parameters would hand a later, legitimate
/// create a dead resource. A re-run of a command finds what an earlier run
/// made by its tags instead (every create tags what it makes).
pub fn token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// A per-call configuration with the SDK's retries off, for a create the
/// caller retries itself ([`create_untokened`]).
pub fn once() -> aws_sdk_ec2::config::Builder {
    aws_sdk_ec2::config::Builder::default().retry_config(RetryConfig::disabled())
}

/// Attempts and first back-off of the client's retry configuration
/// (`--max-retries`, `--retry-wait`).
fn attempts_of(ec2: &Client) -> (u32, Duration) {
    ec2.config().retry_config().map_or((5, Duration::from_secs(1)), |r| (r.max_attempts().max(1), r.initial_backoff()))
}

/// For a loop that handles a call's other errors itself: whether NotFound
/// on ids made at `fresh` is to be tried again, after a jittered pause.
pub struct NotYet {
    fresh: Option<Instant>,
    backoff: Backoff,
}

impl NotYet {
    pub fn new(fresh: Option<Instant>) -> NotYet {
        NotYet { fresh, backoff: Backoff::new(NOT_YET_FIRST_WAIT, NOT_YET_MAX_WAIT) }
    }

    /// `true` (after the pause) when `e` is NotFound and the ids are fresh.
    pub async fn again<E: ProvideErrorMetadata>(&mut self, what: &str, e: &Failed<E>) -> bool {
        if !is_not_found(e) || !still_fresh(self.fresh) {
            return false;
        }
        tracing::debug!(what, code = code(e), "a resource just made is not found yet; asking again");
        self.backoff.sleep(self.fresh.map(|t| t + NOT_YET_FOR)).await;
        true
    }
}

/// One EC2 call naming ids some of which this run made at `fresh` (`None`:
/// it made none of them). NotFound is tried again, with a jittered back-off,
/// until [`NOT_YET_FOR`] after `fresh`; any other error (the SDK's retries
/// done) is the call's error, named by `what`.
pub async fn call<T, E, F, Fut>(what: &str, fresh: Option<Instant>, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failed<E>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let mut not_yet = NotYet::new(fresh);
    loop {
        match f().await {
            Ok(t) => return Ok(t),
            Err(e) if not_yet.again(what, &e).await => {}
            Err(e) => return Err(sdk_error(what, e)),
        }
    }
}

/// Whether ids made at `fresh` may still be unknown to parts of EC2.
pub fn still_fresh(fresh: Option<Instant>) -> bool {
    fresh.is_some_and(|t| t.elapsed() < NOT_YET_FOR)
}

/// What one poll of a wait saw.
pub enum Seen<T> {
    /// Done: the wait ends with this.
    Ready(T),
    /// Not yet; the state seen, for the timeout's message.
    NotYet(String),
    /// It will never be ready (a failed snapshot, a deleted volume).
    Failed(anyhow::Error),
}

/// Poll until `poll` sees the resource ready, at most `timeout` (the
/// user's flag for this kind of wait). NotFound while the ids are fresh,
/// and transient errors the SDK gave up on, mean "poll again".
pub async fn wait<T, E, F, Fut>(what: &str, timeout: Duration, fresh: Option<Instant>, mut poll: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Seen<T>, Failed<E>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last: String;
    loop {
        let Ok(answer) = tokio::time::timeout(POLL_ANSWER_WITHIN, poll()).await else {
            last = format!("a poll not answered within {POLL_ANSWER_WITHIN:?}");
            tracing::debug!(what, "{last}; polling again");
            if Instant::now() >= deadline {
                bail!("waiting for {what}: not done within {timeout:?} (last seen: {last})");
            }
            continue;
        };
        match answer {
            Ok(Seen::Ready(t)) => return Ok(t),
            Ok(Seen::NotYet(state)) => last = state,
            Ok(Seen::Failed(e)) => return Err(e.context(format!("waiting for {what}"))),
            Err(e) if is_not_found(&e) && still_fresh(fresh) => last = "not found yet (just made)".to_owned(),
            Err(e) if is_transient(&e) => {
                last = format!("{:#}", sdk_error("the last poll failed", e));
                tracing::debug!(what, "{last}; polling again");
            }
            Err(e) => return Err(sdk_error(&format!("waiting for {what}"), e)),
        }
        if Instant::now() >= deadline {
            bail!("waiting for {what}: not done within {timeout:?} (last seen: {last})");
        }
        tokio::time::sleep(poll_pause(started, deadline)).await;
    }
}

/// Make a resource with a create that EC2 gives no idempotency token.
///
/// `send` makes one attempt and must turn the SDK's retries off for it
/// ([`once`]), so that every attempt is this function's. An attempt
/// refused for its rate made nothing and is sent again after a back-off; so
/// is one refused with NotFound on an id made at `fresh` (not yet visible).
/// After an attempt whose outcome is unknown (a server fault, a timeout, a
/// lost connection: EC2 may have acted), `find` looks for what it may have
/// made for up to [`LOOK_FOR`], and the call is sent again only when
/// nothing turns up. `find` must recognise only what this logical create
/// makes (a token in a tag, a unique name). At most as many attempts as
/// the client's retry configuration allows (`--max-retries`), plus those
/// spent waiting out NotFound.
pub async fn create_untokened<T, E, S, SFut, L, LFut>(
    ec2: &Client,
    what: &str,
    fresh: Option<Instant>,
    mut send: S,
    mut find: L,
) -> anyhow::Result<T>
where
    S: FnMut() -> SFut,
    SFut: Future<Output = Result<T, Failed<E>>>,
    L: FnMut() -> LFut,
    LFut: Future<Output = anyhow::Result<Option<T>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (attempts, first) = attempts_of(ec2);
    let mut backoff = Backoff::new(first, MAX_BACKOFF);
    let mut tries = 0;
    let started = Instant::now();
    loop {
        let e = match send().await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if let Some(pause) = wait_out(&e).filter(|_| started.elapsed() < WAIT_OUT_FOR) {
            tracing::info!(what, code = code(&e), "refused for a limit that passes; asking again in {pause:.0?}");
            tokio::time::sleep(pause).await;
            continue;
        }
        if is_not_found(&e) && still_fresh(fresh) {
            tracing::debug!(what, code = code(&e), "an input just made is not found yet; trying again");
            backoff.sleep(fresh.map(|t| t + NOT_YET_FOR)).await;
            continue;
        }
        tries += 1;
        if !is_transient(&e) || tries >= attempts {
            return Err(sdk_error(what, e));
        }
        if !is_throttled(&e) {
            tracing::info!(what, error = %crate::errors::sdk_detail(&e), "the answer was lost; looking for what it made");
            if let Some(t) = look_for(&mut find).await? {
                tracing::info!(what, "found what the attempt whose answer was lost made");
                return Ok(t);
            }
        }
        backoff.sleep(None).await;
    }
}

/// The snapshot a create tagged with `token` ([`crate::tags::CREATE_TOKEN`])
/// made, if EC2 lists it yet: (id, size in GiB).
pub async fn snapshot_with_token(ec2: &Client, token: &str) -> anyhow::Result<Option<(String, i32)>> {
    let out = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(crate::tags::tag_filter(crate::tags::CREATE_TOKEN, token))
        .send()
        .await
        .sdk("DescribeSnapshots by create token")?;
    Ok(out.snapshots().iter().find_map(|s| Some((s.snapshot_id()?.to_owned(), s.volume_size().unwrap_or(1)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn began(ago: Duration) -> Instant {
        Instant::now().checked_sub(ago).expect("a clock this old")
    }

    /// Polls come at a quarter of the time waited so far (an eighth with
    /// the most jitter), at least every half second and at most every 15 s,
    /// never past the deadline.
    #[test]
    fn a_wait_polls_in_proportion_to_how_long_it_has_waited() {
        let far = Instant::now() + Duration::from_secs(3 * 3600);
        for _ in 0..200 {
            let d = poll_pause(Instant::now(), far);
            assert!(d >= Duration::from_millis(250) && d <= Duration::from_millis(500), "{d:?} at first");
            let d = poll_pause(began(Duration::from_secs(40)), far);
            assert!(d >= Duration::from_secs(5) && d <= Duration::from_millis(10_010), "{d:?} after 40 s");
            let d = poll_pause(began(Duration::from_secs(3600)), far);
            assert!(d >= Duration::from_millis(7_500) && d <= Duration::from_secs(15), "{d:?} after an hour");
            let d = poll_pause(began(Duration::from_secs(3600)), Instant::now() + Duration::from_secs(1));
            assert!(d <= Duration::from_secs(1), "{d:?} with a second left");
        }
    }
}
