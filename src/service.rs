//! Running the agent as a service: `devicelink service install` writes a systemd unit (a user
//! unit, or a system unit with `--system`) or, on macOS, a launchd property list, and enables
//! and starts it; `service uninstall` stops it and removes the file.
//!
//! The unit runs this very binary (its absolute path) with `agent` and the flags given, with
//! the data dir spelled out, restarts it when it fails, and raises its open-file limit. A
//! system unit keeps its data in `/var/lib/devicelink` unless `--data-dir` says otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The unit's name (systemd) or label (launchd).
pub const SYSTEMD_UNIT: &str = "devicelink.service";
pub const LAUNCHD_LABEL: &str = "dev.devicelink.agent";
/// A system service's data dir when none is given.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/devicelink";

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot find this program's path: {0}")]
    Exe(std::io::Error),
    #[error("cannot tell where user services go: neither XDG_CONFIG_HOME nor HOME is set")]
    NoHome,
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the service runs and what it runs.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The `devicelink` binary.
    pub exe: PathBuf,
    pub data_dir: PathBuf,
    /// Arguments after `agent` (e.g. `--serve-relay`, `--relay ADDR`, `--listen ADDR`).
    pub agent_args: Vec<String>,
    /// A system service (starts at boot, for every user) instead of the user's own.
    pub system: bool,
    /// The user a system service runs as (systemd `User=`), if not root.
    pub run_as: Option<String>,
}

impl ServiceSpec {
    /// The full command line the service runs.
    pub fn command(&self) -> Vec<String> {
        let mut args = vec![
            self.exe.display().to_string(),
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "agent".to_string(),
        ];
        args.extend(self.agent_args.iter().cloned());
        args
    }
}

/// This binary's absolute path.
pub fn current_exe() -> Result<PathBuf, ServiceError> {
    std::env::current_exe().map_err(ServiceError::Exe)
}

/// The systemd unit for `spec`.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    let exec = spec
        .command()
        .iter()
        .map(|a| systemd_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut unit = String::from(
        "[Unit]\n\
         Description=devicelink agent (local-first sync between your devices)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\n\
         [Service]\n\
         Type=simple\n",
    );
    unit.push_str(&format!("ExecStart={exec}\n"));
    unit.push_str(
        "Restart=on-failure\n\
         RestartSec=2\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=30\n\
         LimitNOFILE=65536\n",
    );
    if spec.system {
        if let Some(user) = &spec.run_as {
            unit.push_str(&format!("User={user}\n"));
        }
        if spec.data_dir == Path::new(SYSTEM_DATA_DIR) {
            unit.push_str("StateDirectory=devicelink\nStateDirectoryMode=0700\n");
        }
    }
    unit.push_str("\n[Install]\n");
    unit.push_str(if spec.system {
        "WantedBy=multi-user.target\n"
    } else {
        "WantedBy=default.target\n"
    });
    unit
}

/// The launchd property list for `spec` (macOS).
pub fn launchd_plist(spec: &ServiceSpec) -> String {
    let args: String = spec
        .command()
        .iter()
        .map(|a| format!("    <string>{}</string>\n", xml_escape(a)))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\
         \x20 <key>Label</key>\n  <string>{LAUNCHD_LABEL}</string>\n\
         \x20 <key>ProgramArguments</key>\n  <array>\n{args}  </array>\n\
         \x20 <key>RunAtLoad</key>\n  <true/>\n\
         \x20 <key>KeepAlive</key>\n  <dict>\n    <key>SuccessfulExit</key>\n    <false/>\n  </dict>\n\
         </dict>\n</plist>\n"
    )
}

/// Quotes one ExecStart argument: `%` and `$` are special to systemd, and arguments with
/// spaces or quotes are double-quoted with C escapes.
fn systemd_quote(arg: &str) -> String {
    let escaped = arg.replace('%', "%%").replace('$', "$$");
    if escaped.is_empty()
        || escaped
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == ';')
    {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        escaped
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Where the service file goes on this platform.
pub fn unit_path(system: bool) -> Result<PathBuf, ServiceError> {
    if cfg!(target_os = "macos") {
        return Ok(if system {
            PathBuf::from(format!("/Library/LaunchDaemons/{LAUNCHD_LABEL}.plist"))
        } else {
            home()?.join(format!("Library/LaunchAgents/{LAUNCHD_LABEL}.plist"))
        });
    }
    if system {
        return Ok(PathBuf::from("/etc/systemd/system").join(SYSTEMD_UNIT));
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => home()?.join(".config"),
    };
    Ok(config.join("systemd/user").join(SYSTEMD_UNIT))
}

fn home() -> Result<PathBuf, ServiceError> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or(ServiceError::NoHome)
}

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    pub path: PathBuf,
    /// Whether the service manager enabled and started it (`Err`: why not, and what to run).
    pub started: Result<(), String>,
}

