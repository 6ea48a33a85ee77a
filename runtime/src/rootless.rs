//! Rootless runs: `fd run` as an unprivileged user, through a user namespace.
//!
//! The user's own uid and gid become root inside; when `/etc/subuid` and `/etc/subgid` give
//! the user a range, ids from 1 up map onto it (libcontainer writes such maps with the setuid
//! `newuidmap`/`newgidmap`, package uidmap). The image's owners are presented by lazyfs through
//! the same maps, so a file of uid 1000 in the image is uid 1000 inside.
//!
//! Before anything is mounted, [`preflight`] checks what the machine must allow and names the
//! setting or package to change when something is missing: user namespaces (the
//! `user.max_user_namespaces` and `kernel.unprivileged_userns_clone` sysctls), FUSE for users
//! (`/dev/fuse`, the setuid `fusermount3` and `user_allow_other` in `/etc/fuse.conf`, since the
//! namespace's other ids must read the mount), and `newuidmap` when subordinate ranges exist.

use std::path::{Path, PathBuf};

use fd_lazyfs::idmap::{IdMap, IdRange};

use crate::{Result, RuntimeError, io_err};

/// True when this process is not root: runs go through a user namespace.
pub fn is_rootless() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

/// The id maps of a rootless run's user namespace, in `uid_map` order (inside, outside,
/// count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNamespace {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
}

impl UserNamespace {
    /// Maps for the calling user: its ids as root, then its subordinate ranges from 1.
    pub fn for_current_user() -> Result<UserNamespace> {
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let name = user_name(uid);
        let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        let subgid = std::fs::read_to_string("/etc/subgid").unwrap_or_default();
        Ok(UserNamespace {
            uids: maps_for(uid, subordinate_range(&subuid, name.as_deref(), uid)),
            gids: maps_for(gid, subordinate_range(&subgid, name.as_deref(), uid)),
        })
    }

    /// True when more than the user's own id is mapped (which needs newuidmap).
    pub fn has_subordinate_ids(&self) -> bool {
        self.uids.len() > 1 || self.gids.len() > 1
    }

    /// True when gid `gid` inside has a mapping.
    pub fn maps_gid(&self, gid: u32) -> bool {
        self.gids
            .iter()
            .any(|r| gid >= r.inside && gid - r.inside < r.count)
    }

    /// The same maps for lazyfs, which presents the image's owners as host ids.
    pub fn id_map(&self) -> IdMap {
        IdMap {
            uids: self.uids.clone(),
            gids: self.gids.clone(),
        }
    }
}

fn maps_for(own: u32, sub: Option<(u32, u32)>) -> Vec<IdRange> {
    let mut out = vec![IdRange {
        inside: 0,
        outside: own,
        count: 1,
    }];
    if let Some((start, count)) = sub {
        out.push(IdRange {
            inside: 1,
            outside: start,
            count,
        });
    }
    out
}

/// The user's name from the host's password database.
fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// The first `NAME_OR_UID:START:COUNT` line of a subordinate id file for the user.
fn subordinate_range(text: &str, name: Option<&str>, uid: u32) -> Option<(u32, u32)> {
    let uid = uid.to_string();
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let who = f.next()?;
        if Some(who) != name && who != uid {
            return None;
        }
        let start: u32 = f.next()?.trim().parse().ok()?;
        let count: u32 = f.next()?.trim().parse().ok()?;
        (count > 0).then_some((start, count))
    })
}

fn rootless_error(msg: String) -> RuntimeError {
    RuntimeError::Invalid(format!("rootless fd run: {msg}"))
}

fn read_sysctl(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// True when this process may open `path` for reading and writing.
fn can_read_write(path: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the call.
    unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

/// A program on `PATH` (or in the usual system directories).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True when `/etc/fuse.conf` lets users mount with `allow_other`.
pub fn fuse_allows_other(conf: &str) -> bool {
    conf.lines().any(|l| l.trim() == "user_allow_other")
}

/// Checks what a rootless run needs, with an error that says what to change.
pub fn preflight(ns: &UserNamespace) -> Result<()> {
    if read_sysctl("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Err(rootless_error(
            "user namespaces are disabled on this machine (sysctl user.max_user_namespaces = 0); \
             enable them with `sysctl -w user.max_user_namespaces=15000`, or run fd as root"
                .into(),
        ));
    }
    if read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Err(rootless_error(
            "unprivileged user namespaces are disabled (sysctl \
             kernel.unprivileged_userns_clone = 0); enable them with \
             `sysctl -w kernel.unprivileged_userns_clone=1`, or run fd as root"
                .into(),
        ));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(rootless_error(
            "FUSE is not available: /dev/fuse is missing (load the module with \
             `modprobe fuse`; in a container, pass the device in)"
                .into(),
        ));
    }
    // fusermount3 opens the device as the calling user, so its mode decides.
    if !can_read_write("/dev/fuse") {
        return Err(rootless_error(
            "FUSE is not available to users: /dev/fuse is not readable and writable by you \
             (it is usually mode 0666; make it so with `chmod 0666 /dev/fuse` as root)"
                .into(),
        ));
    }
    if find_program("fusermount3").is_none() {
        return Err(rootless_error(
            "mounting the image as a user needs the setuid fusermount3: `apt install fuse3`".into(),
        ));
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !fuse_allows_other(&conf) {
        return Err(rootless_error(
            "the image mount must be readable by the container's other users, which FUSE \
             allows only with a line `user_allow_other` in /etc/fuse.conf; add it (as root)"
                .into(),
        ));
    }
    if ns.has_subordinate_ids()
        && (find_program("newuidmap").is_none() || find_program("newgidmap").is_none())
    {
        return Err(rootless_error(
            "/etc/subuid gives you a range of ids, and mapping it needs newuidmap and \
             newgidmap: `apt install uidmap`"
                .into(),
        ));
    }
    Ok(())
}

