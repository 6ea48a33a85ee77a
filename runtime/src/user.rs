//! `-u USER[:GROUP]`: names looked up in the image's `/etc/passwd` and `/etc/group`, numbers
//! taken as they are (an image needs no passwd file for a numeric user).

use std::path::Path;

use crate::paths::resolve_in_root;
use crate::{Result, RuntimeError};

/// The identity the container's process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Groups the user is a member of in `/etc/group` (besides `gid`).
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd`, if the user has an entry.
    pub home: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_image_file(root: &Path, inner: &str) -> Option<String> {
    let host = resolve_in_root(root, inner).ok()?;
    let bytes = std::fs::read(host).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn passwd(root: &Path) -> Vec<PasswdEntry> {
    let Some(text) = read_image_file(root, "/etc/passwd") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn groups(root: &Path) -> Vec<GroupEntry> {
    let Some(text) = read_image_file(root, "/etc/group") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `spec` (`""`, `NAME`, `UID`, `NAME:GROUP`, `UID:GID`, ...) against the image at
/// `root`. An empty spec is root.
pub fn resolve_user(root: &Path, spec: &str) -> Result<Identity> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let users = passwd(root);
    let entry = match user.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(users.iter().find(|e| e.name == user).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "user {user:?} is not in the image's /etc/passwd (use a numeric uid[:gid])"
            ))
        })?),
    };
    let uid = match entry {
        Some(e) => e.uid,
        // Checked above: a name without an entry has already failed.
        None => user
            .parse()
            .map_err(|_| RuntimeError::Invalid(format!("bad user {user:?}")))?,
    };
    let all_groups = groups(root);
    let gid = match group {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                all_groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| {
                        RuntimeError::Invalid(format!(
                            "group {g:?} is not in the image's /etc/group (use a numeric gid)"
                        ))
                    })?
                    .gid
            }
        },
        _ => entry.map(|e| e.gid).unwrap_or(0),
    };
    let mut additional_gids = Vec::new();
    if let Some(e) = entry {
        for g in &all_groups {
            if g.members.contains(&e.name) && g.gid != gid {
                additional_gids.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        additional_gids,
        home: entry.map(|e| e.home.clone()).filter(|h| !h.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> std::io::Result<tempfile::TempDir> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("etc"))?;
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )?;
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nappgrp:x:1001:\nwheel:x:10:app,other\n",
        )?;
        Ok(dir)
    }

    #[test]
    fn names_and_numbers() -> Result<()> {
        let dir = image().map_err(crate::io_err("setup"))?;
        let root = dir.path();
        let app = resolve_user(root, "app")?;
        assert_eq!(
            (app.uid, app.gid, app.additional_gids.clone()),
            (1000, 1001, vec![10])
        );
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(resolve_user(root, "1000")?.gid, 1001);
        assert_eq!(resolve_user(root, "app:wheel")?.gid, 10);
        let root_user = resolve_user(root, "")?;
        assert_eq!((root_user.uid, root_user.gid), (0, 0));
        assert!(resolve_user(root, "nobody-here").is_err());
        Ok(())
    }

    #[test]
    fn numbers_need_no_passwd_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(crate::io_err("tempdir"))?;
        let id = resolve_user(dir.path(), "4242:77")?;
        assert_eq!((id.uid, id.gid, id.home), (4242, 77, None));
        assert_eq!(resolve_user(dir.path(), "4242")?.gid, 0);
        Ok(())
    }
}
