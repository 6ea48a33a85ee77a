//! Integration tests of the registry client against a real registry (Debian's
//! `docker-registry`, the CNCF distribution registry) on 127.0.0.1, with images built by
//! `umoci` and pushed by `skopeo`.
//!
//! Every test starts its own registry on a free loopback port and kills it (by PID, from a
//! Drop guard) when done, so tests run in parallel and leave nothing behind. Every client
//! here refuses non-loopback registries before networking, and reads no auth file but the
//! ones a test writes, so nothing leaves this machine.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fd_gateway::{
    BlobDesc, ClientOptions, GatewayError, ImageRef, OCI_INDEX, OCI_MANIFEST, Platform,
    RegistryClient,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const USER: &str = "tester";
const PASSWORD: &str = "correct horse";

/// A registry process; killed and reaped on drop.
struct Registry {
    child: Child,
    host: String,
    _dir: TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry, with HTTP basic auth if `htpasswd` is given.
    fn start(htpasswd: Option<&Path>) -> Registry {
        // Another process may grab the port between our probe and the registry's bind;
        // then the registry exits and we try another one.
        for _ in 0..5 {
            let dir = TempDir::new().expect("tempdir");
            let port = free_port();
            let host = format!("127.0.0.1:{port}");
            let mut config = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\n\
                 http:\n  addr: {host}\n",
                dir.path().join("data").display()
            );
            if let Some(h) = htpasswd {
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    h.display()
                ));
            }
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).expect("write registry config");
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start docker-registry (package docker-registry)");
            let mut reg = Registry {
                child,
                host,
                _dir: dir,
            };
            if reg.wait_ready() {
                return reg;
            }
        }
        panic!("docker-registry did not come up on any of 5 ports");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect(&self.host).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("addr").port()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic bytes that do not compress, so layers have a predictable, useful size.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// An OCI image layout holding small test images.
struct Layout {
    dir: TempDir,
}

/// One image of a layout: its manifest and blobs as the layout holds them.
#[derive(Debug, Clone)]
struct Image {
    manifest_digest: String,
    manifest: Vec<u8>,
    config: BlobDesc,
    config_bytes: Vec<u8>,
    layers: Vec<BlobDesc>,
}

impl Layout {
    fn new() -> Layout {
        let dir = TempDir::new().expect("tempdir");
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(dir.path().join("oci")));
        Layout { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("oci")
    }

    /// Builds image `tag`: one layer holding `payload` (plus a text file), for `arch`.
    fn add_image(&self, tag: &str, payload: &[u8], arch: &str) -> Image {
        let image = format!("{}:{tag}", self.path().display());
        let bundle = self.dir.path().join(format!("bundle-{tag}"));
        run(Command::new("umoci").args(["new", "--image", &image]));
        run(Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        std::fs::write(rootfs.join("payload.bin"), payload).expect("payload");
        std::fs::write(rootfs.join("hello.txt"), format!("image {tag}\n")).expect("hello");
        run(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle));
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--architecture",
            arch,
            "--os",
            "linux",
        ]));
        std::fs::remove_dir_all(&bundle).expect("remove bundle");
        self.image(tag)
    }

    fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        std::fs::read(self.path().join("blobs/sha256").join(hex)).expect("layout blob")
    }

    fn image(&self, tag: &str) -> Image {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.path().join("index.json")).expect("index.json"),
        )
        .expect("index json");
        let entry = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .expect("tag in layout");
        let manifest_digest = entry["digest"].as_str().expect("digest").to_string();
        let manifest = self.blob(&manifest_digest);
        let doc: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest json");
        let desc = |v: &serde_json::Value| BlobDesc {
            digest: v["digest"].as_str().expect("digest").to_string(),
            size: v["size"].as_u64().expect("size"),
            media_type: v["mediaType"].as_str().expect("mediaType").to_string(),
        };
        let config = desc(&doc["config"]);
        let config_bytes = self.blob(&config.digest);
        let layers = doc["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(desc)
            .collect();
        Image {
            manifest_digest,
            manifest,
            config,
            config_bytes,
            layers,
        }
    }

    fn push(&self, tag: &str, dest: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--insecure-policy", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}:{tag}", self.path().display()))
            .arg(format!("docker://{dest}"));
        run(&mut cmd);
    }
}

/// A client that reaches only loopback registries and reads only `auth_files`.
fn client(platform: Option<&str>, auth_files: Vec<PathBuf>) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        insecure_registries: vec![],
        platform: platform.map(|p| Platform::parse(p).expect("platform")),
        auth_files: Some(auth_files),
        plain_http_only: true,
    })
    .expect("client")
}

