//! Rate limit for messages a guest can trigger at will (illegal register writes, malformed
//! chains): the first [`BUDGET`] are logged at warn level, later ones only at debug level, so a
//! hostile guest cannot flood the monitor's log.

use std::sync::atomic::{AtomicU32, Ordering};

/// Guest-triggered warnings logged at warn level per process.
pub const BUDGET: u32 = 256;
static LEFT: AtomicU32 = AtomicU32::new(BUDGET);

/// Takes one unit of the budget; false once it is spent.
pub fn take() -> bool {
    let prev = LEFT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .unwrap_or(0);
    if prev == 1 {
        tracing::warn!("further guest-triggered warnings are logged at debug level only");
    }
    prev > 0
}

/// `tracing::warn!` within the guest budget, `tracing::debug!` beyond it.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if $crate::guest_log::take() {
            tracing::warn!($($arg)*);
        } else {
            tracing::debug!($($arg)*);
        }
    };
}