/// Writes the service file and (unless `start` is false) enables and starts it.
pub fn install(spec: &ServiceSpec, start: bool) -> Result<Installed, ServiceError> {
    let path = unit_path(spec.system)?;
    let text = if cfg!(target_os = "macos") {
        launchd_plist(spec)
    } else {
        systemd_unit(spec)
    };
    let write = |path: &Path| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write(&path).map_err(|source| ServiceError::Write {
        path: path.clone(),
        source,
    })?;
    let started = if start && !cfg!(target_os = "macos") && !systemd_running() {
        Err(format!(
            "systemd is not running on this machine (no /run/systemd/system, e.g. a container or \
             WSL without systemd), so nothing was started: the unit was written to {}; start the \
             agent yourself with: {}",
            path.display(),
            spec.command().join(" ")
        ))
    } else if start {
        enable(spec.system, &path)
    } else {
        Err(format!(
            "not started; start it with: {}",
            start_hint(spec.system, &path)
        ))
    };
    Ok(Installed { path, started })
}

/// Stops and disables the service (unless `stop` is false) and removes its file; returns the
/// file removed, if there was one.
pub fn uninstall(system: bool, stop: bool) -> Result<Option<PathBuf>, ServiceError> {
    let path = unit_path(system)?;
    if stop {
        let result = if cfg!(target_os = "macos") {
            run(Command::new("launchctl").args(["unload", "-w"]).arg(&path))
        } else {
            run(systemctl(system).args(["disable", "--now", SYSTEMD_UNIT]))
        };
        if let Err(e) = result {
            tracing::warn!("could not stop the service: {e}");
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            if stop && !cfg!(target_os = "macos") {
                let _ = run(systemctl(system).arg("daemon-reload"));
            }
            Ok(Some(path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServiceError::Remove { path, source }),
    }
}

/// Whether systemd is the running service manager (its own test: sd_booted).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Why `exe` is a poor binary for a service to run (a build or temporary folder that goes
/// away with `cargo clean` or a reboot), if it is one.
pub fn fragile_binary(exe: &Path) -> Option<String> {
    if exe.components().any(|c| c.as_os_str() == "target") {
        Some(format!(
            "{} is in a build folder (cargo clean removes it)",
            exe.display()
        ))
    } else if exe.starts_with(std::env::temp_dir()) || exe.starts_with("/tmp") {
        Some(format!("{} is in a temporary folder", exe.display()))
    } else {
        None
    }
}

fn enable(system: bool, path: &Path) -> Result<(), String> {
    let result = if cfg!(target_os = "macos") {
        run(Command::new("launchctl").args(["load", "-w"]).arg(path))
    } else {
        run(systemctl(system).arg("daemon-reload"))
            .and_then(|()| run(systemctl(system).args(["enable", "--now", SYSTEMD_UNIT])))
    };
    result.map_err(|e| format!("{e}; start it with: {}", start_hint(system, path)))
}

fn start_hint(system: bool, path: &Path) -> String {
    if cfg!(target_os = "macos") {
        format!("launchctl load -w {}", path.display())
    } else if system {
        format!("systemctl daemon-reload && systemctl enable --now {SYSTEMD_UNIT}")
    } else {
        format!("systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT} (and `loginctl enable-linger $USER` to keep it running after you log out)")
    }
}

fn systemctl(system: bool) -> Command {
    let mut cmd = Command::new("systemctl");
    if !system {
        cmd.arg("--user");
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let program = format!("{:?}", cmd.get_program());
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(system: bool) -> ServiceSpec {
        ServiceSpec {
            exe: "/usr/local/bin/devicelink".into(),
            data_dir: SYSTEM_DATA_DIR.into(),
            agent_args: vec![
                "--serve-relay".into(),
                "--name".into(),
                "my server".into(),
                "--listen".into(),
                "/ip4/0.0.0.0/tcp/4001".into(),
            ],
            system,
            run_as: Some("devicelink".into()),
        }
    }

    #[test]
    fn a_system_unit_runs_the_agent_with_its_flags() {
        let unit = systemd_unit(&spec(true));
        let exec = r#"ExecStart=/usr/local/bin/devicelink --data-dir /var/lib/devicelink agent --serve-relay --name "my server" --listen /ip4/0.0.0.0/tcp/4001"#;
        assert!(unit.contains(&format!("{exec}\n")), "{unit}");
        assert!(unit.contains("User=devicelink\n"));
        assert!(unit.contains("StateDirectory=devicelink\n"));
        assert!(unit.contains("WantedBy=multi-user.target"));
        let user = systemd_unit(&spec(false));
        assert!(!user.contains("User="));
        assert!(user.contains("WantedBy=default.target"));
    }

    #[test]
    fn special_characters_are_quoted() {
        assert_eq!(systemd_quote("100%"), "100%%");
        assert_eq!(systemd_quote("$HOME"), "$$HOME");
        assert_eq!(systemd_quote(r#"a "b""#), r#""a \"b\"""#);
        assert_eq!(systemd_quote(""), r#""""#);
        let plist = launchd_plist(&spec(false));
        assert!(plist.contains("<string>my server</string>"), "{plist}");
        assert!(plist.contains(LAUNCHD_LABEL));
    }
}
