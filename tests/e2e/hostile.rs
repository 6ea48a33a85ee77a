//! Hostile and damaged image input: every case must fail with an error that names the layer
//! and the entry, and must leave no image behind that `fd images` would list.
//!
//! The images are OCI layouts written here in code, byte by byte, and imported with `fd load`,
//! so each case controls exactly what the tar holds.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use sha2::Digest;

/// One layer of a hand-made image.
struct Layer {
    bytes: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn gzip_layer(tar: Vec<u8>) -> Result<Layer> {
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    Ok(Layer {
        bytes: gz.finish()?,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        diff_id,
    })
}

/// Writes an OCI layout with one image made of `layers` and returns the manifest digest.
fn write_layout(dir: &Path, layers: &[Layer]) -> Result<String> {
    let blobs = dir.join("blobs/sha256");
    fs_err::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<String> {
        let d = sha256(bytes);
        fs_err::write(blobs.join(&d[7..]), bytes)?;
        Ok(d)
    };
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = put(&config)?;
    let mut descs = Vec::new();
    for l in layers {
        let d = put(&l.bytes)?;
        descs.push(
            serde_json::json!({"mediaType": l.media_type, "digest": d, "size": l.bytes.len()}),
        );
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))?;
    let manifest_digest = put(&manifest)?;
    fs_err::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs_err::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "t"}}],
        }))?,
    )?;
    Ok(manifest_digest)
}

/// A tar builder that writes headers exactly as given, with no path sanitising.
struct RawTar(Vec<u8>);

impl RawTar {
    fn new() -> RawTar {
        RawTar(Vec::new())
    }

