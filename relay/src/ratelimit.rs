//! Warnings about what an untrusted peer sends, rate-limited per call site.
//!
//! The device VM can send any number of malformed messages, replies to nothing or DMA
//! requests outside its client's maps; each is worth a warning, but a warning per
//! message lets the device VM fill the host's log (and keep the relay busy writing
//! it). [`warn_limited!`](crate::warn_limited) logs at most [`PER_SECOND`] messages per
//! call site and second; the first message logged after some were held back says how
//! many.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most messages logged per call site in one second.
pub const PER_SECOND: u32 = 10;

/// The state of one call site.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Start of the current second.
    window: Option<Instant>,
    /// Messages logged in it.
    logged: u32,
    /// Messages held back since the last one logged.
    held: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                window: None,
                logged: 0,
                held: 0,
            }),
        }
    }

    /// Whether a message may be logged at `now`: `Some` with the number of messages
    /// held back since the last one logged, or `None` (this one is held back).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            st.window = Some(now);
            st.logged = 0;
        }
        if st.logged >= PER_SECOND {
            st.held += 1;
            return None;
        }
        st.logged += 1;
        Some(std::mem::take(&mut st.held))
    }
}

/// `log::warn!`, at most [`PER_SECOND`](crate::ratelimit::PER_SECOND) times a second
/// from this call site; the first message after some were held back ends with how many.
/// For what an untrusted peer can make the relay say at will.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        match LIMIT.allow(::std::time::Instant::now()) {
            Some(0) => ::log::warn!($($arg)+),
            Some(held) => ::log::warn!(
                "{} ({held} more like it not logged)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten messages a second pass, the rest are held back and counted; the next second
    /// lets ten through again, the first of them with the count.
    #[test]
    fn ten_a_second_then_the_count() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..PER_SECOND {
            assert_eq!(limit.allow(t0), Some(0));
        }
        for i in 0..25 {
            assert_eq!(limit.allow(t0 + Duration::from_millis(i * 10)), None);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limit.allow(t1), Some(25));
        assert_eq!(limit.allow(t1), Some(0));
    }
}
