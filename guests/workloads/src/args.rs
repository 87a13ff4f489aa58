//! The argument string: whitespace-separated `key=value` pairs. Values are unsigned
//! integers with an optional `k` (×1,000), `m` (×1,000,000) or `g` (×1,000,000,000)
//! suffix. Each workload names the keys it accepts and their bounds.

use core::fmt;

/// What was wrong with an argument string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// A token without `=`.
    NotKeyValue(&'a str),
    /// A key this workload does not take.
    UnknownKey {
        key: &'a str,
        known: &'static [&'static str],
    },
    /// A value that is not an unsigned integer (with optional suffix).
    NotANumber { key: &'a str, value: &'a str },
    /// A value outside the accepted range.
    OutOfRange {
        key: &'a str,
        value: u64,
        min: u64,
        max: u64,
    },
    /// The same key given twice.
    Repeated(&'a str),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::NotKeyValue(t) => write!(f, "argument '{t}' is not of the form key=value"),
            ArgError::UnknownKey { key, known } => {
                write!(f, "unknown argument '{key}' (this workload takes:")?;
                for k in *known {
                    write!(f, " {k}")?;
                }
                write!(f, ")")
            }
            ArgError::NotANumber { key, value } => {
                write!(f, "argument {key}='{value}' is not an unsigned integer (suffixes k, m, g allowed)")
            }
            ArgError::OutOfRange {
                key,
                value,
                min,
                max,
            } => {
                write!(f, "argument {key}={value} is out of range [{min}, {max}]")
            }
            ArgError::Repeated(k) => write!(f, "argument '{k}' is given twice"),
        }
    }
}

/// One accepted key: name, default, and inclusive bounds.
pub struct Key {
    pub name: &'static str,
    pub default: u64,
    pub min: u64,
    pub max: u64,
    pub help: &'static str,
}

/// Parses `args` against `keys`; returns the values in `keys` order.
pub fn parse<'a, const N: usize>(
    args: &'a str,
    keys: &[Key; N],
    names: &'static [&'static str],
) -> Result<[u64; N], ArgError<'a>> {
    let mut values = [0u64; N];
    let mut seen = [false; N];
    for (i, key) in keys.iter().enumerate() {
        values[i] = key.default;
    }
    for token in args.split_ascii_whitespace() {
        let (k, v) = token.split_once('=').ok_or(ArgError::NotKeyValue(token))?;
        let i = keys
            .iter()
            .position(|key| key.name == k)
            .ok_or(ArgError::UnknownKey {
                key: k,
                known: names,
            })?;
        if seen[i] {
            return Err(ArgError::Repeated(k));
        }
        seen[i] = true;
        let value = parse_number(v).ok_or(ArgError::NotANumber { key: k, value: v })?;
        if value < keys[i].min || value > keys[i].max {
            return Err(ArgError::OutOfRange {
                key: k,
                value,
                min: keys[i].min,
                max: keys[i].max,
            });
        }
        values[i] = value;
    }
    Ok(values)
}

fn parse_number(s: &str) -> Option<u64> {
    let (digits, scale) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1_000),
        b'm' | b'M' => (&s[..s.len() - 1], 1_000_000),
        b'g' | b'G' => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: [Key; 2] = [
        Key {
            name: "n",
            default: 10,
            min: 1,
            max: 1_000_000,
            help: "",
        },
        Key {
            name: "seed",
            default: 1,
            min: 0,
            max: u64::MAX,
            help: "",
        },
    ];
    const NAMES: &[&str] = &["n", "seed"];

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("", &KEYS, NAMES), Ok([10, 1]));
        assert_eq!(parse("  n=5k seed=9 ", &KEYS, NAMES), Ok([5000, 9]));
        assert_eq!(parse("n=1m", &KEYS, NAMES), Ok([1_000_000, 1]));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(parse("n", &KEYS, NAMES), Err(ArgError::NotKeyValue("n")));
        assert!(matches!(
            parse("x=1", &KEYS, NAMES),
            Err(ArgError::UnknownKey { key: "x", .. })
        ));
        assert!(matches!(
            parse("n=-1", &KEYS, NAMES),
            Err(ArgError::NotANumber { .. })
        ));
        assert!(matches!(
            parse("n=0", &KEYS, NAMES),
            Err(ArgError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse("n=2m", &KEYS, NAMES),
            Err(ArgError::OutOfRange { .. })
        ));
        assert_eq!(parse("n=1 n=2", &KEYS, NAMES), Err(ArgError::Repeated("n")));
        assert!(matches!(
            parse("seed=99999999999999999999g", &KEYS, NAMES),
            Err(ArgError::NotANumber { .. })
        ));
    }
}
