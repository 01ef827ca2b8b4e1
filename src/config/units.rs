//! Human-friendly durations (`500ms`, `30s`, `1m`) and byte sizes (`10MiB`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a number followed by `ms`, `s`, `m` or `h`.
/// A bare number means seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected a number followed by ms, s, m or h"))?;
        let millis = match unit.trim() {
            "ms" => value,
            "" | "s" => value * 1_000.0,
            "m" => value * 60_000.0,
            "h" => value * 3_600_000.0,
            other => return Err(format!("invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)")),
        };
        if !millis.is_finite() || millis > 1e12 {
            return Err(format!("invalid duration {s:?}: too large"));
        }
        Ok(Dur(Duration::from_micros((millis * 1_000.0).round() as u64)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            write!(f, "0s")
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 500ms, 30s, 1m or 1h")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                Dur::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v).map(|v| Dur(Duration::from_secs(v))).map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Dur::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte size written as a number with an optional unit: `B`, `KB`/`KiB`,
/// `MB`/`MiB`, `GB`/`GiB` (all powers of 1024: nobody means 10^6 here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number such as 10MiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
        };
        value.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b != 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b != 0 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1024, 64KiB or 10MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A share written as a number followed by `%` (`20%`, `12.5%`). The
/// range (0 to 100%) is `validate`'s check, so its error names the field.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Percent(pub f64);

impl Percent {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let value = t
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("invalid percentage {s:?}: expected a number followed by %, such as 20%"))?;
        Ok(Percent(value))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a percentage such as 20%")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Percent, E> {
                Percent::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// What `Percent::parse` takes and `validate` keeps: 0% to 100%.
pub const PERCENT_PATTERN: &str = r"^\s*(100(\.0*)?|[0-9]{1,2}(\.[0-9]*)?|\.[0-9]+)\s*%\s*$";

impl utoipa::PartialSchema for Percent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(PERCENT_PATTERN))
            .examples([serde_json::Value::String("20%".to_string())])
            .into()
    }
}
impl utoipa::ToSchema for Percent {}

/// Both are written as strings in the config (`30s`, `10MiB`); bare
/// numbers are accepted too.
fn string_schema(example: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .examples([serde_json::Value::String(example.to_string())])
        .into()
}

impl utoipa::PartialSchema for Dur {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema("30s")
    }
}
impl utoipa::ToSchema for Dur {}

impl utoipa::PartialSchema for ByteSize {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema("10MiB")
    }
}
impl utoipa::ToSchema for ByteSize {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [("500ms", 500), ("30s", 30_000), ("1m", 60_000), ("2h", 7_200_000), ("1.5s", 1_500), ("10", 10_000), ("0s", 0)];
        for (input, ms) in ok {
            assert_eq!(Dur::parse(input).unwrap().0, Duration::from_millis(ms), "{input}");
        }
        for bad in ["", "s", "10 parsecs", "-1s", "1d"] {
            assert!(Dur::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Dur(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(Dur(Duration::from_secs(600)).to_string(), "10m");
    }

    #[test]
    fn percentages() {
        assert_eq!(Percent::parse("20%").unwrap().0, 20.0);
        assert_eq!(Percent::parse(" 12.5 %").unwrap().0, 12.5);
        for bad in ["20", "%", "twenty%", "", "inf%"] {
            assert!(Percent::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Percent(50.0).to_string(), "50%");
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("10MiB").unwrap().0, 10 << 20);
        assert_eq!(ByteSize::parse("64KB").unwrap().0, 64 << 10);
        assert_eq!(ByteSize::parse("12").unwrap().0, 12);
        assert!(ByteSize::parse("ten").is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
    }
}