    fn entry(&mut self, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        // set_path refuses `..` and absolute paths, which is exactly what these tests need to
        // write, so the name bytes go into the header directly.
        let name_field = &mut h.as_old_mut().name;
        name_field.fill(0);
        name_field[..name.len()].copy_from_slice(name);
        let link_field = &mut h.as_old_mut().linkname;
        link_field.fill(0);
        link_field[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn file(&mut self, name: &[u8], data: &[u8]) -> &mut Self {
        self.entry(name, tar::EntryType::Regular, b"", data)
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

struct Env {
    home: tempfile::TempDir,
}

impl Env {
    fn new() -> Result<Env> {
        Ok(Env {
            home: tempfile::tempdir()?,
        })
    }

    fn fd(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = Command::new(fd_tests::try_fd_bin()?)
            .args(args)
            .env("FD_HOME", self.home.path().join("store"))
            .env("NO_COLOR", "1")
            .env("FD_MAX_LAYER_BYTES", (32u64 << 20).to_string())
            .output()
            .context("running fd")?;
        Ok(out)
    }

    /// Loads the layout and expects failure; returns stderr.
    fn load_fails(&self, layout: &Path) -> Result<String> {
        let out = self.fd(&["load", &layout.display().to_string()])?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success(),
            "fd load accepted a hostile image; stderr:\n{stderr}"
        );
        ensure!(
            out.status.code() == Some(1),
            "expected exit code 1, got {:?}",
            out.status.code()
        );
        let images = self.fd(&["images", "--json"])?;
        let listed: serde_json::Value = serde_json::from_slice(&images.stdout)?;
        ensure!(
            listed.as_array().is_some_and(|a| a.is_empty()),
            "a failed import left an image: {listed}"
        );
        Ok(stderr)
    }

    fn layout(&self, layers: &[Layer]) -> Result<std::path::PathBuf> {
        let dir = self.home.path().join("layout");
        let _ = fs_err::remove_dir_all(&dir);
        write_layout(&dir, layers)?;
        Ok(dir)
    }
}

fn expect_rejected(tar: Vec<u8>, needles: &[&str]) -> Result<()> {
    let env = Env::new()?;
    let layer = gzip_layer(tar)?;
    let layer_digest = sha256(&layer.bytes);
    let stderr = env.load_fails(&env.layout(&[layer])?)?;
    ensure!(
        stderr.contains(&layer_digest),
        "error does not name the layer {layer_digest}:\n{stderr}"
    );
    for n in needles {
        ensure!(
            stderr.contains(n),
            "error does not mention {n:?}:\n{stderr}"
        );
    }
    Ok(())
}

#[test]
fn hostile_dotdot_path_is_rejected() -> Result<()> {
    expect_rejected(
        RawTar::new()
            .file(b"ok", b"x")
            .file(b"a/../../etc/passwd", b"evil")
            .finish(),
        &["a/../../etc/passwd", ".."],
    )
}

#[test]
fn hostile_absolute_path_is_rejected() -> Result<()> {
    expect_rejected(
        RawTar::new().file(b"/etc/shadow", b"evil").finish(),
        &["/etc/shadow", "absolute"],
    )
}

#[test]
fn hostile_hardlink_outside_root_is_rejected() -> Result<()> {
    let tar = RawTar::new()
        .entry(b"link", tar::EntryType::Link, b"../../etc/passwd", b"")
        .finish();
    expect_rejected(tar, &["link", "hardlink target"])
}

#[test]
fn hostile_symlink_climbing_out_is_rejected() -> Result<()> {
    let tar = RawTar::new()
        .entry(b"a/b", tar::EntryType::Symlink, b"../../../etc", b"")
        .finish();
    expect_rejected(tar, &["a/b", "outside the image root"])
}

#[test]
fn hostile_oversized_pax_header_is_rejected() -> Result<()> {
    // A PAX record of 2 MiB: the tar reader would hold it all in memory.
    let mut record = b" comment=".to_vec();
    record.extend(std::iter::repeat_n(b'x', 2 << 20));
    record.push(b'\n');
    let len = record.len();
    let mut full = format!("{}", len + (len + 8).to_string().len()).into_bytes();
    full.extend_from_slice(&record);
    let tar = RawTar::new()
        .entry(b"pax", tar::EntryType::XHeader, b"", &full)
        .file(b"f", b"x")
        .finish();
    expect_rejected(tar, &["oversized header"])
}

#[test]
fn hostile_decompression_bomb_is_stopped() -> Result<()> {
    // 64 MiB of zeros in one file compresses to about 64 KiB; the test store allows 32 MiB.
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_cksum();
    t.append_data(&mut h, "zeros", std::io::repeat(0).take(64 << 20))?;
    expect_rejected(t.into_inner()?, &["decompression bomb"])
}

#[test]
fn damaged_blob_digest_mismatch_is_rejected() -> Result<()> {
    let env = Env::new()?;
    let layer = gzip_layer(RawTar::new().file(b"hello", b"world").finish())?;
    let digest = sha256(&layer.bytes);
    let dir = env.layout(&[layer])?;
    // Corrupt the layer blob in place: same name, other bytes.
    let path = dir.join("blobs/sha256").join(&digest[7..]);
    let mut bytes = fs_err::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs_err::write(&path, bytes)?;
    let stderr = env.load_fails(&dir)?;
    ensure!(
        stderr.contains("digest mismatch") && stderr.contains(&digest),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn damaged_diff_id_mismatch_is_rejected() -> Result<()> {
    let env = Env::new()?;
    let mut layer = gzip_layer(RawTar::new().file(b"hello", b"world").finish())?;
    layer.diff_id = sha256(b"something else");
    let stderr = env.load_fails(&env.layout(&[layer])?)?;
    ensure!(stderr.contains("diff_id"), "{stderr}");
    Ok(())
}

#[test]
fn valid_handmade_layout_loads_with_whiteouts_applied() -> Result<()> {
    let env = Env::new()?;
    let lower = gzip_layer(
        RawTar::new()
            .file(b"keep", b"1")
            .file(b"gone", b"2")
            .file(b"d/old", b"3")
            .finish(),
    )?;
    let upper = gzip_layer(
        RawTar::new()
            .file(b".wh.gone", b"")
            .entry(b"d/", tar::EntryType::Directory, b"", b"")
            .file(b"d/.wh..wh..opq", b"")
            .file(b"d/new", b"4")
            .finish(),
    )?;
    let out = env.fd(&["load", &env.layout(&[lower, upper])?.display().to_string()])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = env.fd(&["inspect", "--files", "localhost/layout:t"])?;
    ensure!(
        files.status.success(),
        "{}",
        String::from_utf8_lossy(&files.stderr)
    );
    let paths: Vec<String> = String::from_utf8(files.stdout)?
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .map(|v| v["path"].as_str().unwrap_or("").to_string())
        })
        .collect::<Result<_, _>>()?;
    ensure!(
        paths == ["/", "/d", "/d/new", "/keep"],
        "merged tree: {paths:?}"
    );
    Ok(())
}
