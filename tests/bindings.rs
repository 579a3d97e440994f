//! The bindings as an app developer gets them: `pip install ./bindings/python` into a fresh
//! virtualenv, then pytest (bindings/python/tests) and examples/python/embedded.py;
//! `npm install ./bindings/node` into a fresh app folder, then node:test (bindings/node/test)
//! and examples/node/embedded.mjs; Kotlin and Swift sources generated from the built library
//! (compiled where a toolchain is installed). Each language's tests link an embedded agent by
//! code with a daemon agent process (this build's `devicelink`).
//!
//! Without python3 or node the tests skip, saying why; `DEVICELINK_REQUIRE_BINDINGS=1` (set by
//! .ci/run) turns a skip into a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the bindings' build products and environments live between runs.
fn work_dir() -> PathBuf {
    let dir = repo().join("target").join("bindings-test");
    std::fs::create_dir_all(&dir).expect("create target/bindings-test");
    dir
}

fn skip(reason: &str) {
    assert!(
        std::env::var("DEVICELINK_REQUIRE_BINDINGS").is_err(),
        "DEVICELINK_REQUIRE_BINDINGS is set but {reason}"
    );
    eprintln!("skipped: {reason}");
}

/// Runs `command` to completion within `limit` (killed after it), output captured; panics on a
/// failure with what it printed.
fn run(what: &str, command: &mut Command, limit: Duration) -> Output {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            text
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    output
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn has(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const BUILD_LIMIT: Duration = Duration::from_secs(30 * 60);
const TEST_LIMIT: Duration = Duration::from_secs(5 * 60);

/// A virtualenv with the package installed the way the README says (once per test binary), or
/// why there can be none.
fn python_env() -> Option<PathBuf> {
    static ENV: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        if !has("python3", "--version") {
            skip("python3 is not installed");
            return None;
        }
        let venv = work_dir().join("venv");
        let python = venv.join("bin").join("python");
        if !python.exists() {
            run(
                "python3 -m venv",
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                TEST_LIMIT,
            );
        }
        let pip = |what: &str, args: &[&str]| {
            run(
                what,
                Command::new(&python)
                    .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                    .args(args)
                    .current_dir(repo()),
                BUILD_LIMIT,
            )
        };
        pip("pip install pytest pycrdt", &["pytest", "pycrdt"]);
        // What the README tells users to type.
        pip(
            "pip install ./bindings/python",
            &["--force-reinstall", "--no-deps", "./bindings/python"],
        );
        Some(python)
    })
    .clone()
}

