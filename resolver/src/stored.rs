//! Values and names as a [`RowState`](crate::RowState) stores them: text
//! and bytes of up to [`INLINE`] bytes live inside the entry (no
//! allocation to copy one out of an op, none to free), longer ones in one
//! boxed slice. Converted to and from [`Value`] at the edges (visible rows,
//! conflict records, [`RowState::entries`](crate::RowState::entries)).

use std::cmp::Ordering;
use std::fmt;

use crate::{Hlc, Value};

/// An [`Hlc`] as a row state keeps it: the id as two `u64` halves, so the
/// entries holding one are 8-byte aligned (24 bytes, not 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackedHlc {
    time: u64,
    /// The id's low and high halves.
    id: [u64; 2],
}

impl From<Hlc> for PackedHlc {
    fn from(h: Hlc) -> Self {
        PackedHlc {
            time: h.time,
            id: [h.id as u64, (h.id >> 64) as u64],
        }
    }
}

impl PackedHlc {
    /// The timestamp.
    pub(crate) fn get(self) -> Hlc {
        Hlc {
            time: self.time,
            id: u128::from(self.id[0]) | (u128::from(self.id[1]) << 64),
        }
    }
}

/// Bytes held inline.
pub(crate) const INLINE: usize = 22;

/// A byte string, inline up to [`INLINE`] bytes.
#[derive(Clone)]
pub(crate) enum Bytes {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Bytes {
    pub(crate) fn new(b: &[u8]) -> Self {
        if b.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..b.len()].copy_from_slice(b);
            Bytes::Inline {
                len: b.len() as u8,
                buf,
            }
        } else {
            Bytes::Heap(b.into())
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Inline { len, buf } => &buf[..usize::from(*len)],
            Bytes::Heap(b) => b,
        }
    }

    /// As text (always valid: only made from text or checked UTF-8).
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_slice()).unwrap_or_default()
    }

    fn to_text(&self) -> String {
        String::from_utf8_lossy(self.as_slice()).into_owned()
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Bytes {}

impl PartialOrd for Bytes {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bytes {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(self.as_slice()), f)
    }
}

/// A [`Value`] as stored in a row state. Equal exactly when the values
/// are equal (floats by bits, as [`Value`]'s total order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Null,
    Bool(bool),
    Int(i64),
    /// The bits of the float.
    Float(u64),
    Decimal(Bytes),
    Text(Bytes),
    Bytes(Bytes),
    Json(Bytes),
    Timestamp(i64),
}

impl From<&Value> for Stored {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => Stored::Null,
            Value::Bool(b) => Stored::Bool(*b),
            Value::Int(i) => Stored::Int(*i),
            Value::Float(x) => Stored::Float(x.to_bits()),
            Value::Decimal(s) => Stored::Decimal(Bytes::new(s.as_bytes())),
            Value::Text(s) => Stored::Text(Bytes::new(s.as_bytes())),
            Value::Bytes(b) => Stored::Bytes(Bytes::new(b)),
            Value::Json(s) => Stored::Json(Bytes::new(s.as_bytes())),
            Value::Timestamp(t) => Stored::Timestamp(*t),
        }
    }
}

impl Stored {
    pub(crate) fn to_value(&self) -> Value {
        match self {
            Stored::Null => Value::Null,
            Stored::Bool(b) => Value::Bool(*b),
            Stored::Int(i) => Value::Int(*i),
            Stored::Float(x) => Value::Float(f64::from_bits(*x)),
            Stored::Decimal(s) => Value::Decimal(s.to_text()),
            Stored::Text(s) => Value::Text(s.to_text()),
            Stored::Bytes(b) => Value::Bytes(b.as_slice().to_vec()),
            Stored::Json(s) => Value::Json(s.to_text()),
            Stored::Timestamp(t) => Value::Timestamp(*t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_hlcs_round_trip() {
        for id in [1u128, u128::MAX, 1 << 64, (1 << 64) - 1, 0x1234 << 70 | 5] {
            let h = Hlc { time: 77, id };
            assert_eq!(PackedHlc::from(h).get(), h);
        }
        assert_eq!(std::mem::size_of::<PackedHlc>(), 24);
    }

    #[test]
    fn stored_values_round_trip_inline_and_boxed() {
        let long = "x".repeat(INLINE + 1);
        let exact = "é".repeat(INLINE / 2);
        for v in [
            Value::Null,
            Value::Bool(true),
            Value::Int(-7),
            Value::Float(f64::NAN),
            Value::Float(-0.0),
            Value::Decimal("1.50".into()),
            Value::Text(String::new()),
            Value::Text(exact.clone()),
            Value::Text(long.clone()),
            Value::Bytes(vec![0, 255]),
            Value::Bytes(long.clone().into_bytes()),
            Value::Json("{}".into()),
            Value::Timestamp(i64::MIN),
        ] {
            let s = Stored::from(&v);
            let back = s.to_value();
            assert_eq!(back, v);
            assert_eq!(format!("{back:?}"), format!("{v:?}"));
        }
        assert!(matches!(
            Stored::from(&Value::Text(exact)),
            Stored::Text(Bytes::Inline { .. })
        ));
        assert!(matches!(
            Stored::from(&Value::Text(long)),
            Stored::Text(Bytes::Heap(_))
        ));
        assert_ne!(
            Stored::from(&Value::Float(0.0)),
            Stored::from(&Value::Float(-0.0))
        );
    }
}
