//! Reading manifest documents: which kind a document is, the entries of an index, and the
//! config and layers of an image manifest.
//!
//! Only the fields fd needs are read, with our own small serde types, so that documents
//! from both Docker and OCI producers (which differ in optional fields) are accepted as long
//! as what matters is there. The bytes themselves are kept untouched by the caller.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::BlobDesc;
use super::error::GatewayError;
use super::media::{self, ManifestKind};
use super::platform::Platform;
use super::reference::validate_digest;

/// Just enough of any manifest to tell what it is.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    config: Option<IgnoredAny>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<IgnoredAny>,
}

/// A content descriptor, as found in indexes and manifests.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<PlatformDoc>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// A platform as written in an index entry.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct PlatformDoc {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
struct IndexDoc {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageDoc {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Tells an image manifest from an index and returns its media type. The media type comes
/// from the document because the protocol library does not hand back the response's
/// `Content-Type`; OCI documents may omit it, and then their shape decides.
pub(crate) fn identify(
    body: &[u8],
    reference: &str,
) -> Result<(ManifestKind, String), GatewayError> {
    let invalid = |reason: String| GatewayError::InvalidManifest {
        reference: reference.to_string(),
        reason,
    };
    let probe: Probe =
        serde_json::from_slice(body).map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
    let schema1 = probe.schema_version == Some(1)
        || probe.fs_layers.is_some()
        || probe.media_type.as_deref().is_some_and(media::is_schema1);
    if schema1 {
        return Err(GatewayError::Schema1 {
            reference: reference.to_string(),
        });
    }
    if probe.schema_version != Some(2) {
        return Err(invalid(format!(
            "schemaVersion is {}, expected 2",
            probe
                .schema_version
                .map_or_else(|| "missing".to_string(), |v| v.to_string())
        )));
    }
    match probe.media_type {
        Some(mt) => match media::manifest_kind(&mt) {
            Some(kind) => Ok((kind, mt)),
            None => Err(GatewayError::UnsupportedMediaType {
                what: "manifest".into(),
                media_type: mt,
            }),
        },
        None if probe.manifests.is_some() => {
            Ok((ManifestKind::Index, media::OCI_INDEX.to_string()))
        }
        None if probe.config.is_some() => {
            Ok((ManifestKind::Image, media::OCI_MANIFEST.to_string()))
        }
        None => Err(invalid(
            "it has neither \"config\" nor \"manifests\"".into(),
        )),
    }
}

/// Picks the entry of an index for `want`; the error lists the platforms on offer.
pub(crate) fn choose_platform(
    body: &[u8],
    want: &Platform,
    reference: &str,
) -> Result<Descriptor, GatewayError> {
    let index: IndexDoc =
        serde_json::from_slice(body).map_err(|e| GatewayError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!("bad index: {e}"),
        })?;
    let mut available: Vec<String> = Vec::new();
    let mut chosen = None;
    for entry in index.manifests {
        let Some(p) = &entry.platform else { continue };
        // Build tools add attestation documents to indexes under an `unknown` platform;
        // they are not images and would only confuse the list of choices.
        let attestation = entry
            .annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest");
        if attestation || p.os == "unknown" {
            continue;
        }
        let name = match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        };
        if !available.contains(&name) {
            available.push(name);
        }
        if chosen.is_none() && want.matches(&p.os, &p.architecture, p.variant.as_deref()) {
            chosen = Some(entry);
        }
    }
    let entry = chosen.ok_or_else(|| GatewayError::NoMatchingPlatform {
        reference: reference.to_string(),
        wanted: want.to_string(),
        available,
    })?;
    check_digest(&entry.digest)?;
    if !entry.media_type.is_empty() {
        match media::manifest_kind(&entry.media_type) {
            Some(ManifestKind::Image) => {}
            Some(ManifestKind::Index) => {
                return Err(GatewayError::InvalidManifest {
                    reference: reference.to_string(),
                    reason: format!(
                        "the entry for {want} is itself an index ({}); nested indexes are not supported",
                        entry.digest
                    ),
                });
            }
            None => {
                return Err(GatewayError::UnsupportedMediaType {
                    what: "index entry".into(),
                    media_type: entry.media_type.clone(),
                });
            }
        }
    }
    Ok(entry)
}

