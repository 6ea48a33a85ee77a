//! The OCI runtime spec of a run: process, root, mounts, namespaces and cgroup path.
//!
//! What a docker or podman user expects inside: `/proc`, a small `/dev` tmpfs with the usual
//! device nodes (libcontainer creates null, zero, full, random, urandom and tty), `/dev/pts`,
//! `/dev/shm`, `/dev/mqueue`, a read-only `/sys`, and `/etc/resolv.conf`, `/etc/hosts` and
//! `/etc/hostname` bound from files generated for the run. Capabilities are docker's default
//! set. The host's network namespace is shared unless `--net none` asks for a new one
//! (which has only a loopback interface).

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    UserBuilder,
};

use crate::Result;
use crate::rootless::UserNamespace;
use crate::user::Identity;

/// Network of the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetMode {
    /// Share the host's network namespace.
    #[default]
    Host,
    /// A new network namespace with only a loopback interface.
    None,
}

/// A `-v HOST:CONTAINER[:ro]` bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

/// Everything the spec is made of.
#[derive(Debug, Clone)]
pub struct SpecInput {
    /// The merged root file system (the overlay mount).
    pub rootfs: PathBuf,
    pub readonly: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub identity: Identity,
    pub terminal: bool,
    pub hostname: String,
    pub net: NetMode,
    pub volumes: Vec<Volume>,
    /// Generated files bound over `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`.
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    pub hostname_file: PathBuf,
    /// `linux.cgroupsPath`, e.g. `/fd/<run id>`.
    pub cgroups_path: PathBuf,
    /// Set for a run without root (see [`crate::rootless`]).
    pub rootless: Option<Rootless>,
}

/// A rootless container: the helper has already entered the user namespace (see
/// [`crate::rootless::enter_user_namespace`]), so the spec asks for no new one and no
/// cgroup; the maps only decide which mount options can work.
#[derive(Debug, Clone)]
pub struct Rootless {
    pub namespace: UserNamespace,
}

/// docker's default capability set.
const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

fn bind(dest: &str, source: &std::path::Path, readonly: bool) -> Result<Mount> {
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    if readonly {
        options.push("ro".into());
    }
    Ok(MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(options)
        .build()?)
}

/// The standard mounts, then the generated `/etc` files, then the user's volumes.
fn mounts(input: &SpecInput) -> Result<Vec<Mount>> {
    let mut out = Vec::new();
    // devpts' gid=5 (tty) is refused when the namespace has no gid 5 (a user without a
    // subordinate range).
    let devpts_tty_gid = input
        .rootless
        .as_ref()
        .is_none_or(|r| r.namespace.maps_gid(5));
    let mut devpts = vec![
        "nosuid",
        "noexec",
        "newinstance",
        "ptmxmode=0666",
        "mode=0620",
    ];
    if devpts_tty_gid {
        devpts.push("gid=5");
    }
    out.extend([
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount("/dev/pts", "devpts", "devpts", &devpts)?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
    ]);
    if input.rootless.is_some() && input.net == NetMode::Host {
        // sysfs can be mounted only by the owner of the network namespace: without root,
        // the host's /sys is bound read-only instead.
        out.push(bind("/sys", std::path::Path::new("/sys"), true)?);
    } else {
        out.push(mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?);
    }
    out.push(bind("/etc/resolv.conf", &input.resolv_conf, false)?);
    out.push(bind("/etc/hosts", &input.hosts, false)?);
    out.push(bind("/etc/hostname", &input.hostname_file, false)?);
    for v in &input.volumes {
        out.push(bind(&v.destination, &v.source, v.readonly)?);
    }
    Ok(out)
}

/// This process's open-file limits, passed on to the container (as docker passes its own).
fn nofile_limits() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `lim`, which is valid for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        (lim.rlim_cur, lim.rlim_max)
    } else {
        (1024, 1024)
    }
}

/// Builds the spec.
pub fn build_spec(input: &SpecInput) -> Result<Spec> {
    let caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    let (soft, hard) = nofile_limits();
    let user = UserBuilder::default()
        .uid(input.identity.uid)
        .gid(input.identity.gid)
        .additional_gids(input.identity.additional_gids.clone())
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(input.terminal)
        .args(input.args.clone())
        .env(input.env.clone())
        .cwd(input.cwd.clone())
        .user(user)
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .soft(soft)
                .hard(hard)
                .build()?,
        ])
        .no_new_privileges(false)
        .build()?;
    let root = RootBuilder::default()
        .path(&input.rootfs)
        .readonly(input.readonly)
        .build()?;

    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if input.net == NetMode::None {
        kinds.push(LinuxNamespaceType::Network);
    }
    let namespaces = kinds
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default().namespaces(namespaces);
    if input.rootless.is_none() {
        linux = linux.cgroups_path(input.cgroups_path.clone());
    }
    if let Some(masked) = defaults.masked_paths() {
        linux = linux.masked_paths(masked.clone());
    }
    if let Some(ro) = defaults.readonly_paths() {
        linux = linux.readonly_paths(ro.clone());
    }
    let linux = linux.build()?;

    let mut spec = Spec::default();
    spec.set_process(Some(process))
        .set_root(Some(root))
        .set_hostname(Some(input.hostname.clone()))
        .set_mounts(Some(mounts(input)?))
        .set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(net: NetMode) -> SpecInput {
        SpecInput {
            rootfs: "/r".into(),
            readonly: true,
            args: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/data".into(),
            identity: Identity {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10],
                home: None,
            },
            terminal: false,
            hostname: "box".into(),
            net,
            volumes: vec![Volume {
                source: "/host".into(),
                destination: "/data".into(),
                readonly: true,
            }],
            resolv_conf: "/run/resolv.conf".into(),
            hosts: "/run/hosts".into(),
            hostname_file: "/run/hostname".into(),
            cgroups_path: "/fd/abc".into(),
            rootless: None,
        }
    }

    #[test]
    fn host_network_shares_the_namespace_and_none_makes_one() -> Result<()> {
        let has_net = |spec: &Spec| {
            spec.linux()
                .as_ref()
                .and_then(|l| l.namespaces().clone())
                .unwrap_or_default()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network)
        };
        assert!(!has_net(&build_spec(&input(NetMode::Host))?));
        assert!(has_net(&build_spec(&input(NetMode::None))?));
        Ok(())
    }

    #[test]
    fn volumes_user_and_cgroup_path_reach_the_spec() -> Result<()> {
        let spec = build_spec(&input(NetMode::Host))?;
        let json = serde_json::to_value(&spec)
            .map_err(|e| crate::RuntimeError::Invalid(format!("spec does not serialize: {e}")))?;
        assert_eq!(json["linux"]["cgroupsPath"], "/fd/abc");
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["root"]["readonly"], true);
        let mounts = json["mounts"].as_array().cloned().unwrap_or_default();
        let data = mounts.iter().find(|m| m["destination"] == "/data");
        assert!(data.is_some_and(|m| {
            m["options"]
                .as_array()
                .is_some_and(|o| o.iter().any(|x| x == "ro"))
        }));
        Ok(())
    }
}
