//! Keys kept in the store: the node identity and the team secret.
//!
//! Both are 32 random bytes in files readable by the owner only (0600), written to a temporary
//! name and renamed so that two processes starting at once never see half a key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use rand::RngCore;

use crate::{P2pError, Result};

/// File name of the node identity inside the store.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the team secret inside the store.
pub const TEAM_KEY_FILE: &str = "team.key";
/// Prefix of printed team tokens, so a pasted token of another kind is recognised.
const TOKEN_PREFIX: &str = "fdteam1-";

fn read_key(path: &Path) -> Result<Option<[u8; 32]>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| P2pError::BadFile {
                path: path.to_path_buf(),
                reason: format!("expected 32 key bytes, found {}", bytes.len()),
            })?;
            Ok(Some(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn write_key(path: &Path, key: &[u8; 32]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above is masked by the umask; set it again explicitly.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(key)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// The node's ed25519 keypair from `ROOT/node.key`, created on first use.
pub fn load_or_create_node_key(root: &Path) -> Result<Keypair> {
    let path = root.join(NODE_KEY_FILE);
    let mut secret = match read_key(&path)? {
        Some(k) => k,
        None => {
            let fresh = random_key();
            // Another process may have created it meanwhile: keep whichever landed first.
            if read_key(&path)?.is_none() {
                write_key(&path, &fresh)?;
            }
            read_key(&path)?.ok_or_else(|| P2pError::BadFile {
                path: path.clone(),
                reason: "key vanished right after being written".into(),
            })?
        }
    };
    Keypair::ed25519_from_bytes(&mut secret).map_err(|e| P2pError::BadFile {
        path,
        reason: e.to_string(),
    })
}

/// The shared secret of a team: whoever holds it may fetch from every member.
#[derive(Clone)]
pub struct TeamKey([u8; 32]);

impl std::fmt::Debug for TeamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TeamKey({})", self.id())
    }
}

impl TeamKey {
    /// A new random team key.
    pub fn generate() -> TeamKey {
        TeamKey(random_key())
    }

    /// The raw key bytes (for keyed hashing).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short public name of the team (derived one-way from the key), safe to print.
    pub fn id(&self) -> String {
        let h = blake3::derive_key("fd team id v1", &self.0);
        hex::encode(&h[..6])
    }

    /// The token that `fd team join` accepts.
    pub fn token(&self) -> String {
        format!("{TOKEN_PREFIX}{}", hex::encode(self.0))
    }

    /// Parses a token printed by [`TeamKey::token`].
    pub fn from_token(token: &str) -> Result<TeamKey> {
        let hexpart = token
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| P2pError::BadToken(format!("it does not start with {TOKEN_PREFIX}")))?;
        let bytes = hex::decode(hexpart).map_err(|e| P2pError::BadToken(e.to_string()))?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| P2pError::BadToken(format!("{} key bytes, expected 32", bytes.len())))?;
        Ok(TeamKey(key))
    }

    /// The team key of the store at `root`, if it joined one.
    pub fn load(root: &Path) -> Result<Option<TeamKey>> {
        Ok(read_key(&team_path(root))?.map(TeamKey))
    }

    /// Stores this key as the team of the store at `root` (replacing any earlier team).
    pub fn save(&self, root: &Path) -> Result<()> {
        std::fs::create_dir_all(root)?;
        write_key(&team_path(root), &self.0)
    }
}

fn team_path(root: &Path) -> PathBuf {
    root.join(TEAM_KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_is_stable_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_node_key(dir.path()).expect("create");
        let b = load_or_create_node_key(dir.path()).expect("load");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(dir.path().join(NODE_KEY_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn team_token_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let team = TeamKey::generate();
        let back = TeamKey::from_token(&team.token()).expect("parse");
        assert_eq!(back.as_bytes(), team.as_bytes());
        back.save(dir.path()).expect("save");
        let loaded = TeamKey::load(dir.path()).expect("load").expect("present");
        assert_eq!(loaded.id(), team.id());
        assert!(TeamKey::from_token("fdteam1-zz").is_err());
        assert!(TeamKey::from_token("something else").is_err());
    }
}
