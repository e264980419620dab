//! The comparison table `whispeer bench` prints: one column per system, one row per figure.

use super::Report;

/// Prints `reports` side by side, with the first over the second when there are two.
pub(super) fn print_table(reports: &[(&str, Report)]) {
    type Row = (&'static str, fn(&Report) -> f64);
    let rows: [Row; 8] = [
        ("1→1 128 B, delivered msgs/s", |r| r.one_to_one),
        ("1→8 128 B, delivered msgs/s", |r| r.one_to_eight),
        ("1→1 64 KiB, MB/s", |r| r.large_mb),
        ("latency p50 µs (fixed rate)", |r| r.latency[0]),
        ("latency p99 µs", |r| r.latency[1]),
        ("latency p99.9 µs", |r| r.latency[2]),
        ("server CPU µs/delivery (1→1)", |r| r.cpu_us[0]),
        ("harness CPU µs/delivery (1→1)", |r| r.cpu_us[1]),
    ];
    print!("{:<32}", "workload");
    for (name, _) in reports {
        print!("{name:>22}");
    }
    if reports.len() == 2 {
        // The first column over the second (whispeer over NATS, or one node over the cluster).
        print!("{:>16}", "ratio 1st/2nd");
    }
    println!();
    for (label, value) in rows {
        print!("{label:<32}");
        // CPU per delivery is well under a microsecond: one decimal would hide differences.
        let decimals = if label.contains("CPU") { 2 } else { 1 };
        for (_, report) in reports {
            print!("{:>22.decimals$}", value(report));
        }
        if let [(_, w), (_, n)] = reports {
            print!("{:>15.2}×", value(w) / value(n));
        }
        println!();
    }
}
