//! Adaptive polling and thread placement, shared by vfu-relay and vfu-guest.
//!
//! A thread in poll mode looks at its work (sockets, rings) without blocking, with the
//! peer's notifications off, for a bounded time after the last piece of work; then it
//! turns notifications back on, looks once more, and sleeps. [`AdaptivePoll`] keeps
//! that clock; the caller does the looking, and turns notifications on and off.
//! A window of zero is event mode: always sleep.

use std::io;
use std::time::{Duration, Instant};

/// What a polling loop does next (from [`AdaptivePoll::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Look without blocking. `disarm`: notifications are still on; turn them off first.
    Poll {
        /// Turn the peer's notifications off before looking.
        disarm: bool,
    },
    /// Block until a notification. `arm`: notifications are off; turn them on first,
    /// and if work arrived meanwhile, report it ([`AdaptivePoll::worked`]) and step
    /// again instead of sleeping.
    Sleep {
        /// Turn the peer's notifications on (and look once more) before sleeping.
        arm: bool,
    },
}

/// The clock of an adaptive polling loop.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    window: Duration,
    last_work: Instant,
    /// Whether the peer's notifications are on (they are, until the first poll).
    armed: bool,
}

impl AdaptivePoll {
    /// Polls for `window` after the last work; zero is event mode.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last_work: Instant::now(),
            armed: true,
        }
    }

    /// Whether this loop polls at all.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// A pass found work: the window starts again.
    pub fn worked(&mut self) {
        self.last_work = Instant::now();
    }

    /// What to do next.
    pub fn step(&mut self) -> Step {
        if self.enabled() && self.last_work.elapsed() < self.window {
            let disarm = std::mem::replace(&mut self.armed, false);
            Step::Poll { disarm }
        } else {
            let arm = !std::mem::replace(&mut self.armed, true);
            Step::Sleep { arm }
        }
    }

    /// A polling pass found nothing: gives the CPU to whatever else may run on it (a
    /// peer that polls on the same core, the client), without sleeping.
    pub fn idle(&self) {
        std::thread::yield_now();
    }
}

/// The CPUs this machine has (configured ones, online or not), at least 1.
pub fn configured_cpus() -> usize {
    // SAFETY: sysconf reads a system value; it has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Runs the calling thread on `cpu` only.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it (checked
    // above), and sched_setaffinity reads exactly size_of::<cpu_set_t>() bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Event mode always sleeps and never asks to arm; poll mode polls (disarming
    /// once) while work is recent, then arms once and sleeps.
    #[test]
    fn steps_follow_the_window() {
        let mut event = AdaptivePoll::new(Duration::ZERO);
        assert_eq!(event.step(), Step::Sleep { arm: false });
        event.worked();
        assert_eq!(event.step(), Step::Sleep { arm: false });

        let mut poll = AdaptivePoll::new(Duration::from_millis(50));
        poll.worked();
        assert_eq!(poll.step(), Step::Poll { disarm: true });
        assert_eq!(poll.step(), Step::Poll { disarm: false });
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(poll.step(), Step::Sleep { arm: true });
        assert_eq!(poll.step(), Step::Sleep { arm: false });
        poll.worked();
        assert_eq!(poll.step(), Step::Poll { disarm: true });
    }

    /// A thread can be pinned to a CPU it may run on, and not to one past the set.
    #[test]
    fn pins_the_current_thread() {
        std::thread::spawn(|| {
            pin_current_thread(0).expect("CPU 0 exists");
            assert!(pin_current_thread(libc::CPU_SETSIZE as usize).is_err());
        })
        .join()
        .unwrap();
    }
}
