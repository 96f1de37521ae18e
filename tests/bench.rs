//! The bench at toy size, so that `aloft-demo bench` cannot rot: every scenario of S1–S7 and the
//! bare storm produce a figure, the table is printed and the campaign plot is drawn. No figure
//! is checked against a goal (speed is what the bench reports, not what a test asserts).

use std::process::Command;

use crate::common::exe;

#[test]
fn the_bench_at_20_devices_prints_a_figure_for_every_scenario_and_draws_the_campaign() {
    let tmp = tempfile::tempdir().unwrap();
    let plots = tmp.path().join("img");
    let out = Command::new(exe())
        .args([
            "bench",
            "--devices",
            "20",
            "--runs",
            "1",
            "--image-kib",
            "64",
        ])
        .args(["--store-secs", "1", "--timeout-secs", "120"])
        .arg("--plot-dir")
        .arg(&plots)
        .arg("--dir")
        .arg(tmp.path().join("work"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    for row in [
        "| S1 |",
        "| S1c |",
        "| S2 |",
        "| S3 |",
        "| S3 re-sent |",
        "| S3 orch. RSS |",
        "| S4 |",
        "| S5 |",
        "| S6 |",
        "| S7 |",
        "| S1 bare, Aloft |",
    ] {
        assert!(stdout.contains(row), "no row {row} in:\n{stdout}");
    }
    assert!(!stdout.contains("error"), "{stdout}");
    assert!(stdout.contains("machine: "), "{stdout}");
    let svg = std::fs::read_to_string(plots.join("campaign-20.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
}