#[test]
fn python_package_installs_and_passes_its_tests() {
    let Some(python) = python_env() else { return };
    let pytest = run(
        "pytest bindings/python/tests",
        Command::new(&python)
            .args([
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "bindings/python/tests",
            ])
            .env("DEVICELINK_BIN", env!("CARGO_BIN_EXE_devicelink"))
            .current_dir(repo()),
        TEST_LIMIT,
    );
    eprintln!("{}", text(&pytest));
    let example = run(
        "examples/python/embedded.py",
        Command::new(&python)
            .arg("examples/python/embedded.py")
            .current_dir(repo()),
        TEST_LIMIT,
    );
    let printed = text(&example);
    assert!(printed.contains("phone sees: Groceries: milk"), "{printed}");
    assert!(printed.contains(r#""done":false"#), "{printed}");

    // The library the wheel shipped, as Kotlin and Swift sources.
    let package = run(
        "locate the installed package",
        Command::new(&python).args([
            "-c",
            "import devicelink, os; print(os.path.dirname(devicelink.__file__))",
        ]),
        TEST_LIMIT,
    );
    let library = PathBuf::from(text(&package).trim()).join("libdevicelink_ffi.so");
    kotlin_and_swift_sources(&library);
}

/// The defaults an app gets, on a real LAN segment: the embedded agent (`AgentConfig(data_dir)`
/// alone) in one namespace, `devicelink --data-dir DIR agent` in the other, paired by code alone.
#[test]
fn python_embedded_with_defaults_pairs_on_a_lan_by_code_alone() {
    let lan = match common::netns::Lan::create() {
        Ok(lan) => lan,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let Some(python) = python_env() else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let daemon = common::process::AgentProcess::start_as_user_in(&lan.ns(1), dir.path());
    let lan_daemon = serde_json::json!({
        "data_dir": daemon.data_dir,
        "socket": daemon.socket,
        "device_id": daemon.device_id,
    });
    let pytest = run(
        "pytest test_lan_defaults.py (in a namespace)",
        Command::new("ip")
            .args(["netns", "exec", &lan.ns(0)])
            .arg(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg("bindings/python/tests/test_lan_defaults.py")
            .env("DEVICELINK_BIN", env!("CARGO_BIN_EXE_devicelink"))
            .env("DEVICELINK_LAN_DAEMON", lan_daemon.to_string())
            .env_remove("XDG_RUNTIME_DIR")
            .current_dir(repo()),
        TEST_LIMIT,
    );
    let printed = text(&pytest);
    assert!(
        printed.contains("1 passed"),
        "the LAN test did not run: {printed}"
    );
    drop(daemon);
}

#[test]
fn node_package_installs_and_passes_its_tests() {
    if let Some(reason) = common::node::unavailable() {
        return skip(&reason);
    }
    // A fresh app folder that installs the package the way the README says.
    let app = work_dir().join("node-app");
    std::fs::create_dir_all(&app).expect("create the app folder");
    std::fs::write(
        app.join("package.json"),
        r#"{ "name": "devicelink-test-app", "private": true }"#,
    )
    .expect("write package.json");
    run(
        "npm install ./bindings/node",
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--foreground-scripts"])
            .arg(repo().join("bindings").join("node"))
            .current_dir(&app),
        BUILD_LIMIT,
    );
    let installed = app.join("node_modules").join("devicelink");
    assert!(
        installed.join("devicelink.node").exists(),
        "npm install did not build the addon at {}",
        installed.display()
    );
    let yjs_from = common::node::node_dir().join("package.json");
    let tests = run(
        "node --test bindings/node/test",
        Command::new("node")
            .args(["--test", "test/"])
            .env("DEVICELINK_BIN", env!("CARGO_BIN_EXE_devicelink"))
            .env("YJS_FROM", &yjs_from)
            .current_dir(repo().join("bindings").join("node")),
        TEST_LIMIT,
    );
    eprintln!("{}", text(&tests));
    let example = run(
        "examples/node/embedded.mjs",
        Command::new("node")
            .arg("examples/node/embedded.mjs")
            .env("DEVICELINK_NODE", &installed)
            .current_dir(repo()),
        TEST_LIMIT,
    );
    let printed = text(&example);
    assert!(printed.contains("phone sees: Groceries: milk"), "{printed}");
    assert!(printed.contains(r#""done":false"#), "{printed}");
}

/// Generates the Kotlin and Swift sources from `library` (uniffi's library mode); compiles them
/// where kotlinc / swiftc are installed.
fn kotlin_and_swift_sources(library: &Path) {
    let out = work_dir().join("generated");
    let _ = std::fs::remove_dir_all(&out);
    run(
        "uniffi-bindgen generate kotlin swift",
        Command::new(env!("CARGO"))
            // The dev profile, as maturin builds it: one build of the generator serves both.
            .args(["run", "-q", "-p", "devicelink-uniffi-bindgen", "--"])
            .args(["generate", "--no-format", "--language", "kotlin"])
            .args(["--language", "swift", "--out-dir"])
            .arg(&out)
            .arg("--library")
            .arg(library)
            .current_dir(repo()),
        BUILD_LIMIT,
    );
    let kotlin = find(&out, "kt").expect("a generated Kotlin file");
    let swift = find(&out, "swift").expect("a generated Swift file");
    let kotlin_text = std::fs::read_to_string(&kotlin).expect("read the Kotlin source");
    let swift_text = std::fs::read_to_string(&swift).expect("read the Swift source");
    for needle in ["class Agent", "fun `pairOpen`", "interface DocListener"] {
        assert!(
            kotlin_text.contains(needle) || kotlin_text.contains(&needle.replace('`', "")),
            "{needle} not in {}",
            kotlin.display()
        );
    }
    for needle in ["class Agent", "func pairOpen", "protocol DocListener"] {
        assert!(
            swift_text.contains(needle),
            "{needle} not in {}",
            swift.display()
        );
    }
    match has("kotlinc", "-version") {
        true => {
            run(
                "kotlinc (generated sources)",
                Command::new("kotlinc")
                    .arg(&kotlin)
                    .arg("-d")
                    .arg(out.join("kotlin-classes")),
                BUILD_LIMIT,
            );
        }
        false => eprintln!(
            "Kotlin: sources generated at {}; not compiled: kotlinc is not installed here \
             (the Android toolchain compiles them with JNA)",
            kotlin.display()
        ),
    }
    match has("swiftc", "--version") {
        true => {
            run(
                "swiftc -parse (generated sources)",
                Command::new("swiftc").arg("-parse").arg(&swift),
                BUILD_LIMIT,
            );
        }
        false => eprintln!(
            "Swift: sources generated at {}; not compiled: swiftc is not installed here \
             (Xcode builds them with the generated module map)",
            swift.display()
        ),
    }
}

fn find(dir: &Path, extension: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find(&path, extension) {
                return Some(found);
            }
        } else if path.extension().is_some_and(|e| e == extension) {
            return Some(path);
        }
    }
    None
}
