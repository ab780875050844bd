//! Byte counts in the configuration file and on the command line: `65536`, `"64M"`, `"1GiB"`.

use std::fmt;
use std::str::FromStr;

use bitsd_protocol::{parse_byte_size, ByteSizeError};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A number of bytes, written as a plain number or with a unit suffix (`64M`, `1GiB`; powers of
/// 1024). In TOML a plain number may stay a number; a suffixed one is a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_byte_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes, or a string such as \"64M\" or \"1GiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative: a size is 0 or more bytes")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        size: ByteSize,
    }

    #[test]
    fn numbers_and_suffixed_strings() {
        let t: T = toml::from_str("size = 65536").unwrap();
        assert_eq!(t.size, ByteSize(65536));
        let t: T = toml::from_str("size = \"64M\"").unwrap();
        assert_eq!(t.size, ByteSize(64 << 20));
        let t: T = toml::from_str("size = \"1GiB\"").unwrap();
        assert_eq!(t.size, ByteSize(1 << 30));
        let e = toml::from_str::<T>("size = \"64Q\"").err().unwrap();
        assert!(e.to_string().contains("unknown size unit"), "{e}");
        let e = toml::from_str::<T>("size = -5").err().unwrap();
        assert!(e.to_string().contains("negative"), "{e}");
    }
}
