//! `kiln verify`: re-hashes every file a folder's SHA256SUMS lists (a kiln pipeline output folder,
//! a merged HF folder) and reports each mismatch; exit 1 if any file differs or is missing.

use crate::Outcome;
use anyhow::Result;
use kiln::sums;
use std::path::PathBuf;

/// Arguments of `kiln verify`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  kiln verify zh-7b")]
pub struct Args {
    /// The folder holding SHA256SUMS.
    pub dir: PathBuf,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<Outcome> {
    let v = sums::verify_dir(&a.dir, &mut |_| {})?;
    let bad = v.iter().filter(|x| x.status != "OK").count();
    if a.json {
        let j = serde_json::json!({
            "dir": a.dir.display().to_string(),
            "ok": bad == 0,
            "checked": v.len(),
            "failed": bad,
            "files": v,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        for x in &v {
            match x.status {
                "OK" => println!("{}: OK", x.name),
                "MISSING" => println!("{}: MISSING", x.name),
                _ => println!(
                    "{}: FAILED (sha256 {}, expected {})",
                    x.name,
                    x.actual.as_deref().unwrap_or("?"),
                    x.expected
                ),
            }
        }
        if bad > 0 {
            eprintln!(
                "kiln verify: {bad} of {} files did NOT match {}",
                v.len(),
                a.dir.join(sums::SUMS).display()
            );
        } else {
            eprintln!("kiln verify: all {} files match", v.len());
        }
    }
    Ok(if bad == 0 {
        Outcome::Ok
    } else {
        Outcome::CheckFailed
    })
}
