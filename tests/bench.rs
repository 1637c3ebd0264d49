//! CLI tests of `kiln bench`: the table and JSON shapes on the small GQA fixture, and clear
//! errors on bad arguments.

mod common;
use common::*;

#[test]
fn bench_prints_a_table_and_json() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = gqa_f16(&fx, tmp.path());
    let m = f16.to_str().unwrap();
    let o = run_kiln(&["bench", "-m", m, "-p", "8", "-n", "3", "-r", "2", "-t", "1"]);
    assert_exit(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("| model |") && lines[0].contains("t/s"));
    assert!(lines[2].contains("| pp8 |") && lines[2].contains("gqa-zh.f16.gguf"));
    assert!(lines[3].contains("| tg3 |") && lines[3].contains(" ± "));
    // llama-bench's size and parameter count
    assert!(
        lines[2].contains("56.88 MiB") && lines[2].contains("29.82 M"),
        "{out}"
    );
    // progress goes to stderr, not stdout
    assert!(String::from_utf8_lossy(&o.stderr).contains("warm-up"));

    let o = run_kiln(&[
        "bench", "-m", m, "-p", "4", "-n", "2", "-r", "3", "-t", "1", "--json", "-q",
    ]);
    assert_exit(&o, 0);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = j.as_array().unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["test"], "pp4");
    assert_eq!(
        (a[0]["n_prompt"].as_u64(), a[0]["n_gen"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(a[1]["test"], "tg2");
    assert_eq!(
        (a[1]["n_prompt"].as_u64(), a[1]["n_gen"].as_u64()),
        (Some(0), Some(2))
    );
    for t in a {
        assert_eq!(t["samples_ns"].as_array().unwrap().len(), 3);
        assert!(t["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(t["stddev_ts"].as_f64().unwrap() >= 0.0);
        assert!(t["avg_ms_per_token"].as_f64().unwrap() > 0.0);
        assert_eq!(t["n_threads"], 1);
        assert_eq!(t["model_n_params"], 29_820_160);
    }
    // only one test
    let o = run_kiln(&[
        "bench", "-m", m, "-p", "0", "-n", "2", "-r", "1", "--json", "-q",
    ]);
    assert_exit(&o, 0);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 1);
    assert_eq!(j[0]["test"], "tg2");
}

#[test]
fn bench_refuses_bad_arguments() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let f16 = gqa_f16(&fx, tmp.path());
    let m = f16.to_str().unwrap();
    for args in [
        vec!["bench", "-m", m, "-r", "0", "-q"],
        vec!["bench", "-m", m, "-p", "0", "-n", "0", "-q"],
        vec!["bench", "-m", "/nonexistent/model.gguf", "-q"],
        vec!["bench", "-m", m, "-p", "100000000", "-q"],
        vec!["bench", "-m", m, "--ntk", "x"],
    ] {
        let o = run_kiln(&args);
        assert_exit(&o, 2);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn device_cuda_is_a_clear_error_and_cpu_is_accepted() {
    for cmd in ["perplexity", "bench", "imatrix"] {
        let text: &[&str] = if cmd == "bench" {
            &[]
        } else {
            &["-f", "t.txt"]
        };
        let args =
            |dev: &'static str| [&[cmd, "-m", "missing.gguf", "--device", dev], text].concat();
        let o = run_kiln(&args("cuda:1"));
        assert_exit(&o, 2);
        let e = String::from_utf8_lossy(&o.stderr);
        // no driver on this machine or in CI; where there is one, the evaluator is not complete
        let why = if kiln::model::cuda::driver_present() {
            "not complete yet"
        } else {
            "no NVIDIA driver found"
        };
        assert!(
            (e.contains(why) || e.contains("no CUDA device 1")) && e.contains("--device cpu"),
            "{cmd}: {e}"
        );
        // --device cpu gets past the device check to the missing model
        let o = run_kiln(&args("cpu"));
        assert_exit(&o, 2);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("missing.gguf") && !e.contains("CUDA"),
            "{cmd}: {e}"
        );
    }
}
