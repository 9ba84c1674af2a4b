//! Hybrid logical clocks in uhlc's layout, driven by a physical time that the
//! caller passes in (sans-IO: the simulator can skew and jump it).

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::{Error, NodeId, OpId, Result};

/// Low bits of an NTP64 time used as the logical counter (as in uhlc).
const LOGICAL_MASK: u64 = 0xF;

/// A physical time in NTP64 format: seconds since the Unix epoch in the high
/// 32 bits, the fraction of a second in the low 32 bits (uhlc's `NTP64`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Ntp64(pub u64);

impl Ntp64 {
    /// Converts Unix milliseconds.
    pub fn from_unix_millis(ms: u64) -> Self {
        let secs = ms / 1000;
        let frac = ((ms % 1000) << 32).div_ceil(1000);
        Ntp64((secs << 32) | frac)
    }

    /// Converts to Unix milliseconds (rounded down).
    pub fn as_unix_millis(self) -> u64 {
        let secs = self.0 >> 32;
        let frac = self.0 & 0xFFFF_FFFF;
        secs * 1000 + ((frac * 1000) >> 32)
    }

    /// Converts a duration in milliseconds into NTP64 units.
    pub fn millis(ms: u64) -> u64 {
        Ntp64::from_unix_millis(ms).0
    }

    /// The same instant as a uhlc NTP64.
    pub fn to_uhlc(self) -> uhlc::NTP64 {
        uhlc::NTP64(self.0)
    }
}

/// A hybrid logical clock timestamp: NTP64 time (low 4 bits a logical
/// counter) and the 128-bit id of the clock that made it. Ordered by
/// `(time, id)`, a total order across the mesh.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// NTP64 time with the logical counter in the low bits.
    pub time: u64,
    /// The id of the clock (derived from the node name).
    pub id: u128,
}

impl Hlc {
    /// The id bytes as sent on the wire (little endian, trailing zeros cut,
    /// as uhlc's `ID` does).
    pub fn id_bytes(&self) -> Vec<u8> {
        let bytes = self.id.to_le_bytes();
        let len = 16 - (self.id.leading_zeros() as usize / 8);
        bytes[..len.max(1)].to_vec()
    }

    /// Parses wire id bytes (1-16 bytes, little endian).
    pub fn id_from_bytes(bytes: &[u8]) -> Option<u128> {
        if bytes.is_empty() || bytes.len() > 16 {
            return None;
        }
        let mut full = [0u8; 16];
        full[..bytes.len()].copy_from_slice(bytes);
        let id = u128::from_le_bytes(full);
        (id != 0).then_some(id)
    }

    /// The same timestamp as a uhlc `Timestamp`, if the id is valid.
    pub fn to_uhlc(&self) -> Option<uhlc::Timestamp> {
        let id = uhlc::ID::try_from(self.id_bytes().as_slice()).ok()?;
        Some(uhlc::Timestamp::new(uhlc::NTP64(self.time), id))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Ntp64(self.time);
        write!(
            f,
            "{}.{}/{:x}",
            t.as_unix_millis(),
            self.time & LOGICAL_MASK,
            self.id
        )
    }
}

/// A sans-IO hybrid logical clock. Physical time is an argument of every
/// call, so the same code runs on the system clock and in the simulator.
#[derive(Clone, Debug)]
pub struct HlcClock {
    id: u128,
    last: u64,
    max_drift: u64,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock for `node`, rejecting remote timestamps more than
    /// `max_clock_drift_ms` ahead of physical time.
    pub fn new(node: &NodeId, max_clock_drift_ms: u64) -> Self {
        HlcClock {
            id: node.hlc_id(),
            last: 0,
            max_drift: Ntp64::millis(max_clock_drift_ms),
            max_drift_ms: max_clock_drift_ms,
        }
    }

    /// Restores the last issued time (after a restart), so time never goes
    /// backwards even if the physical clock did.
    pub fn restore(&mut self, last: u64) {
        self.last = self.last.max(last);
    }

    /// The last time issued or observed.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// A new timestamp strictly greater than every one issued or observed.
    pub fn tick(&mut self, physical: Ntp64) -> Hlc {
        let now = physical.0 & !LOGICAL_MASK;
        self.last = if now > self.last & !LOGICAL_MASK {
            now
        } else {
            self.last.saturating_add(1)
        };
        Hlc {
            time: self.last,
            id: self.id,
        }
    }

    /// Takes a remote timestamp into account. Rejects it, changing nothing,
    /// when it is more than the allowed drift ahead of `physical`.
    pub fn observe(&mut self, op: &OpId, remote: Hlc, physical: Ntp64) -> Result<()> {
        let limit = physical.0.saturating_add(self.max_drift);
        if remote.time > limit {
            let ahead = Ntp64(remote.time - physical.0).as_unix_millis();
            return Err(Error::ClockDrift {
                op: op.clone(),
                hlc: remote,
                ahead_ms: ahead,
                max_ms: self.max_drift_ms,
            });
        }
        self.last = self.last.max(remote.time);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ntp64_round_trips_millis() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123] {
            assert_eq!(Ntp64::from_unix_millis(ms).as_unix_millis(), ms);
        }
    }

    #[test]
    fn tick_is_strictly_monotonic_even_when_physical_time_goes_back() {
        let n = NodeId::new("a").unwrap();
        let mut c = HlcClock::new(&n, 500);
        let t1 = c.tick(Ntp64::from_unix_millis(10_000));
        let t2 = c.tick(Ntp64::from_unix_millis(9_000));
        let t3 = c.tick(Ntp64::from_unix_millis(10_000));
        assert!(t1 < t2 && t2 < t3);
        let t4 = c.tick(Ntp64::from_unix_millis(11_000));
        assert!(t3 < t4);
        assert_eq!(t4.time & LOGICAL_MASK, 0);
    }

    #[test]
    fn observe_rejects_far_future_and_keeps_state() {
        let n = NodeId::new("a").unwrap();
        let mut c = HlcClock::new(&n, 500);
        let op = OpId::new(NodeId::new("b").unwrap(), 1);
        let far = Hlc {
            time: Ntp64::from_unix_millis(2_000).0,
            id: 9,
        };
        let err = c
            .observe(&op, far, Ntp64::from_unix_millis(1_000))
            .unwrap_err();
        assert!(err.to_string().contains("1000 ms ahead"), "{err}");
        assert_eq!(c.last(), 0);
        let near = Hlc {
            time: Ntp64::from_unix_millis(1_400).0,
            id: 9,
        };
        c.observe(&op, near, Ntp64::from_unix_millis(1_000))
            .unwrap();
        assert!(c.tick(Ntp64::from_unix_millis(1_000)) > near);
    }

    #[test]
    fn id_bytes_round_trip_and_match_uhlc() {
        let n = NodeId::new("edge-a").unwrap();
        let h = Hlc {
            time: 42,
            id: n.hlc_id(),
        };
        assert_eq!(Hlc::id_from_bytes(&h.id_bytes()), Some(h.id));
        let u = h.to_uhlc().unwrap();
        assert_eq!(u.get_time().0, 42);
    }
}
