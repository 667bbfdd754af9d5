//! `cwm completions SHELL` prints a completion script that knows the subcommands and flags;
//! `cwm man --dir D` writes roff man pages, one for cwm and one per subcommand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn completions_and_man_pages_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}: {o:?}");
        let script = String::from_utf8(o.stdout).unwrap();
        for word in ["freeze", "thaw", "serve", "fsck", "data-dir"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "an unknown shell is refused");
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let top = std::fs::read_to_string(dir.path().join("cwm.1")).unwrap();
    assert!(top.contains(".TH CWM 1"), "{top}");
    let serve = std::fs::read_to_string(dir.path().join("cwm-serve.1")).unwrap();
    assert!(serve.contains("data\\-dir"), "{serve}");
    assert!(dir.path().join("cwm-freeze.1").exists());
}
