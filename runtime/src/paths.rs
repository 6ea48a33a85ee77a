//! Paths inside a container's root file system, resolved from the host side.
//!
//! A symlink in an image is meant to be read with the image as `/`: an absolute target or a
//! `..` that climbs above the root stays inside it. [`resolve_in_root`] follows links that way,
//! so reading `/etc/passwd` or looking up a command never leaves the image.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::{Result, RuntimeError};

/// Most symlinks followed in one resolution (the kernel's limit).
const MAX_LINKS: usize = 40;

/// The host path of `path` (absolute, as seen inside the container) under `root`, with every
/// symlink followed inside `root`. Components that do not exist are kept as they are.
pub fn resolve_in_root(root: &Path, path: &str) -> std::io::Result<PathBuf> {
    let mut pending: VecDeque<OsString> = components(Path::new(path));
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let host = root.join(&candidate);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&host)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for (i, c) in components(&target).into_iter().enumerate() {
                    pending.insert(i, c);
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

/// The normal and `..` components of a path (`.` and the root dropped).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Finds the program `command` would run inside the image, as `execvp` would: a name with a
/// slash is taken as a path (relative to `cwd`), any other name is searched in `path_var`.
/// Returns the path inside the container. A missing program is [`RuntimeError::NotFound`],
/// one that is a directory or has no execute bit is [`RuntimeError::NotExecutable`].
pub fn find_command(root: &Path, command: &str, path_var: &str, cwd: &str) -> Result<String> {
    let check = |inner: &str| -> std::result::Result<(), String> {
        let host = resolve_in_root(root, inner).map_err(|e| e.to_string())?;
        match std::fs::metadata(&host) {
            Err(_) => Err(String::new()),
            Ok(m) if m.is_dir() => Err("is a directory".into()),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("permission denied".into()),
            Ok(_) => Ok(()),
        }
    };
    if command.contains('/') {
        let inner = if command.starts_with('/') {
            command.to_string()
        } else {
            format!("{}/{command}", cwd.trim_end_matches('/'))
        };
        return match check(&inner) {
            Ok(()) => Ok(inner),
            Err(reason) if reason.is_empty() => Err(RuntimeError::NotFound {
                command: command.into(),
                hint: String::new(),
            }),
            Err(reason) => Err(RuntimeError::NotExecutable {
                command: command.into(),
                reason,
            }),
        };
    }
    let mut refused = None;
    for dir in path_var.split(':') {
        // An empty PATH entry means the working directory, as in execvp.
        let dir = if dir.is_empty() { cwd } else { dir };
        let inner = format!("{}/{command}", dir.trim_end_matches('/'));
        match check(&inner) {
            Ok(()) => return Ok(inner),
            Err(reason) if reason.is_empty() || reason == "is a directory" => {}
            Err(reason) => refused = refused.or(Some(reason)),
        }
    }
    match refused {
        Some(reason) => Err(RuntimeError::NotExecutable {
            command: command.into(),
            reason,
        }),
        None => Err(RuntimeError::NotFound {
            command: command.into(),
            hint: format!(" (searched PATH={path_var})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn links_stay_inside_the_root() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin"))?;
        symlink("usr/bin", root.join("bin"))?;
        symlink("/../../../usr/bin", root.join("climb"))?;
        std::fs::write(root.join("usr/bin/tool"), "")?;
        assert_eq!(
            resolve_in_root(root, "/bin/tool")?,
            root.join("usr/bin/tool")
        );
        assert_eq!(
            resolve_in_root(root, "/climb/tool")?,
            root.join("usr/bin/tool")
        );
        assert_eq!(resolve_in_root(root, "/../etc")?, root.join("etc"));
        symlink("loop", root.join("loop"))?;
        assert!(resolve_in_root(root, "/loop").is_err());
        Ok(())
    }

    #[test]
    fn command_lookup_reports_missing_and_unexecutable() -> Result<()> {
        let dir = tempfile::tempdir().map_err(crate::io_err("tempdir"))?;
        let root = dir.path();
        let setup = || -> std::io::Result<()> {
            std::fs::create_dir_all(root.join("usr/bin"))?;
            symlink("usr/bin", root.join("bin"))?;
            std::fs::write(root.join("usr/bin/run"), "")?;
            std::fs::set_permissions(root.join("usr/bin/run"), PermissionsExt::from_mode(0o755))?;
            std::fs::write(root.join("usr/bin/data"), "")?;
            std::fs::set_permissions(root.join("usr/bin/data"), PermissionsExt::from_mode(0o644))
        };
        setup().map_err(crate::io_err("setup"))?;
        assert_eq!(find_command(root, "run", "/sbin:/bin", "/")?, "/bin/run");
        assert_eq!(find_command(root, "/usr/bin/run", "", "/")?, "/usr/bin/run");
        let missing = find_command(root, "nope", "/bin", "/");
        assert!(matches!(missing, Err(RuntimeError::NotFound { .. })));
        let data = find_command(root, "data", "/bin", "/");
        assert!(matches!(data, Err(RuntimeError::NotExecutable { .. })));
        let dir_cmd = find_command(root, "/usr", "/bin", "/");
        assert!(matches!(dir_cmd, Err(RuntimeError::NotExecutable { .. })));
        Ok(())
    }
}
