//! A tiny exact decimal: parsing, adding and comparing the text of
//! [`Value::Decimal`](crate::Value::Decimal) without ever rounding through a
//! float.
//!
//! Accepted text: an optional sign, digits, and an optional fraction —
//! `[+-]?(D+(\.D*)?|\.D+)` with `D` an ASCII digit — e.g. `12`, `-12.340`,
//! `+0.5`, `.5`, `5.`. Exponents, spaces, `NaN` and `Infinity` are not
//! decimals here (PostgreSQL and MySQL never print exponents for NUMERIC /
//! DECIMAL). The scale of a number is the number of digits after the point;
//! a sum keeps the largest scale of its terms, as SQL does.

use std::cmp::Ordering;

/// Base of a limb: nine decimal digits.
const BASE: u64 = 1_000_000_000;

/// An exact decimal: `(-1)^neg * mag / 10^scale`, `mag` in base 10^9,
/// least significant limb first, no trailing zero limbs (zero is empty and
/// never negative).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Decimal {
    neg: bool,
    mag: Vec<u32>,
    scale: usize,
}

impl Decimal {
    /// Parses decimal text; `None` when it is not `[+-]?(D+(\.D*)?|\.D+)`.
    pub(crate) fn parse(text: &str) -> Option<Decimal> {
        let (neg, rest) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (int, frac) = match rest.split_once('.') {
            Some((i, f)) => (i, f),
            None => (rest, ""),
        };
        let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.len() + frac.len() == 0 || !digits_ok(int) || !digits_ok(frac) {
            return None;
        }
        let mut all = String::with_capacity(int.len() + frac.len());
        all.push_str(int);
        all.push_str(frac);
        Some(Decimal::from_digits(neg, &all, frac.len()))
    }

    /// An integer as a decimal of scale 0.
    pub(crate) fn from_i64(v: i64) -> Decimal {
        let text = v.unsigned_abs().to_string();
        Decimal::from_digits(v < 0, &text, 0)
    }

    fn from_digits(neg: bool, digits: &str, scale: usize) -> Decimal {
        let bytes = digits.as_bytes();
        let mut mag = Vec::with_capacity(bytes.len() / 9 + 1);
        let mut end = bytes.len();
        while end > 0 {
            let start = end.saturating_sub(9);
            let mut limb = 0u32;
            for b in &bytes[start..end] {
                limb = limb * 10 + u32::from(b - b'0');
            }
            mag.push(limb);
            end = start;
        }
        let mut d = Decimal { neg, mag, scale };
        d.normalize();
        d
    }

    fn normalize(&mut self) {
        while self.mag.last() == Some(&0) {
            self.mag.pop();
        }
        if self.mag.is_empty() {
            self.neg = false;
        }
    }

    /// The same number with `scale` digits after the point (`scale` must be
    /// at least the current scale): the magnitude times 10^(difference).
    fn rescaled(&self, scale: usize) -> Decimal {
        let mut mag = self.mag.clone();
        let mut left = scale.saturating_sub(self.scale);
        while left > 0 {
            let step = left.min(9);
            let factor = 10u64.pow(step as u32);
            let mut carry = 0u64;
            for limb in &mut mag {
                let x = u64::from(*limb) * factor + carry;
                *limb = (x % BASE) as u32;
                carry = x / BASE;
            }
            if carry > 0 {
                mag.push(carry as u32);
            }
            left -= step;
        }
        let mut d = Decimal {
            neg: self.neg,
            mag,
            scale,
        };
        d.normalize();
        d
    }

    /// The exact sum (scale: the larger of the two).
    pub(crate) fn add(&self, other: &Decimal) -> Decimal {
        let scale = self.scale.max(other.scale);
        let a_owned;
        let a = if self.scale == scale {
            self
        } else {
            a_owned = self.rescaled(scale);
            &a_owned
        };
        let b_owned;
        let b = if other.scale == scale {
            other
        } else {
            b_owned = other.rescaled(scale);
            &b_owned
        };
        let mut out = if a.neg == b.neg {
            Decimal {
                neg: a.neg,
                mag: add_mag(&a.mag, &b.mag),
                scale,
            }
        } else {
            match cmp_mag(&a.mag, &b.mag) {
                Ordering::Less => Decimal {
                    neg: b.neg,
                    mag: sub_mag(&b.mag, &a.mag),
                    scale,
                },
                _ => Decimal {
                    neg: a.neg,
                    mag: sub_mag(&a.mag, &b.mag),
                    scale,
                },
            }
        };
        out.normalize();
        out
    }

    /// `-self` (zero stays non-negative).
    pub(crate) fn negated(&self) -> Decimal {
        let mut d = self.clone();
        d.neg = !d.neg && !d.mag.is_empty();
        d
    }

