//! Platforms (`os/architecture[/variant]`) and the choice of one manifest from an index.
//!
//! Names follow the Go conventions that image indexes use (`amd64`, `arm64`, not Rust's
//! `x86_64`, `aarch64`), so the host's platform is translated once here.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::PlatformError;

/// An image platform as written in image indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// Go architecture name, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// e.g. `v8` for arm64, `v7` for arm.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on: linux and the Go name of its architecture, no
    /// variant (which matches any variant of that architecture).
    pub fn host() -> Platform {
        Platform {
            os: "linux".to_string(),
            architecture: go_arch(std::env::consts::ARCH).to_string(),
            variant: None,
        }
    }

    /// Parses `linux/amd64` or `linux/arm64/v8`. Common non-Go spellings of architectures
    /// (`x86_64`, `aarch64`, `i386`) are accepted and translated.
    pub fn parse(s: &str) -> Result<Platform, PlatformError> {
        let fail = |reason: &str| PlatformError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let lower = s.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        if parts.len() < 2 {
            return Err(fail("it needs at least OS and architecture"));
        }
        if parts.len() > 3 {
            return Err(fail("it has more than three parts"));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(fail("a part is empty"));
            }
            if !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                return Err(fail(
                    "parts may only hold letters, digits, '_', '-' and '.'",
                ));
            }
        }
        let architecture = match parts[1] {
            "x86_64" | "x86-64" => "amd64",
            "aarch64" => "arm64",
            "i386" | "i686" => "386",
            other => other,
        };
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: architecture.to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// Whether an index entry's platform satisfies this one. A missing variant on our side
    /// accepts any variant; arm64 without variant counts as `v8` and arm as `v7`, as in
    /// docker and containerd.
    pub(crate) fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if !self.os.eq_ignore_ascii_case(os)
            || !self.architecture.eq_ignore_ascii_case(architecture)
        {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let default_variant = match self.architecture.as_str() {
            "arm64" => Some("v8"),
            "arm" => Some("v7"),
            _ => None,
        };
        let have = variant.or(default_variant);
        let want = Some(want.as_str());
        have.map(str::to_ascii_lowercase) == want.map(str::to_ascii_lowercase)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
    }
}

/// Go's name for a Rust `target_arch`.
fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "mips" if cfg!(target_endian = "little") => "mipsle",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "loongarch64" => "loong64",
        // arm, s390x, riscv64, mips, mips64 have the same name in both.
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_and_three_parts() {
        let p = Platform::parse("linux/amd64").expect("valid");
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant),
            ("linux", "amd64", None)
        );
        let p = Platform::parse("linux/arm64/v8").expect("valid");
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("Linux/x86_64").expect("valid").to_string(),
            "linux/amd64"
        );
        assert_eq!(
            Platform::parse("linux/aarch64")
                .expect("valid")
                .architecture,
            "arm64"
        );
    }

    #[test]
    fn rejects_malformed() {
        for (s, needle) in [
            ("linux", "at least"),
            ("", "at least"),
            ("linux/", "empty"),
            ("/amd64", "empty"),
            ("linux/arm/v7/x", "more than three"),
            ("linux/am d64", "only hold"),
        ] {
            let e = Platform::parse(s).expect_err(s);
            let msg = e.to_string();
            assert!(msg.contains(needle), "{s}: {msg}");
            assert!(msg.contains(&format!("{s:?}")), "{msg}");
        }
    }

    #[test]
    fn host_uses_go_names() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        let expected = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        assert_eq!(h.architecture, expected);
        assert!(h.variant.is_none());
    }

    #[test]
    fn matching_rules() {
        let amd = Platform::parse("linux/amd64").expect("valid");
        assert!(amd.matches("linux", "amd64", None));
        assert!(amd.matches("linux", "amd64", Some("v3")));
        assert!(!amd.matches("linux", "arm64", None));
        assert!(!amd.matches("windows", "amd64", None));
        let v8 = Platform::parse("linux/arm64/v8").expect("valid");
        assert!(v8.matches("linux", "arm64", None));
        assert!(v8.matches("linux", "arm64", Some("v8")));
        assert!(!v8.matches("linux", "arm64", Some("v9")));
        let v6 = Platform::parse("linux/arm/v6").expect("valid");
        assert!(!v6.matches("linux", "arm", None));
        assert!(v6.matches("linux", "arm", Some("v6")));
    }
}
