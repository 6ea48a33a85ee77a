//! `fd load`: import images from archives on disk, with no registry involved.
//!
//! Accepts an OCI image layout (a directory, or a tar of one, as `skopeo copy oci-archive:`
//! writes) and a docker-archive tar (`docker save`). Every blob is checked against its digest
//! exactly as a pull checks it; a docker-archive has no registry manifest, so fd writes an OCI
//! manifest for it, which then becomes the image's digest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use fd_node::{Compression, ImageImport, ImageMeta, Store};
use serde_json::{Value, json};
use sha2::Digest;

use crate::output;

#[derive(Debug, Args)]
pub(crate) struct LoadArgs {
    /// An OCI layout directory, an OCI archive tar, or a docker-archive tar.
    path: PathBuf,
    /// Name the image(s) REF instead of the names recorded in the archive.
    #[arg(long, value_name = "REF")]
    name: Option<String>,
}

pub(crate) fn run(args: LoadArgs) -> Result<()> {
    let started = Instant::now();
    let store = Arc::new(Store::open_default().context("opening the store")?);
    let meta = match std::fs::metadata(&args.path) {
        Ok(meta) => meta,
        Err(e) => bail!(
            "{}: {e}; fd load takes an OCI layout directory or an image archive (.tar)",
            args.path.display()
        ),
    };

    // A tar is unpacked into the store's temp dir first; it is removed whatever happens.
    let _cleanup;
    let root = if meta.is_dir() {
        args.path.clone()
    } else {
        let dir = store.tmp_path("load");
        _cleanup = RemoveOnDrop(dir.clone());
        fs_err::create_dir_all(&dir)?;
        let file = fs_err::File::open(&args.path)?;
        // The tar reader's own message can quote raw bytes of a file that is not a tar at all,
        // so the user gets a plain sentence and the detail goes to the debug log.
        if let Err(e) = tar::Archive::new(std::io::BufReader::new(file)).unpack(&dir) {
            tracing::debug!(error = %e, "unpacking the archive failed");
            bail!(
                "{} is not a complete tar archive (truncated, damaged, or not a tar file)",
                args.path.display()
            );
        }
        dir
    };

    let stem = args
        .path
        .file_stem()
        .and_then(|s| s.to_str())
        .map(sanitize_name)
        .unwrap_or_else(|| "image".to_string());
    let loaded = if root.join("oci-layout").exists() && root.join("index.json").exists() {
        load_oci_layout(&store, &root, &stem, args.name.as_deref())?
    } else if root.join("manifest.json").exists() {
        load_docker_archive(&store, &root, args.name.as_deref())?
    } else {
        bail!(
            "{} is neither an OCI layout (oci-layout + index.json) nor a docker-archive (manifest.json)",
            args.path.display()
        );
    };
    for reference in &loaded {
        output::status("Loaded", reference);
    }
    output::status(
        "Finished",
        format_args!(
            "{} image(s) in {}",
            loaded.len(),
            output::duration(started.elapsed())
        ),
    );
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sanitize_name(s: &str) -> String {
    let s: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() { "image".into() } else { s }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs_err::read(path)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn blob_path(root: &Path, digest: &str) -> Result<PathBuf> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        bail!("unsupported digest algorithm in {digest:?}: fd reads sha256 blobs");
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("malformed digest {digest:?}");
    }
    let path = root.join("blobs/sha256").join(hex);
    if !path.is_file() {
        bail!(
            "the layout is incomplete: blob {digest} is missing ({})",
            path.display()
        );
    }
    Ok(path)
}

fn load_oci_layout(
    store: &Arc<Store>,
    root: &Path,
    stem: &str,
    name: Option<&str>,
) -> Result<Vec<String>> {
    let index = read_json(&root.join("index.json"))?;
    let descriptors = index["manifests"].as_array().cloned().unwrap_or_default();
    if descriptors.is_empty() {
        bail!("{}: index.json lists no images", root.display());
    }
    if name.is_some() && descriptors.len() > 1 {
        bail!(
            "{} holds {} images; --name can name only one (load without --name to keep their names)",
            root.display(),
            descriptors.len()
        );
    }
    let mut loaded = Vec::new();
    for desc in &descriptors {
        let digest = desc["digest"]
            .as_str()
            .context("index.json entry without a digest")?;
        let media_type = desc["mediaType"].as_str().unwrap_or_default();
        let annotation = desc["annotations"]["org.opencontainers.image.ref.name"].as_str();
        let reference = match (name, annotation) {
            (Some(n), _) => fd_gateway::ImageRef::parse(n)?.to_string(),
            (None, Some(a)) if a.contains('/') => fd_gateway::ImageRef::parse(a)?.to_string(),
            (None, Some(tag)) => {
                fd_gateway::ImageRef::parse(&format!("localhost/{stem}:{tag}"))?.to_string()
            }
            (None, None) => format!("localhost/{stem}@{digest}"),
        };
        let (index_digest, manifest_digest, manifest_type) =
            if media_type.contains("index") || media_type.contains("manifest.list") {
                let (m, t) = choose_platform(root, digest)?;
                (Some((digest.to_string(), media_type.to_string())), m, t)
            } else {
                (None, digest.to_string(), media_type.to_string())
            };
        import_manifest(
            store,
            root,
            &reference,
            index_digest,
            &manifest_digest,
            &manifest_type,
        )?;
        loaded.push(reference);
    }
    Ok(loaded)
}

