//! Build facts for `meshgate --version` and `meshgate_build_info`: the git revision (from the
//! checkout, or `MESHGATE_GIT_REV` when building from a source tarball) and the target triple.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MESHGATE_GIT_REV");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("..");
    // HEAD moves on checkout; the reflog on every commit.
    for f in [".git/HEAD", ".git/logs/HEAD"] {
        let p = root.join(f);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let rev = std::env::var("MESHGATE_GIT_REV")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(&root)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHGATE_GIT_REV={}", rev.trim());
    println!(
        "cargo:rustc-env=MESHGATE_TARGET={}",
        std::env::var("TARGET").expect("set by cargo")
    );
}
