//! Node.js packages the tests run (the libsignal interop script, the TypeScript client), each
//! installed once per test process from its lockfile with `npm ci`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Installs the package in `dir` exactly as its `package-lock.json` pins it, unless a previous
/// run left exactly those versions installed; then runs `npm run <script>` for each of
/// `scripts`. Once per folder and process: later callers get the first outcome.
pub fn prepare(dir: &Path, scripts: &[&str]) -> Result<(), String> {
    static DONE: Mutex<BTreeMap<PathBuf, Result<(), String>>> = Mutex::new(BTreeMap::new());
    // Held while installing, so concurrent tests of one binary wait for the one install.
    let mut done = DONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    done.entry(dir.to_owned())
        .or_insert_with(|| {
            install(dir)?;
            scripts
                .iter()
                .try_for_each(|script| npm(dir, &["run", script]))
        })
        .clone()
}

fn install(dir: &Path) -> Result<(), String> {
    let lock = std::fs::read(dir.join("package-lock.json")).map_err(|e| e.to_string())?;
    // npm keeps a copy of what it installed; the same lockfile means nothing to do.
    if std::fs::read(dir.join("node_modules/.package-lock.json"))
        .is_ok_and(|installed| same_packages(&lock, &installed))
    {
        return Ok(());
    }
    npm(dir, &["ci", "--no-audit", "--no-fund", "--loglevel=error"])
}

fn npm(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| {
            format!(
                "this test needs Node.js and npm on PATH (Debian: apt-get install nodejs npm), \
                 to install its packages from the npm registry: {e}"
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "npm {} in {} failed: {}{}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Whether npm's record of installed packages names the same versions as the lockfile.
fn same_packages(lock: &[u8], installed: &[u8]) -> bool {
    let versions = |bytes: &[u8]| -> Option<Vec<(String, String)>> {
        let json: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let mut all: Vec<(String, String)> = json["packages"]
            .as_object()?
            .iter()
            .filter(|(path, _)| !path.is_empty())
            .map(|(path, p)| (path.clone(), p["version"].as_str().unwrap_or("").to_owned()))
            .collect();
        all.sort();
        Some(all)
    };
    versions(lock).is_some_and(|v| Some(v) == versions(installed))
}
