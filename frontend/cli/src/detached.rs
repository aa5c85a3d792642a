//! `cio vfio-user` servers started as detached processes (their own
//! process group, their stderr in a log file), by `cio libvirt-hook` and
//! `cio migrate`.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts this program with `args` (which name the server's `--socket`)
/// detached, its stderr in `log_path`; a stale socket at `socket` is
/// removed first (it would look like a listening server).
pub fn spawn(args: &[OsString], socket: &Path, log_path: &Path) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(log_path)
        .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let _ = std::fs::remove_file(socket);
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    Command::new(exe)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting cio vfio-user: {e}"))
}

/// Waits until the server `child` listens on `socket`: an error (with its
/// log) if it exits first or does not listen within `timeout`.
pub fn wait_listening(
    child: &mut Child,
    socket: &Path,
    log_path: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if socket.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let why = std::fs::read_to_string(log_path).unwrap_or_default();
            return Err(format!(
                "cio vfio-user exited ({status}): {}",
                why.trim().trim_start_matches("cio: ")
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no socket at {} after {timeout:?} (log: {})",
                socket.display(),
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
