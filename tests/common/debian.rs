//! A program from a Debian package, for tests: `apt-get download` and `dpkg -x` under the cache
//! directory, once (no root needed, nothing installed system-wide).

use std::path::PathBuf;
use std::process::Command;

/// `<cache>/<dir>/<file name of path_in_deb>`, unpacked from `package` the first time. A
/// concurrent run renames a whole binary into place too, so none sees half of one.
pub fn debian_binary(cache: PathBuf, package: &str, path_in_deb: &str) -> PathBuf {
    let name = path_in_deb.rsplit('/').next().expect("a file name");
    let bin = cache.join(name);
    if bin.exists() {
        return bin;
    }
    let work = cache.join(format!("download-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work).unwrap();
    let fetched = Command::new("apt-get")
        .args(["download", package])
        .current_dir(&work)
        .status()
        .unwrap_or_else(|e| panic!("running apt-get download {package}: {e}"));
    assert!(fetched.success(), "apt-get download {package} failed");
    let deb = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the downloaded .deb");
    let unpacked = work.join("x");
    let ok = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .expect("dpkg -x");
    assert!(ok.success());
    let tmp = work.join(name);
    std::fs::copy(unpacked.join(path_in_deb), &tmp).unwrap();
    std::fs::rename(&tmp, &bin).unwrap();
    let _ = std::fs::remove_dir_all(work);
    bin
}
