//! fd-gateway: everything fd says to container registries.
//!
//! Today that is the upstream OCI Distribution client in [`client`]: `fd pull` uses it to
//! resolve a reference to exact manifest bytes and to stream verified blobs into files. It
//! holds no store logic; the node crate decides what to keep. The registry mirror that serves
//! a node's store to other fd peers and to docker/podman will live here too.

pub mod client;
pub mod mirror;

pub use client::*;
