//! Where the store lives. One function decides, so every command and test agrees.

use std::path::PathBuf;

/// The store directory: `$FD_HOME` when set (tests and users keep several stores apart this
/// way), else `/var/lib/fd` for root (system-wide, like other container tools), else
/// `$XDG_DATA_HOME/fd`, else `~/.local/share/fd`.
pub fn fd_home() -> PathBuf {
    if let Some(home) = std::env::var_os("FD_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/fd");
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(data).join("fd");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".local/share/fd")
}
