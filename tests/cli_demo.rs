//! The README's main command runs end to end (a small session, to keep CI quick).
#[test]
fn cwm_demo_runs_and_verifies() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["demo", "--tokens", "1000"])
        .output()
        .expect("run cwm demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("bit-exact"), "{stdout}");
}
