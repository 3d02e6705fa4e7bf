//! Durations as people write them in role files and on the command line: `90s`, `30m`,
//! `12h`, `7d`, `1h30m`.

use std::time::Duration;

/// Longest duration we accept anywhere: ten years.
pub const DURATION_MAX: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Parses `1h30m`-style durations; the reason on error is a sentence for the user.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty duration; write e.g. 90s, 30m, 12h or 7d".to_owned());
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in trimmed.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(digit)))
                    .ok_or_else(|| format!("{text:?} is too long a duration"))?,
            );
            continue;
        }
        let unit_secs = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {c:?}; use s, m, h or d (e.g. 1h30m)"
                ));
            }
        };
        let n = number
            .take()
            .ok_or_else(|| format!("{text:?}: unit {c:?} without a number before it"))?;
        total = n
            .checked_mul(unit_secs)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(|| format!("{text:?} is too long a duration"))?;
    }
    if number.is_some() {
        return Err(format!("{text:?}: number without a unit; add s, m, h or d"));
    }
    let duration = Duration::from_secs(total);
    if duration > DURATION_MAX {
        return Err(format!("{text:?} is longer than ten years"));
    }
    Ok(duration)
}

/// Formats whole hours, minutes and seconds, the inverse of [`parse_duration`].
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        let n = (secs / size) % if size == 3600 { u64::MAX } else { 60 };
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Units add up, and formatting is the inverse of parsing.
    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration("2190h"),
            Ok(Duration::from_secs(2190 * 3600))
        );
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(12 * 3600 + 5)), "12h5s");
        assert_eq!(
            parse_duration(&format_duration(Duration::from_secs(98_765))),
            Ok(Duration::from_secs(98_765))
        );
    }

    // Missing units, unknown units, overflow and empty strings are refused with a reason.
    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "12",
            "h",
            "1x",
            "99999999999999999999s",
            "100000d",
            "-1h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
