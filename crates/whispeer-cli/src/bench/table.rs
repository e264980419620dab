//! The comparison table `whispeer bench` prints: one column per system, one row per figure;
//! and the medians of several rounds' tables.

use std::fmt::Write as _;

/// The measurements of one system.
pub(super) struct Report {
    pub(super) one_to_one: f64,
    pub(super) one_to_eight: f64,
    /// Fan-in (see `fan_in.rs`): msgs/s from 8 publishers to one subscriber; NaN for a system
    /// without it.
    pub(super) fan_in: f64,
    /// The work queue (see `group.rs`): msgs/s, and the smallest member's share against an
    /// even one; NaN for a system without queue groups.
    pub(super) group: [f64; 2],
    pub(super) large_mb: f64,
    pub(super) latency: [f64; 3],
    /// CPU microseconds per delivery: in the 1→1 run the server's (NaN without its pid) and
    /// this harness's (publisher and subscriber clients together), then the same in the 1→8
    /// run (per delivery: eight a message).
    pub(super) cpu_us: [f64; 4],
}

type Row = (&'static str, fn(&Report) -> f64);

const ROWS: [Row; 13] = [
    ("1→1 128 B, delivered msgs/s", |r| r.one_to_one),
    ("1→8 128 B, delivered msgs/s", |r| r.one_to_eight),
    ("8→1 128 B, delivered msgs/s", |r| r.fan_in),
    ("1→group of 8 128 B, msgs/s", |r| r.group[0]),
    ("group: least share / even", |r| r.group[1]),
    ("1→1 64 KiB, MB/s", |r| r.large_mb),
    ("latency p50 µs (fixed rate)", |r| r.latency[0]),
    ("latency p99 µs", |r| r.latency[1]),
    ("latency p99.9 µs", |r| r.latency[2]),
    ("server CPU µs/delivery (1→1)", |r| r.cpu_us[0]),
    ("harness CPU µs/delivery (1→1)", |r| r.cpu_us[1]),
    ("server CPU µs/delivery (1→8)", |r| r.cpu_us[2]),
    ("harness CPU µs/delivery (1→8)", |r| r.cpu_us[3]),
];

/// `reports` side by side, with the first over the second when there are two.
pub(super) fn table(reports: &[(&str, Report)]) -> String {
    let mut out = format!("{:<32}", "workload");
    for (name, _) in reports {
        let _ = write!(out, "{name:>22}");
    }
    if reports.len() == 2 {
        // The first column over the second (whispeer over NATS, or one node over the cluster).
        let _ = write!(out, "{:>16}", "ratio 1st/2nd");
    }
    out.push('\n');
    for (label, value) in ROWS {
        let _ = write!(out, "{label:<32}");
        // CPU per delivery is well under a microsecond, a share under one: one decimal would
        // hide differences.
        let decimals = if label.contains("CPU") || label.contains("share") { 2 } else { 1 };
        for (_, report) in reports {
            let _ = write!(out, "{:>22.decimals$}", value(report));
        }
        if let [(_, w), (_, n)] = reports {
            let _ = write!(out, "{:>15.2}×", value(w) / value(n));
        }
        out.push('\n');
    }
    out
}

/// Each system's figures as the medians of its figures in `rounds` (every round measured the
/// same systems in the same order). A figure missing from a round (NaN: the system lost
/// messages, or its CPU time could not be read) is left out of its median.
pub(super) fn medians<'a>(rounds: &[Vec<(&'a str, Report)>]) -> Vec<(&'a str, Report)> {
    let Some(first) = rounds.first() else { return Vec::new() };
    let systems = first.iter().enumerate().map(|(i, (name, _))| {
        let of = |value: &dyn Fn(&Report) -> f64| {
            median(rounds.iter().filter_map(|round| round.get(i)).map(|(_, r)| value(r)))
        };
        let report = Report {
            one_to_one: of(&|r| r.one_to_one),
            one_to_eight: of(&|r| r.one_to_eight),
            fan_in: of(&|r| r.fan_in),
            group: [0, 1].map(|p| of(&|r| r.group[p])),
            large_mb: of(&|r| r.large_mb),
            latency: [0, 1, 2].map(|p| of(&|r| r.latency[p])),
            cpu_us: [0, 1, 2, 3].map(|p| of(&|r| r.cpu_us[p])),
        };
        (*name, report)
    });
    systems.collect()
}

/// The middle of the finite `values` (the mean of the two middle ones for an even count);
/// NaN when there is none.
pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each system's line as the medians of its figures over the rounds (every round measured the
/// same systems in the same order): `line` makes it from the first round's line and the median
/// of any figure.
pub(super) fn medians_of<L>(
    each: &[Vec<L>],
    line: impl Fn(&L, &dyn Fn(fn(&L) -> f64) -> f64) -> L,
) -> Vec<L> {
    let first = each.first().map(Vec::as_slice).unwrap_or_default();
    let one = |(i, first): (usize, &L)| {
        let of =
            |value: fn(&L) -> f64| median(each.iter().filter_map(|rows| rows.get(i)).map(value));
        line(first, &of)
    };
    first.iter().enumerate().map(one).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(scale: f64) -> Report {
        Report {
            one_to_one: scale,
            one_to_eight: 8.0 * scale,
            fan_in: 2.0 * scale,
            group: [4.0 * scale, 0.9],
            large_mb: 100.0 * scale,
            latency: [scale, 2.0 * scale, 3.0 * scale],
            cpu_us: [scale / 10.0, f64::NAN, scale / 80.0, f64::NAN],
        }
    }

    #[test]
    fn each_figure_is_its_median_over_the_rounds_and_a_missing_one_is_left_out() {
        let rounds = vec![
            vec![("a", report(3.0)), ("b", report(10.0))],
            vec![("a", report(1.0)), ("b", Report { one_to_one: f64::NAN, ..report(30.0) })],
            vec![("a", report(2.0)), ("b", report(20.0))],
        ];
        let medians = medians(&rounds);
        let names: Vec<&str> = medians.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["a", "b"]);
        let (a, b) = (&medians[0].1, &medians[1].1);
        assert_eq!((a.one_to_one, a.one_to_eight, a.large_mb), (2.0, 16.0, 200.0));
        assert_eq!(a.latency, [2.0, 4.0, 6.0]);
        assert_eq!(a.group, [8.0, 0.9]);
        assert_eq!(a.cpu_us[0], 0.2);
        assert!(a.cpu_us[1].is_nan(), "no round had it");
        // b lost messages in its second round: the median of the two others.
        assert_eq!((b.one_to_one, b.one_to_eight), (15.0, 160.0));
        assert!(super::medians(&[]).is_empty());
    }

    #[test]
    fn the_table_has_a_row_per_figure_and_the_ratio_of_two_systems() {
        let text = table(&[("a", report(3.0)), ("b", report(2.0))]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + ROWS.len());
        assert!(lines[0].ends_with("ratio 1st/2nd"), "{text}");
        let row = lines[1];
        assert!(row.starts_with("1→1 128 B, delivered msgs/s"), "{text}");
        assert!(row.ends_with("1.50×"), "{text}");
        assert!(!table(&[("a", report(1.0))]).contains('×'), "one system: no ratio");
    }
}
