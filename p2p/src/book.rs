//! The peers this store has seen, kept in `$FD_HOME/peers.json`.
//!
//! A short-lived `fd pull` dials these at once instead of waiting for discovery. Several `fd`
//! processes may share one store, so a save merges with what is on disk (newest sighting
//! wins, ranks keep the lowest penalty seen) and replaces the file by rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Result;

/// File name of the peer book inside the store.
pub const BOOK_FILE: &str = "peers.json";
/// Rank lost for an answer that failed verification.
pub const BAD_ANSWER_PENALTY: i32 = 10;
/// Most peers remembered; the least recently seen are forgotten first.
const MAX_PEERS: usize = 256;

/// What is remembered about one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerEntry {
    /// Addresses it was reached at (multiaddrs, newest first).
    pub addrs: Vec<String>,
    /// Unix seconds of the last connection or answer.
    pub last_seen: i64,
    /// Last measured round trip, in microseconds.
    pub rtt_us: Option<u64>,
    /// 0 for a well-behaved peer; lowered by answers that failed verification.
    pub rank: i32,
    /// Answers that failed verification, ever.
    pub bad_answers: u32,
    /// Bytes received from it, ever.
    pub bytes_from: u64,
    /// Microseconds its answers that brought those bytes were out (summed per request, so
    /// overlapping requests count twice: `bytes_from` over this is a per-request rate).
    #[serde(default)]
    pub receive_us: u64,
    /// The complete images it said it holds, when last asked (`fd peers`).
    #[serde(default)]
    pub images: Vec<String>,
}

impl PeerEntry {
    /// Bytes per second per request, when anything was received.
    pub fn throughput(&self) -> Option<f64> {
        (self.receive_us > 0).then(|| self.bytes_from as f64 * 1e6 / self.receive_us as f64)
    }
}

/// All remembered peers, keyed by peer id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerBook {
    pub peers: BTreeMap<String, PeerEntry>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn path(root: &Path) -> PathBuf {
    root.join(BOOK_FILE)
}

impl PeerBook {
    /// The book of the store at `root` (empty when none was saved or it is unreadable: it is
    /// only a hint, never a source of truth).
    pub fn load(root: &Path) -> PeerBook {
        match std::fs::read(path(root)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "ignoring unreadable peer book");
                PeerBook::default()
            }),
            Err(_) => PeerBook::default(),
        }
    }

    /// Records a sighting of `peer` at `addr`.
    pub fn seen(&mut self, peer: &str, addr: Option<&str>) {
        let e = self.peers.entry(peer.to_string()).or_default();
        e.last_seen = now();
        if let Some(addr) = addr {
            e.addrs.retain(|a| a != addr);
            e.addrs.insert(0, addr.to_string());
            e.addrs.truncate(4);
        }
    }

    /// Records a round trip time.
    pub fn rtt(&mut self, peer: &str, rtt: std::time::Duration) {
        let e = self.peers.entry(peer.to_string()).or_default();
        e.rtt_us = Some(rtt.as_micros() as u64);
        e.last_seen = now();
    }

    /// Lowers the rank of a peer whose answer failed verification.
    pub fn penalize(&mut self, peer: &str) {
        let e = self.peers.entry(peer.to_string()).or_default();
        e.rank = e.rank.saturating_sub(BAD_ANSWER_PENALTY);
        e.bad_answers = e.bad_answers.saturating_add(1);
    }

    /// Counts bytes received from a peer, and how long the request that brought them took.
    pub fn received(&mut self, peer: &str, bytes: u64, took: std::time::Duration) {
        let e = self.peers.entry(peer.to_string()).or_default();
        e.bytes_from = e.bytes_from.saturating_add(bytes);
        e.receive_us = e.receive_us.saturating_add(took.as_micros() as u64);
    }

    /// Records the images a peer said it holds.
    pub fn images(&mut self, peer: &str, images: Vec<String>) {
        let e = self.peers.entry(peer.to_string()).or_default();
        e.images = images;
        e.last_seen = now();
    }

    /// Rank of a peer (0 when unknown).
    pub fn rank(&self, peer: &str) -> i32 {
        self.peers.get(peer).map(|e| e.rank).unwrap_or(0)
    }

    /// Sort key: best rank first, then shortest round trip.
    pub fn order_key(&self, peer: &str) -> (i32, u64) {
        let e = self.peers.get(peer);
        (
            -e.map(|e| e.rank).unwrap_or(0),
            e.and_then(|e| e.rtt_us).unwrap_or(u64::MAX),
        )
    }

    /// Merges with the book on disk and writes the result.
    pub fn save(&self, root: &Path) -> Result<()> {
        let mut merged = PeerBook::load(root);
        for (id, mine) in &self.peers {
            let e = merged.peers.entry(id.clone()).or_default();
            if mine.last_seen >= e.last_seen {
                if !mine.addrs.is_empty() {
                    e.addrs = mine.addrs.clone();
                }
                e.last_seen = mine.last_seen;
                if mine.rtt_us.is_some() {
                    e.rtt_us = mine.rtt_us;
                }
                if !mine.images.is_empty() {
                    e.images = mine.images.clone();
                }
            }
            e.rank = e.rank.min(mine.rank);
            e.bad_answers = e.bad_answers.max(mine.bad_answers);
            // Both counters start from the book on disk and only grow, so the larger pair is
            // the more recent one.
            if mine.bytes_from > e.bytes_from {
                e.bytes_from = mine.bytes_from;
                e.receive_us = mine.receive_us;
            }
        }
        if merged.peers.len() > MAX_PEERS {
            let mut by_age: Vec<(i64, String)> = merged
                .peers
                .iter()
                .map(|(k, v)| (v.last_seen, k.clone()))
                .collect();
            by_age.sort();
            let excess = merged.peers.len() - MAX_PEERS;
            for (_, k) in by_age.into_iter().take(excess) {
                merged.peers.remove(&k);
            }
        }
        let json = serde_json::to_vec_pretty(&merged)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let tmp = path(root).with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path(root))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_persist_and_merge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = PeerBook::default();
        a.seen("good", Some("/ip4/10.0.0.1/udp/1/quic-v1"));
        a.seen("bad", Some("/ip4/10.0.0.2/udp/1/quic-v1"));
        a.penalize("bad");
        a.save(dir.path()).expect("save");

        // A second process that only saw "good" must not erase the penalty.
        let mut b = PeerBook::default();
        b.seen("good", None);
        b.save(dir.path()).expect("save");

        let book = PeerBook::load(dir.path());
        assert_eq!(book.rank("bad"), -BAD_ANSWER_PENALTY);
        assert_eq!(book.rank("good"), 0);
        assert!(book.order_key("good") < book.order_key("bad"));
    }
}