/// The config and layers of an image manifest, checked: sha256 digests, an image config,
/// and layer media types this client can unpack.
pub(crate) fn image_parts(
    body: &[u8],
    reference: &str,
) -> Result<(BlobDesc, Vec<BlobDesc>), GatewayError> {
    let doc: ImageDoc =
        serde_json::from_slice(body).map_err(|e| GatewayError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!("bad image manifest: {e}"),
        })?;
    check_digest(&doc.config.digest)?;
    if !media::is_image_config(&doc.config.media_type) {
        return Err(GatewayError::UnsupportedMediaType {
            what: "config".into(),
            media_type: doc.config.media_type,
        });
    }
    let config = BlobDesc {
        digest: doc.config.digest,
        size: doc.config.size,
        media_type: doc.config.media_type,
    };
    let mut layers = Vec::with_capacity(doc.layers.len());
    for l in doc.layers {
        check_digest(&l.digest)?;
        media::layer_compression(&l.media_type)?;
        layers.push(BlobDesc {
            digest: l.digest,
            size: l.size,
            media_type: l.media_type,
        });
    }
    Ok((config, layers))
}

/// A digest this client can verify, or an error naming it.
pub(crate) fn check_digest(d: &str) -> Result<(), GatewayError> {
    validate_digest(d).map_err(|reason| GatewayError::UnsupportedDigest {
        digest: d.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn index() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
              {{"mediaType":"{}","digest":"{D1}","size":10,"platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"mediaType":"{}","digest":"{D2}","size":20,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{}","digest":"{D3}","size":30,"platform":{{"os":"unknown","architecture":"unknown"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}
            ]}}"#,
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            media::OCI_MANIFEST,
            media::OCI_MANIFEST
        )
    }

    #[test]
    fn identifies_documents() {
        let idx = index();
        assert_eq!(
            identify(idx.as_bytes(), "r").expect("index").0,
            ManifestKind::Index
        );
        let bare_oci = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(
            identify(bare_oci, "r").expect("oci"),
            (ManifestKind::Image, media::OCI_MANIFEST.to_string())
        );
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}"}}"#,
            media::DOCKER_MANIFEST_LIST
        );
        assert_eq!(
            identify(docker.as_bytes(), "r").expect("list").0,
            ManifestKind::Index
        );
        let s1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        let e = identify(s1, "h/r:t").expect_err("schema1");
        assert!(matches!(e, GatewayError::Schema1 { .. }), "{e}");
        assert!(e.to_string().contains("schema 1"));
        let art = br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#;
        assert!(matches!(
            identify(art, "r").expect_err("artifact"),
            GatewayError::UnsupportedMediaType { .. }
        ));
        assert!(matches!(
            identify(b"<html>", "r").expect_err("html"),
            GatewayError::InvalidManifest { .. }
        ));
    }

    #[test]
    fn platform_choice_and_listing() {
        let idx = index();
        let amd = Platform::parse("linux/amd64").expect("p");
        assert_eq!(
            choose_platform(idx.as_bytes(), &amd, "r")
                .expect("amd")
                .digest,
            D1
        );
        let arm = Platform::parse("linux/arm64").expect("p");
        let e = choose_platform(idx.as_bytes(), &arm, "r").expect("arm");
        assert_eq!((e.digest.as_str(), e.size), (D2, 20));
        let s390 = Platform::parse("linux/s390x").expect("p");
        let e = choose_platform(idx.as_bytes(), &s390, "h/r:t").expect_err("none");
        assert_eq!(
            e.to_string(),
            "no manifest for platform linux/s390x in index of h/r:t \
             (available: linux/amd64, linux/arm64/v8)"
        );
    }

    #[test]
    fn image_parts_check_layers() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{D1}","size":5}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{D2}","size":7}}]}}"#,
            media::OCI_CONFIG
        );
        let (c, l) = image_parts(m.as_bytes(), "r").expect("parts");
        assert_eq!((c.digest.as_str(), c.size), (D1, 5));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].size, 7);
        let bad = m.replace("tar+zstd", "tar+lz4");
        let e = image_parts(bad.as_bytes(), "r").expect_err("lz4");
        assert_eq!(
            e.to_string(),
            "unsupported layer media type application/vnd.oci.image.layer.v1.tar+lz4"
        );
        let bad = m.replace(D2, "sha512:00");
        assert!(matches!(
            image_parts(bad.as_bytes(), "r").expect_err("digest"),
            GatewayError::UnsupportedDigest { .. }
        ));
    }
}
