//! The plots docs/PERFORMANCE.md shows are what `cwm plot` draws from the reports checked in
//! beside them (`scripts/plots.sh` redraws them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn draw(report: &Path, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .arg("plot")
        .arg(report)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: {}",
        report.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn checked_in_plots_are_drawn_from_the_checked_in_reports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs: Vec<(std::path::PathBuf, String)> = [
        "store",
        "pipeline",
        "compaction",
        "control",
        "recovery",
        "trace",
        "churn",
    ]
    .iter()
    .map(|k| {
        (
            root.join(format!("docs/bench/{k}.json")),
            format!("host-{k}.svg"),
        )
    })
    .collect();
    let sources = std::fs::read_to_string(root.join("docs/plots/SOURCES.txt")).unwrap();
    let gpu = sources
        .lines()
        .find_map(|l| l.strip_prefix("gpu: "))
        .expect("docs/plots/SOURCES.txt names the GPU report");
    pairs.push((root.join(gpu), "gpu.svg".into()));
    for (report, svg) in pairs {
        let out = tmp.path().join(&svg);
        draw(&report, &out);
        let want = std::fs::read_to_string(root.join("docs/plots").join(&svg)).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert!(
            got == want,
            "docs/plots/{svg} is not what {} draws now: run scripts/plots.sh",
            report.display()
        );
    }
}
