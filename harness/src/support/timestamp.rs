//! The UTC calendar time a run is named by: its results directory and report headings.

use std::time::SystemTime;

/// A UTC instant as the run names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamp {
    /// `2026-04-26T15:31:22Z`.
    pub iso: String,
    /// `20260426T153122Z`, for directory names.
    pub compact: String,
}

impl Timestamp {
    /// `time` in UTC, to the second (jiff formats it).
    pub fn of(time: SystemTime) -> Timestamp {
        let instant = jiff::Timestamp::try_from(time)
            .and_then(|t| jiff::Timestamp::from_second(t.as_second()))
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        Timestamp {
            iso: instant.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            compact: instant.strftime("%Y%m%dT%H%M%SZ").to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56 UTC
        let stamp = Timestamp::of(t);
        assert_eq!(stamp.iso, "2024-02-29T12:34:56Z");
        assert_eq!(stamp.compact, "20240229T123456Z");
        assert_eq!(Timestamp::of(UNIX_EPOCH).iso, "1970-01-01T00:00:00Z");
        let later = Timestamp::of(t + Duration::from_millis(999));
        assert_eq!(
            later.iso, "2024-02-29T12:34:56Z",
            "fractions of a second are dropped"
        );
    }
}
