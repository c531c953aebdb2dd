//! The UTC calendar time a run is named by: its results directory and report headings.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC instant as the run names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamp {
    /// `2026-04-26T15:31:22Z`.
    pub iso: String,
    /// `20260426T153122Z`, for directory names.
    pub compact: String,
}

impl Timestamp {
    /// `time` in UTC.
    pub fn of(time: SystemTime) -> Timestamp {
        let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days as i64);
        let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
        Timestamp {
            iso: format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z"),
            compact: format!("{year:04}{month:02}{day:02}T{h:02}{m:02}{s:02}Z"),
        }
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56 UTC
        let stamp = Timestamp::of(t);
        assert_eq!(stamp.iso, "2024-02-29T12:34:56Z");
        assert_eq!(stamp.compact, "20240229T123456Z");
        assert_eq!(Timestamp::of(UNIX_EPOCH).iso, "1970-01-01T00:00:00Z");
    }
}
