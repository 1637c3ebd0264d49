//! `kiln pipeline` when the disk fills up mid-run, simulated with a file-size limit (`ulimit -f`,
//! SIGXFSZ ignored, so writes past the limit fail with EFBIG as they would with ENOSPC): a clear error
//! naming the file, exit 2, finished steps kept, no partial file at a final path, and a rerun resumes.

mod common;

use common::{assert_exit, demo_pipeline_args, kiln, sha256_file, skip};
use std::path::Path;
use std::process::{Command, Output};

fn ps(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pipeline(inputs: &Path, out: &Path, quants: &str) -> Vec<String> {
    demo_pipeline_args(inputs, out, quants, "128", "3")
}

#[test]
fn a_full_disk_is_a_clear_error_and_finished_steps_are_kept() {
    if !Path::new("/bin/sh").exists() {
        skip("/bin/sh", "install a POSIX shell");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (inputs, out) = (d.path().join("in"), d.path().join("out"));
    let o = kiln()
        .args(["demo", "--build-only", "--out", ps(&inputs)])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    // 1: F16 (4.2 MiB) and Q4_0 (1.3 MiB) finish
    let o = kiln()
        .args(pipeline(&inputs, &out, "q4_0"))
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let kept: Vec<(String, String)> = ["model-f16.gguf", "model-q4_0.gguf"]
        .iter()
        .map(|f| (f.to_string(), sha256_file(&out.join(f))))
        .collect();
    // 2: files limited to 2,048,000 bytes (4000 blocks of 512): Q8_0 (2.3 MiB) cannot be written
    let args = pipeline(&inputs, &out, "q4_0,q8_0")
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        "ulimit -f 4000; trap '' XFSZ; exec '{}' {args}",
        env!("CARGO_BIN_EXE_kiln")
    );
    let o: Output = Command::new("/bin/sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_exit(&o, 2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("model-q8_0.gguf"), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.join("model-q8_0.gguf").exists());
    for (f, h) in &kept {
        assert_eq!(&sha256_file(&out.join(f)), h, "{f} changed");
    }
    let staged: Vec<_> = walk(&out)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("kiln-partial"))
        .collect();
    assert!(staged.is_empty(), "partial files left: {staged:?}");
    // 3: with room again the run completes and every checksum holds
    let o = kiln()
        .args(pipeline(&inputs, &out, "q4_0,q8_0"))
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("skip merge"));
    let o = kiln().args(["verify", ps(&out)]).output().unwrap();
    assert_exit(&o, 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v
}
