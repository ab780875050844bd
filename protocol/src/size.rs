//! Byte counts as people write them: `65536`, `64K`, `64M`, `1GiB`.
//!
//! Shared by the server's flags and configuration keys and the client's `--fragment-size`.

/// A byte count could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// No number at the start (`"M"`, `""`, `"-1"`).
    #[error("{0:?} is not a byte count: write a number of bytes, optionally with K, M, G or T (e.g. 64M, 1GiB)")]
    NotANumber(String),
    /// A suffix that is not a unit.
    #[error("{value:?}: unknown size unit {unit:?}; use K, M, G or T, e.g. 64M or 1GiB (powers of 1024)")]
    UnknownUnit {
        /// The whole value.
        value: String,
        /// The suffix.
        unit: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a byte count: a whole number, optionally followed (with or without a space) by a
/// unit `B`, `K`/`KB`/`KiB`, `M`/`MB`/`MiB`, `G`/`GB`/`GiB` or `T`/`TB`/`TiB`, in any case.
/// Every unit is a power of 1024, as BITS and IIS count.
pub fn parse_byte_size(value: &str) -> Result<u64, ByteSizeError> {
    let t = value.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(ByteSizeError::NotANumber(value.to_owned()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| ByteSizeError::TooLarge(value.to_owned()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(ByteSizeError::UnknownUnit {
                value: value.to_owned(),
                unit: unit.trim().to_owned(),
            })
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| ByteSizeError::TooLarge(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_powers_of_1024() {
        assert_eq!(parse_byte_size("65536"), Ok(65536));
        assert_eq!(parse_byte_size("64K"), Ok(64 << 10));
        assert_eq!(parse_byte_size("64M"), Ok(64 << 20));
        assert_eq!(parse_byte_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_byte_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_size("2gb"), Ok(2 << 30));
        assert_eq!(parse_byte_size("1T"), Ok(1 << 40));
        assert_eq!(parse_byte_size("0"), Ok(0));
    }

    #[test]
    fn bad_values_say_what_to_write() {
        assert!(matches!(
            parse_byte_size("M"),
            Err(ByteSizeError::NotANumber(_))
        ));
        assert!(matches!(
            parse_byte_size("-1"),
            Err(ByteSizeError::NotANumber(_))
        ));
        assert!(matches!(
            parse_byte_size("1.5G"),
            Err(ByteSizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_byte_size("64Q"),
            Err(ByteSizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_byte_size("99999999999T"),
            Err(ByteSizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_byte_size("99999999999999999999999"),
            Err(ByteSizeError::TooLarge(_))
        ));
        assert!(parse_byte_size("64Q")
            .unwrap_err()
            .to_string()
            .contains("1GiB"));
    }
}