fn parse(s: &str) -> ImageRef {
    ImageRef::parse(s).expect("reference")
}

/// A registry holding `small:t`, an image with one ~300 KB layer.
fn small_registry() -> (Registry, Layout, Image) {
    let reg = Registry::start(None);
    let layout = Layout::new();
    let img = layout.add_image("t", &noise(1, 300_000), "amd64");
    layout.push("t", &format!("{}/small:t", reg.host), None);
    (reg, layout, img)
}

#[tokio::test]
async fn resolves_by_tag_and_by_digest_with_exact_bytes() {
    let (reg, _layout, img) = small_registry();
    let c = client(None, vec![]);

    let r = parse(&format!("{}/small:t", reg.host));
    let res = c.resolve(&r).await.expect("resolve by tag");
    assert!(res.index.is_none());
    assert_eq!(
        res.manifest.bytes, img.manifest,
        "manifest bytes kept exactly"
    );
    assert_eq!(res.manifest.digest, img.manifest_digest);
    assert_eq!(res.manifest.media_type, OCI_MANIFEST);
    assert_eq!(res.config, img.config);
    assert_eq!(res.layers, img.layers);
    assert_eq!(
        res.reference.digest.as_deref(),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(res.reference.tag.as_deref(), Some("t"));

    // Pinned by digest, with and without tag.
    for s in [
        format!("{}/small@{}", reg.host, img.manifest_digest),
        format!("{}/small:t@{}", reg.host, img.manifest_digest),
    ] {
        let pinned = c.resolve(&parse(&s)).await.expect("resolve by digest");
        assert_eq!(pinned.manifest, res.manifest);
        assert_eq!(pinned.reference.to_string(), s);
    }

    assert_eq!(c.head_digest(&r).await.expect("head"), img.manifest_digest);

    let config = c.fetch_small_blob(&r, &res.config).await.expect("config");
    assert_eq!(config, img.config_bytes);

    // A config blob announced as huge is refused before any request.
    let huge = BlobDesc {
        size: 17 << 20,
        ..res.config.clone()
    };
    let e = c.fetch_small_blob(&r, &huge).await.expect_err("too large");
    assert!(matches!(e, GatewayError::TooLarge { .. }), "{e}");

    // Unknown tag, unknown digest, unknown repository.
    let missing_digest = sha256(b"nothing");
    for s in [
        format!("{}/small:nope", reg.host),
        format!("{}/small@{missing_digest}", reg.host),
        format!("{}/absent:t", reg.host),
    ] {
        let e = c.resolve(&parse(&s)).await.expect_err("missing");
        assert!(matches!(e, GatewayError::NotFound { .. }), "{s}: {e}");
        assert!(e.to_string().contains("manifest not found"), "{e}");
    }
}

#[tokio::test]
async fn index_platform_selection_both_ways_and_error_listing() {
    let reg = Registry::start(None);
    let layout = Layout::new();
    let amd = layout.add_image("amd", &noise(2, 1000), "amd64");
    let arm = layout.add_image("arm", &noise(3, 1000), "arm64");
    layout.push("amd", &format!("{}/multi:amd", reg.host), None);
    layout.push("arm", &format!("{}/multi:arm", reg.host), None);

    // The index is written by hand and PUT as is, so its exact bytes are known.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}},
{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#,
        amd.manifest_digest,
        amd.manifest.len(),
        arm.manifest_digest,
        arm.manifest.len()
    );
    let index_file = layout.dir.path().join("index-upload.json");
    std::fs::write(&index_file, &index).expect("index file");
    run(Command::new("curl")
        .args(["-sSf", "-X", "PUT", "-H"])
        .arg(format!("Content-Type: {OCI_INDEX}"))
        .arg("--data-binary")
        .arg(format!("@{}", index_file.display()))
        .arg(format!("http://{}/v2/multi/manifests/t", reg.host)));
    let index_digest = sha256(index.as_bytes());

    let r = parse(&format!("{}/multi:t", reg.host));
    for (platform, want) in [
        ("linux/amd64", &amd),
        ("linux/arm64", &arm),
        ("linux/arm64/v8", &arm),
    ] {
        let res = client(Some(platform), vec![])
            .resolve(&r)
            .await
            .unwrap_or_else(|e| panic!("{platform}: {e}"));
        let idx = res.index.expect("index returned");
        assert_eq!(idx.bytes, index.as_bytes(), "index bytes kept exactly");
        assert_eq!(idx.digest, index_digest);
        assert_eq!(idx.media_type, OCI_INDEX);
        assert_eq!(res.manifest.bytes, want.manifest, "{platform}");
        assert_eq!(res.manifest.digest, want.manifest_digest);
        assert_eq!(res.layers, want.layers);
        assert_eq!(res.config, want.config);
        // The reference is pinned to the index, as docker reports it.
        assert_eq!(res.reference.digest.as_deref(), Some(index_digest.as_str()));
    }

    // By the index's digest too.
    let pinned = parse(&format!("{}/multi@{index_digest}", reg.host));
    let res = client(Some("linux/arm64"), vec![])
        .resolve(&pinned)
        .await
        .expect("resolve index by digest");
    assert_eq!(res.manifest.digest, arm.manifest_digest);

    let e = client(Some("linux/s390x"), vec![])
        .resolve(&r)
        .await
        .expect_err("no such platform");
    match &e {
        GatewayError::NoMatchingPlatform {
            wanted, available, ..
        } => {
            assert_eq!(wanted, "linux/s390x");
            assert_eq!(available, &["linux/amd64", "linux/arm64/v8"]);
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(
        e.to_string()
            .contains("no manifest for platform linux/s390x in index"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("(available: linux/amd64, linux/arm64/v8)"),
        "{e}"
    );
    let e = client(Some("linux/arm64/v7"), vec![])
        .resolve(&r)
        .await
        .expect_err("wrong variant");
    assert!(matches!(e, GatewayError::NoMatchingPlatform { .. }), "{e}");
}

#[tokio::test]
async fn fetch_blob_verifies_resumes_and_rejects_corrupt_partials() {
    let (reg, layout, img) = small_registry();
    let c = client(None, vec![]);
    let r = parse(&format!("{}/small:t", reg.host));
    let layer = img.layers[0].clone();
    let expected = layout.blob(&layer.digest);
    assert!(
        layer.size > 250_000,
        "layer should be large: {}",
        layer.size
    );
    let dir = TempDir::new().expect("tempdir");

    // A fresh download, with progress reports that only grow and end at the size.
    let dest = dir.path().join("fresh");
    let seen = Mutex::new(Vec::new());
    let record = |n: u64| seen.lock().expect("lock").push(n);
    let stats = c
        .fetch_blob(&r, &layer, &dest, &record)
        .await
        .expect("fetch");
    assert_eq!(stats.bytes_downloaded, layer.size);
    assert_eq!(stats.resumed_from, 0);
    assert_eq!(std::fs::read(&dest).expect("read"), expected);
    let seen = seen.into_inner().expect("lock");
    assert!(!seen.is_empty());
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards"
    );
    assert_eq!(seen.last().copied(), Some(layer.size));

    // Resume from a correct partial file.
    let n = 100_003u64;
    let dest = dir.path().join("partial");
    std::fs::write(&dest, &expected[..n as usize]).expect("partial");
    let first = Mutex::new(None);
    let note_first = |v: u64| {
        first.lock().expect("lock").get_or_insert(v);
    };
    let stats = c
        .fetch_blob(&r, &layer, &dest, &note_first)
        .await
        .expect("resume");
    assert_eq!(stats.resumed_from, n);
    assert_eq!(stats.bytes_downloaded, layer.size - n);
    assert_eq!(std::fs::read(&dest).expect("read"), expected);
    assert_eq!(
        *first.lock().expect("lock"),
        Some(n),
        "progress starts at the kept bytes"
    );

    // A complete file is verified without downloading anything.
    let stats = c
        .fetch_blob(&r, &layer, &dest, &|_| {})
        .await
        .expect("complete");
    assert_eq!(
        (stats.resumed_from, stats.bytes_downloaded),
        (layer.size, 0)
    );

    // A file longer than the blob is started over.
    let dest = dir.path().join("long");
    std::fs::write(&dest, vec![7u8; layer.size as usize + 10]).expect("long");
    let stats = c
        .fetch_blob(&r, &layer, &dest, &|_| {})
        .await
        .expect("restart");
    assert_eq!(
        (stats.resumed_from, stats.bytes_downloaded),
        (0, layer.size)
    );
    assert_eq!(std::fs::read(&dest).expect("read"), expected);

    // A partial file with wrong first bytes: the whole is wrong, and the file goes.
    let dest = dir.path().join("corrupt");
    let mut bad = expected[..n as usize].to_vec();
    bad[0] ^= 0xff;
    std::fs::write(&dest, &bad).expect("corrupt");
    let e = c
        .fetch_blob(&r, &layer, &dest, &|_| {})
        .await
        .expect_err("corrupt partial");
    match &e {
        GatewayError::BlobDigestMismatch {
            expected: want,
            computed,
            removed,
        } => {
            assert_eq!(want, &layer.digest);
            let mut whole = bad.clone();
            whole.extend_from_slice(&expected[n as usize..]);
            assert_eq!(computed, &sha256(&whole));
            assert_eq!(removed.as_deref(), Some(dest.as_path()));
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&layer.digest), "{msg}");
    assert!(!dest.exists(), "corrupt file must be removed");

    // Any blob of the repository can be fetched; a descriptor with the wrong size is caught
    // from the response length, and its file removed.
    let config_as_blob = BlobDesc {
        digest: img.config.digest.clone(),
        size: img.config.size,
        media_type: layer.media_type.clone(),
    };
    let dest = dir.path().join("config-as-layer");
    c.fetch_blob(&r, &config_as_blob, &dest, &|_| {})
        .await
        .expect("config blob");
    assert_eq!(std::fs::read(&dest).expect("read"), img.config_bytes);
    let wrong_size = BlobDesc {
        size: img.config.size + 5,
        ..config_as_blob
    };
    let dest = dir.path().join("wrong-size");
    let e = c
        .fetch_blob(&r, &wrong_size, &dest, &|_| {})
        .await
        .expect_err("size mismatch");
    assert!(matches!(e, GatewayError::SizeMismatch { .. }), "{e}");
    assert!(!dest.exists());

    // A blob the registry does not have: not found, and no empty file left behind.
    let absent = BlobDesc {
        digest: sha256(b"absent"),
        size: 6,
        media_type: layer.media_type.clone(),
    };
    let dest = dir.path().join("absent");
    let e = c
        .fetch_blob(&r, &absent, &dest, &|_| {})
        .await
        .expect_err("absent");
    assert!(matches!(e, GatewayError::NotFound { .. }), "{e}");
    assert!(!dest.exists());
}

#[tokio::test]
async fn non_loopback_registry_is_refused_before_any_networking() {
    let c = client(None, vec![]);
    let dir = TempDir::new().expect("tempdir");
    let r = parse("registry.invalid/some/image:1");
    let start = Instant::now();

    let e = c.resolve(&r).await.expect_err("refused");
    assert!(matches!(e, GatewayError::PlainHttpRefused { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "registry registry.invalid is not loopback; pass --insecure-registry registry.invalid \
         to use plain HTTP"
    );
    assert!(matches!(
        c.head_digest(&r).await.expect_err("refused"),
        GatewayError::PlainHttpRefused { .. }
    ));
    let desc = BlobDesc {
        digest: sha256(b"x"),
        size: 1,
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
    };
    assert!(matches!(
        c.fetch_small_blob(&r, &desc).await.expect_err("refused"),
        GatewayError::PlainHttpRefused { .. }
    ));
    let dest = dir.path().join("blob");
    assert!(matches!(
        c.fetch_blob(&r, &desc, &dest, &|_| {})
            .await
            .expect_err("refused"),
        GatewayError::PlainHttpRefused { .. }
    ));
    assert!(!dest.exists(), "no file is created for a refused registry");
    // No name lookup or connection happened: those would take far longer than this.
    assert!(start.elapsed() < Duration::from_millis(500));

    let e = c
        .uses_plain_http(&parse("10.1.2.3:5000/x"))
        .expect_err("refused");
    assert_eq!(
        e.to_string(),
        "registry 10.1.2.3:5000 is not loopback; pass --insecure-registry 10.1.2.3:5000 to use \
         plain HTTP"
    );

    // Listed registries use plain HTTP (a bare host covers all its ports); others would use
    // HTTPS when HTTPS is allowed. Only the decision is checked: nothing is contacted.
    let listed = RegistryClient::new(ClientOptions {
        insecure_registries: vec!["registry.invalid".into(), "10.1.2.3:5000".into()],
        platform: None,
        auth_files: Some(vec![]),
        plain_http_only: true,
    })
    .expect("client");
    assert!(
        listed
            .uses_plain_http(&parse("registry.invalid:8080/x"))
            .expect("listed")
    );
    assert!(
        listed
            .uses_plain_http(&parse("10.1.2.3:5000/x"))
            .expect("listed")
    );
    assert!(listed.uses_plain_http(&parse("10.1.2.3:5001/x")).is_err());
    let https_allowed = RegistryClient::new(ClientOptions {
        auth_files: Some(vec![]),
        ..ClientOptions::default()
    })
    .expect("client");
    assert!(
        !https_allowed
            .uses_plain_http(&parse("busybox"))
            .expect("https")
    );
    assert!(
        https_allowed
            .uses_plain_http(&parse("localhost:5000/x"))
            .expect("loopback")
    );
    assert!(
        https_allowed
            .uses_plain_http(&parse("[::1]:5000/x"))
            .expect("loopback")
    );
}

#[tokio::test]
async fn unreachable_loopback_registry_is_retried_then_reported() {
    // Nothing listens on this port (it was free a moment ago).
    let port = free_port();
    let c = client(None, vec![]);
    let r = parse(&format!("127.0.0.1:{port}/x:t"));
    let start = Instant::now();
    let e = c.resolve(&r).await.expect_err("refused connection");
    match &e {
        GatewayError::Connection { attempts, .. } => assert_eq!(*attempts, 4),
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(30),
        "{took:?}"
    );
}

fn htpasswd_file(dir: &Path) -> PathBuf {
    let out = Command::new("htpasswd")
        .args(["-Bbn", USER, PASSWORD])
        .output()
        .expect("htpasswd (package apache2-utils) must be installed");
    assert!(out.status.success(), "htpasswd failed");
    let path = dir.join("htpasswd");
    std::fs::write(&path, out.stdout).expect("write htpasswd");
    path
}

fn auth_file(dir: &Path, name: &str, host: &str, user: &str, password: &str) -> PathBuf {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{token}"}}}}}}"#),
    )
    .expect("auth file");
    path
}

#[tokio::test]
async fn basic_auth_with_credentials_from_an_auth_file() {
    let secrets = TempDir::new().expect("tempdir");
    let reg = Registry::start(Some(&htpasswd_file(secrets.path())));
    let layout = Layout::new();
    let img = layout.add_image("t", &noise(4, 50_000), "amd64");
    layout.push(
        "t",
        &format!("{}/private:t", reg.host),
        Some(&format!("{USER}:{PASSWORD}")),
    );
    let r = parse(&format!("{}/private:t", reg.host));

    // The right credentials, found in the second of two files.
    let unrelated = auth_file(secrets.path(), "other.json", "127.0.0.2:1", "x", "y");
    let good = auth_file(secrets.path(), "good.json", &reg.host, USER, PASSWORD);
    let c = client(
        None,
        vec![secrets.path().join("missing.json"), unrelated, good],
    );
    let res = c.resolve(&r).await.expect("resolve with credentials");
    assert_eq!(res.manifest.bytes, img.manifest);
    assert_eq!(c.head_digest(&r).await.expect("head"), img.manifest_digest);
    assert_eq!(
        c.fetch_small_blob(&r, &res.config).await.expect("config"),
        img.config_bytes
    );
    let dest = secrets.path().join("layer");
    c.fetch_blob(&r, &res.layers[0], &dest, &|_| {})
        .await
        .expect("layer with credentials");
    assert_eq!(
        std::fs::read(&dest).expect("read"),
        layout.blob(&res.layers[0].digest)
    );

    // No credentials at all.
    let e = client(None, vec![])
        .resolve(&r)
        .await
        .expect_err("anonymous");
    match &e {
        GatewayError::Unauthorized {
            registry,
            credentials_from,
            ..
        } => {
            assert_eq!(registry, &reg.host);
            assert!(credentials_from.is_none());
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.starts_with("unauthorized:"), "{msg}");
    assert!(
        msg.contains(&format!(
            "run `podman login {0}` or `docker login {0}`",
            reg.host
        )),
        "{msg}"
    );
    let dest = secrets.path().join("anon-layer");
    let e = client(None, vec![])
        .fetch_blob(&r, &res.layers[0], &dest, &|_| {})
        .await
        .expect_err("anonymous blob");
    assert!(matches!(e, GatewayError::Unauthorized { .. }), "{e}");
    assert!(!dest.exists());

    // Wrong password: the error names the file the rejected credentials came from.
    let wrong = auth_file(secrets.path(), "wrong.json", &reg.host, USER, "nope");
    let e = client(None, vec![wrong.clone()])
        .resolve(&r)
        .await
        .expect_err("wrong password");
    match &e {
        GatewayError::Unauthorized {
            credentials_from, ..
        } => assert_eq!(credentials_from.as_deref(), Some(wrong.as_path())),
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&wrong.display().to_string()), "{msg}");
    assert!(!msg.contains("nope") && !msg.contains(PASSWORD), "{msg}");
}
