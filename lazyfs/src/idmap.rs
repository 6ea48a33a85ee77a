//! Owners as a container in a user namespace must see them.
//!
//! A rootless container runs in a user namespace whose ids map onto a range the user owns (its
//! own uid for root inside, `/etc/subuid` ranges for the rest). For the container to see the
//! image's owners (root owns `/usr`, uid 1000 owns `/home/user`), the files must be owned on
//! the host by the *mapped* ids, which a rootless unpack achieves by chowning every file. lazyfs
//! instead presents the mapped ids directly in `stat`: nothing is copied or re-owned at start,
//! and the stored index stays unshifted, so one store serves root and rootless mounts alike.
//!
//! An owner outside every mapped range shows as the overflow id 65534 ("nobody"), which is also
//! what the kernel shows for unmapped ids, so such files still resolve and stay readable by
//! their mode bits.

use fd_node::FileIndex;

/// The id the kernel shows for ids without a mapping.
pub const OVERFLOW_ID: u32 = 65534;

/// One line of a `uid_map`/`gid_map`: `count` ids from `inside` (the container's view) map onto
/// ids from `outside` (the host's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

impl IdRange {
    /// Parses `INSIDE:OUTSIDE:COUNT`, the order of `/proc/PID/uid_map`.
    pub fn parse(s: &str) -> Option<IdRange> {
        let mut parts = s.split(':').map(|p| p.trim().parse::<u32>().ok());
        let range = IdRange {
            inside: parts.next()??,
            outside: parts.next()??,
            count: parts.next()??,
        };
        (parts.next().is_none() && range.count > 0).then_some(range)
    }
}

/// The uid and gid maps of a user namespace; empty maps present owners unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
}

impl IdMap {
    pub fn is_identity(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    pub fn uid(&self, id: u32) -> u32 {
        map(&self.uids, id)
    }

    pub fn gid(&self, id: u32) -> u32 {
        map(&self.gids, id)
    }

    /// Rewrites the owners of every entry for presentation.
    pub(crate) fn apply(&self, index: &mut FileIndex) {
        if self.is_identity() {
            return;
        }
        for e in &mut index.entries {
            e.uid = self.uid(e.uid);
            e.gid = self.gid(e.gid);
        }
    }
}

fn map(ranges: &[IdRange], id: u32) -> u32 {
    if ranges.is_empty() {
        return id;
    }
    ranges
        .iter()
        .find(|r| id >= r.inside && id - r.inside < r.count)
        .and_then(|r| r.outside.checked_add(id - r.inside))
        .unwrap_or(OVERFLOW_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idmap_shifts_ids_into_ranges_and_overflows_the_rest() {
        let map = IdMap {
            uids: vec![
                IdRange {
                    inside: 0,
                    outside: 1000,
                    count: 1,
                },
                IdRange {
                    inside: 1,
                    outside: 100_000,
                    count: 65_536,
                },
            ],
            gids: vec![],
        };
        assert_eq!(map.uid(0), 1000);
        assert_eq!(map.uid(1), 100_000);
        assert_eq!(map.uid(1000), 100_999);
        assert_eq!(map.uid(70_000), OVERFLOW_ID);
        assert_eq!(map.gid(5), 5, "an empty gid map leaves gids alone");
    }

    #[test]
    fn idrange_parses_uid_map_lines() {
        assert_eq!(
            IdRange::parse("0:100000:65536"),
            Some(IdRange {
                inside: 0,
                outside: 100_000,
                count: 65_536
            })
        );
        assert_eq!(IdRange::parse("0:1:0"), None);
        assert_eq!(IdRange::parse("0:1"), None);
        assert_eq!(IdRange::parse("a:b:c"), None);
    }
}