    /// Numeric order (`1.5` and `1.50` are equal here).
    pub(crate) fn cmp_value(&self, other: &Decimal) -> Ordering {
        let scale = self.scale.max(other.scale);
        let a = self.rescaled(scale);
        let b = other.rescaled(scale);
        match (a.neg, b.neg) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => cmp_mag(&a.mag, &b.mag),
            (true, true) => cmp_mag(&b.mag, &a.mag),
        }
    }

    /// Canonical text: no leading zeros, exactly `scale` fraction digits,
    /// `-` only for non-zero negatives (`-0.00` prints as `0.00`).
    pub(crate) fn to_text(&self) -> String {
        let mut digits = String::new();
        match self.mag.split_last() {
            None => digits.push('0'),
            Some((top, rest)) => {
                digits.push_str(&top.to_string());
                for limb in rest.iter().rev() {
                    digits.push_str(&format!("{limb:09}"));
                }
            }
        }
        if digits.len() <= self.scale {
            let pad = "0".repeat(self.scale + 1 - digits.len());
            digits.insert_str(0, &pad);
        }
        let mut out = String::with_capacity(digits.len() + 2);
        if self.neg {
            out.push('-');
        }
        let point = digits.len() - self.scale;
        out.push_str(&digits[..point]);
        if self.scale > 0 {
            out.push('.');
            out.push_str(&digits[point..]);
        }
        out
    }
}

fn cmp_mag(a: &[u32], b: &[u32]) -> Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.iter().rev().cmp(b.iter().rev()))
}

fn add_mag(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let mut carry = 0u64;
    for i in 0..a.len().max(b.len()) {
        let x = u64::from(a.get(i).copied().unwrap_or(0))
            + u64::from(b.get(i).copied().unwrap_or(0))
            + carry;
        out.push((x % BASE) as u32);
        carry = x / BASE;
    }
    if carry > 0 {
        out.push(carry as u32);
    }
    out
}

/// `a - b` for `a >= b`.
fn sub_mag(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len());
    let mut borrow = 0i64;
    for (i, &x) in a.iter().enumerate() {
        let mut d = i64::from(x) - i64::from(b.get(i).copied().unwrap_or(0)) - borrow;
        borrow = 0;
        if d < 0 {
            d += BASE as i64;
            borrow = 1;
        }
        out.push(d as u32);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sum(terms: &[&str]) -> String {
        let mut acc = Decimal::parse("0").unwrap();
        for t in terms {
            acc = acc.add(&Decimal::parse(t).unwrap());
        }
        acc.to_text()
    }

    #[test]
    fn parses_the_documented_grammar_only() {
        for ok in [
            "0",
            "-12.340",
            "+1",
            ".5",
            "5.",
            "000.000",
            "123456789012345678901234567890",
        ] {
            assert!(Decimal::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "", "-", ".", "1e5", " 1", "1 ", "NaN", "Infinity", "1.2.3", "--1", "0x10",
        ] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn sums_exactly_and_keeps_the_largest_scale() {
        assert_eq!(sum(&["-12.340", "0"]), "-12.340");
        assert_eq!(sum(&["1.10", "2.205"]), "3.305");
        assert_eq!(sum(&["1.5", "-1.5"]), "0.0");
        assert_eq!(sum(&["-0.00"]), "0.00");
        assert_eq!(sum(&["0.1", "0.2"]), "0.3");
        assert_eq!(sum(&[".5", "5."]), "5.5");
        assert_eq!(sum(&["-3", "1.25"]), "-1.75");
        assert_eq!(sum(&["0.001", "-1"]), "-0.999");
        // Far beyond i128 and f64 precision.
        assert_eq!(
            sum(&[
                "99999999999999999999999999999999999999999.999999999",
                "0.000000001"
            ]),
            "100000000000000000000000000000000000000000.000000000"
        );
        assert_eq!(
            sum(&["-100000000000000000000000000000000000000000", "1"]),
            "-99999999999999999999999999999999999999999"
        );
    }

    #[test]
    fn any_order_gives_the_same_text() {
        let terms = ["1.25", "-0.5", "1000000000.000000001", "-7", "0.75"];
        let expect = sum(&terms);
        let mut rev = terms;
        rev.reverse();
        assert_eq!(sum(&rev), expect);
        assert_eq!(expect, "999999994.500000001");
    }

    #[test]
    fn integers_and_numeric_order() {
        assert_eq!(
            Decimal::from_i64(i64::MIN).to_text(),
            "-9223372036854775808"
        );
        assert_eq!(
            Decimal::from_i64(i64::MAX)
                .add(&Decimal::from_i64(i64::MAX))
                .to_text(),
            "18446744073709551614"
        );
        let p = |s| Decimal::parse(s).unwrap();
        assert_eq!(p("9").cmp_value(&p("10")), Ordering::Less);
        assert_eq!(p("1.5").cmp_value(&p("1.50")), Ordering::Equal);
        assert_eq!(p("-2").cmp_value(&p("-10")), Ordering::Greater);
        assert_eq!(p("-0.0").cmp_value(&p("0")), Ordering::Equal);
        assert_eq!(p("-1").cmp_value(&p("0.1")), Ordering::Less);
    }
}