/// Picks the host's platform from a nested index (the first entry when none says).
fn choose_platform(root: &Path, index_digest: &str) -> Result<(String, String)> {
    let index = read_json(&blob_path(root, index_digest)?)?;
    let host = fd_gateway::Platform::host();
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let chosen = entries
        .iter()
        .find(|m| {
            m["platform"]["os"] == host.os.as_str()
                && m["platform"]["architecture"] == host.architecture.as_str()
        })
        .or_else(|| entries.first())
        .context("nested index lists no manifests")?;
    Ok((
        chosen["digest"]
            .as_str()
            .context("manifest without digest")?
            .to_string(),
        chosen["mediaType"].as_str().unwrap_or_default().to_string(),
    ))
}

fn import_manifest(
    store: &Arc<Store>,
    root: &Path,
    reference: &str,
    index: Option<(String, String)>,
    manifest_digest: &str,
    manifest_type: &str,
) -> Result<()> {
    let import = ImageImport::begin(store.clone())?;
    if let Some((digest, media_type)) = &index {
        import.put_verified_bytes(digest, media_type, &fs_err::read(blob_path(root, digest)?)?)?;
    }
    let manifest_bytes = fs_err::read(blob_path(root, manifest_digest)?)?;
    let manifest: Value =
        serde_json::from_slice(&manifest_bytes).context("manifest is not valid JSON")?;
    let manifest_type = manifest["mediaType"]
        .as_str()
        .unwrap_or(manifest_type)
        .to_string();
    import.put_verified_bytes(manifest_digest, &manifest_type, &manifest_bytes)?;

    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest without config")?;
    let config_type = manifest["config"]["mediaType"].as_str().unwrap_or_default();
    let config = fs_err::read(blob_path(root, config_digest)?)?;
    import.put_verified_bytes(config_digest, config_type, &config)?;

    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let diff_ids = crate::pull::diff_ids(&config, layers.len())?;
    let mut digests = Vec::new();
    let mut blob_size = 0;
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        let digest = layer["digest"].as_str().context("layer without digest")?;
        let size = layer["size"].as_u64().context("layer without size")?;
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        if !import.has_layer(digest)? {
            let path = blob_path(root, digest)?;
            import.put_blob_file(digest, size, media_type, &path)?;
            let file = std::io::BufReader::new(fs_err::File::open(&path)?);
            import.ingest_layer(
                digest,
                crate::pull::compression(media_type)?,
                file,
                Some(diff_id),
            )?;
        }
        digests.push(digest.to_string());
        blob_size += size;
    }
    import.commit(ImageMeta {
        reference: reference.to_string(),
        manifest_digest: manifest_digest.to_string(),
        index_digest: index.map(|(d, _)| d),
        config_digest: config_digest.to_string(),
        layers: digests,
        blob_size,
    })?;
    Ok(())
}

fn load_docker_archive(store: &Arc<Store>, root: &Path, name: Option<&str>) -> Result<Vec<String>> {
    let manifest = read_json(&root.join("manifest.json"))?;
    let items = manifest.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        bail!("manifest.json lists no images");
    }
    let mut loaded = Vec::new();
    for item in &items {
        let config_path = root.join(safe_rel(
            item["Config"]
                .as_str()
                .context("manifest.json entry without Config")?,
        )?);
        let config = fs_err::read(&config_path)?;
        let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&config)));
        let layer_paths = item["Layers"].as_array().cloned().unwrap_or_default();
        let diff_ids = crate::pull::diff_ids(&config, layer_paths.len())?;

        let import = ImageImport::begin(store.clone())?;
        import.put_verified_bytes(
            &config_digest,
            "application/vnd.oci.image.config.v1+json",
            &config,
        )?;
        let mut layers = Vec::new();
        for (rel, diff_id) in layer_paths.iter().zip(&diff_ids) {
            let path = root.join(safe_rel(rel.as_str().context("non-string layer path")?)?);
            let (digest, size, compression) = hash_file(&path)?;
            let media_type = match compression {
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            if !import.has_layer(&digest)? {
                import.put_blob_file(&digest, size, media_type, &path)?;
                let file = std::io::BufReader::new(fs_err::File::open(&path)?);
                import.ingest_layer(&digest, compression, file, Some(diff_id))?;
            }
            layers.push(json!({"mediaType": media_type, "digest": digest, "size": size}));
        }
        let oci_manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers,
        });
        let manifest_bytes = serde_json::to_vec(&oci_manifest)?;
        let manifest_digest = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&manifest_bytes))
        );
        import.put_verified_bytes(
            &manifest_digest,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest_bytes,
        )?;

        let tag = name
            .map(str::to_string)
            .or_else(|| item["RepoTags"][0].as_str().map(str::to_string));
        let reference = match tag {
            Some(t) => fd_gateway::ImageRef::parse(&t)?.to_string(),
            None => format!("localhost/loaded@{manifest_digest}"),
        };
        let blob_size = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
        import.commit(ImageMeta {
            reference: reference.clone(),
            manifest_digest,
            index_digest: None,
            config_digest,
            layers: layers
                .iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_string))
                .collect(),
            blob_size,
        })?;
        loaded.push(reference);
    }
    Ok(loaded)
}

/// A path inside the archive, refusing absolute paths and `..`.
fn safe_rel(rel: &str) -> Result<&Path> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("archive names a path outside itself: {rel:?}");
    }
    Ok(p)
}

/// sha256 and size of a file, and its compression sniffed from the first bytes.
fn hash_file(path: &Path) -> Result<(String, u64, Compression)> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut magic = Vec::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if magic.len() < 4 {
            magic.extend_from_slice(&buf[..n.min(4)]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let compression = if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    };
    Ok((
        format!("sha256:{}", hex::encode(hasher.finalize())),
        size,
        compression,
    ))
}
