//! Media types this client understands, and what they say about a document or layer.
//!
//! Both the Docker schema 2 and the OCI spellings are accepted because registries hold both
//! and convert neither. Schema 1 is recognised only to refuse it with a useful message.

use super::error::GatewayError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 1 (refused).
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Signed Docker image manifest, schema 1 (refused).
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The manifest types sent in `Accept` headers.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip-compressed tar.
    Gzip,
    /// zstd-compressed tar.
    Zstd,
}

/// What a layer's media type says about its compression. Foreign and non-distributable
/// layers are accepted like ordinary ones: they are fetched from the same registry.
pub fn layer_compression(media_type: &str) -> Result<Compression, GatewayError> {
    let mt = base_type(media_type);
    let c = match mt {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
        _ => {
            return Err(GatewayError::UnsupportedMediaType {
                what: "layer".into(),
                media_type: media_type.to_string(),
            });
        }
    };
    Ok(c)
}

/// Whether a config media type belongs to a container image (rather than some other
/// artifact stored in a registry).
pub(crate) fn is_image_config(media_type: &str) -> bool {
    matches!(base_type(media_type), OCI_CONFIG | DOCKER_CONFIG)
}

/// The two kinds of manifest documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManifestKind {
    /// One image: config and layers.
    Image,
    /// An index or manifest list: one entry per platform.
    Index,
}

/// What a manifest media type names; `None` for anything this client does not handle
/// (schema 1 included, which callers check first).
pub(crate) fn manifest_kind(media_type: &str) -> Option<ManifestKind> {
    match base_type(media_type) {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(ManifestKind::Image),
        OCI_INDEX | DOCKER_MANIFEST_LIST => Some(ManifestKind::Index),
        _ => None,
    }
}

/// Whether a media type is Docker schema 1.
pub(crate) fn is_schema1(media_type: &str) -> bool {
    matches!(
        base_type(media_type),
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED
    )
}

/// The media type without parameters (`; charset=...`) or surrounding space.
fn base_type(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or(media_type).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                None,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.zstd", Zstd),
            ("application/vnd.oci.image.layer.v1.tar+gzip; x=y", Gzip),
        ] {
            assert_eq!(layer_compression(mt).expect(mt), c, "{mt}");
        }
        for mt in [
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "application/octet-stream",
            "",
        ] {
            let e = layer_compression(mt).expect_err(mt);
            assert!(matches!(e, GatewayError::UnsupportedMediaType { .. }));
            assert_eq!(e.to_string(), format!("unsupported layer media type {mt}"));
        }
    }

    #[test]
    fn manifest_types() {
        assert_eq!(manifest_kind(OCI_MANIFEST), Some(ManifestKind::Image));
        assert_eq!(manifest_kind(DOCKER_MANIFEST), Some(ManifestKind::Image));
        assert_eq!(manifest_kind(OCI_INDEX), Some(ManifestKind::Index));
        assert_eq!(
            manifest_kind(DOCKER_MANIFEST_LIST),
            Some(ManifestKind::Index)
        );
        assert_eq!(manifest_kind(DOCKER_SCHEMA1), None);
        assert!(is_schema1(DOCKER_SCHEMA1_SIGNED));
        assert!(!is_schema1(OCI_MANIFEST));
        assert!(is_image_config(OCI_CONFIG));
        assert!(is_image_config(DOCKER_CONFIG));
        assert!(!is_image_config("application/vnd.cncf.helm.config.v1+json"));
    }
}