/// Moves the calling process (which must have no other thread) into a new user namespace
/// with `ns`'s maps and a new mount namespace owned by it. Afterwards the process is root
/// there: it may mount the overlay, and libcontainer, seeing it is in a user namespace,
/// runs the container in its rootless mode inside it.
///
/// This is done here rather than by libcontainer (which can make the namespace from the
/// spec) because libcontainer 0.7 on a host with cgroup v1 hierarchies always moves the
/// container into a v1 cgroup, which a user cannot create, and fails; only its cgroup v2
/// manager leaves the process where it is when the cgroup is not writable. Inside a mount
/// namespace of its own the helper can show it the host's cgroup v2 hierarchy alone (see
/// [`show_unified_cgroup_only`]).
pub fn enter_user_namespace(ns: &UserNamespace) -> Result<()> {
    // SAFETY: getpid, getuid and getgid have no preconditions.
    let (pid, uid, gid) = unsafe { (libc::getpid(), libc::getuid(), libc::getgid()) };
    // With subordinate ranges the maps are written by the setuid newuidmap/newgidmap, which
    // must run outside the new namespace: start them first, waiting for a line on stdin.
    let mut writers = Vec::new();
    if ns.has_subordinate_ids() {
        for (program, ranges) in [("newuidmap", &ns.uids), ("newgidmap", &ns.gids)] {
            let mut args = vec![pid.to_string()];
            for r in ranges {
                args.extend([r.inside, r.outside, r.count].map(|n| n.to_string()));
            }
            let child = std::process::Command::new("sh")
                .arg("-c")
                .arg("read -r _ && exec \"$0\" \"$@\"")
                .arg(program)
                .args(&args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(io_err(format!("starting {program}")))?;
            writers.push((program, child));
        }
    }
    // SAFETY: unshare only changes this process's namespaces; the process is
    // single-threaded, as a new user namespace requires.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
        let error = std::io::Error::last_os_error();
        for (_, mut child) in writers {
            let _ = child.kill();
            let _ = child.wait();
        }
        return Err(rootless_error(format!(
            "cannot create a user namespace ({error}); check the sysctls \
             user.max_user_namespaces and kernel.unprivileged_userns_clone"
        )));
    }
    if writers.is_empty() {
        // Only the user's own ids: a process may write that map itself, once setgroups is
        // denied.
        let write = |file: &str, text: String| {
            std::fs::write(file, text).map_err(io_err(format!("writing {file}")))
        };
        write("/proc/self/setgroups", "deny".into())?;
        write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
        write("/proc/self/gid_map", format!("0 {gid} 1\n"))?;
    } else {
        for (program, mut child) in writers {
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(b"go\n");
            }
            let out = child
                .wait_with_output()
                .map_err(io_err(format!("waiting for {program}")))?;
            if !out.status.success() {
                return Err(rootless_error(format!(
                    "{program} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
    }
    // Mounts made from here on must not reach the host's namespace.
    crate::rundir::make_mounts_private()?;
    Ok(())
}

/// On a host with cgroup v1 hierarchies and the v2 one at `/sys/fs/cgroup/unified`, puts the
/// v2 hierarchy at `/sys/fs/cgroup` in this (private) mount namespace, so libcontainer picks
/// its v2 cgroup manager, which leaves a rootless container in the cgroup it started in when
/// it may not make one. Without such a hierarchy nothing changes.
pub fn show_unified_cgroup_only() -> Result<()> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.is_dir() || crate::rundir::is_cgroup2("/sys/fs/cgroup") {
        return Ok(());
    }
    if !crate::rundir::is_cgroup2("/sys/fs/cgroup/unified") {
        return Ok(());
    }
    crate::rundir::bind_mount(unified, Path::new("/sys/fs/cgroup")).map_err(io_err(
        "showing the cgroup v2 hierarchy to the container runtime",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_found_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:1000\nbad:line\n";
        assert_eq!(
            subordinate_range(text, Some("alice"), 1000),
            Some((100_000, 65_536))
        );
        assert_eq!(subordinate_range(text, None, 1001), Some((200_000, 1000)));
        assert_eq!(subordinate_range(text, Some("bob"), 1002), None);
        let maps = maps_for(1000, Some((100_000, 65_536)));
        assert_eq!(
            maps,
            [
                IdRange {
                    inside: 0,
                    outside: 1000,
                    count: 1
                },
                IdRange {
                    inside: 1,
                    outside: 100_000,
                    count: 65_536
                }
            ]
        );
        let ns = UserNamespace {
            uids: maps.clone(),
            gids: maps_for(1000, None),
        };
        assert!(ns.has_subordinate_ids());
        assert!(!ns.maps_gid(5));
        // The image's uid 1000 shows on the host as the range's 1000th id.
        assert_eq!(ns.id_map().uid(1000), 100_999);
        assert_eq!(ns.id_map().uid(0), 1000);
    }

    #[test]
    fn fuse_conf_needs_the_option_on_a_line_of_its_own() {
        assert!(!fuse_allows_other("#user_allow_other\n"));
        assert!(fuse_allows_other("# x\nuser_allow_other\n"));
    }
}
