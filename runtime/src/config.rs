//! The image config and the command line, combined the way docker combines them.
//!
//! - The process is `Entrypoint + Cmd`. Arguments given on the command line replace `Cmd`;
//!   `--entrypoint X` replaces the entrypoint and drops the image's `Cmd` (docker does the
//!   same, since an image's `Cmd` is written for its own entrypoint); an empty entrypoint
//!   means none.
//! - The environment is the image's `Env`, then the user's variables, later ones winning by
//!   name; `PATH` gets the usual default when neither sets it.
//! - The working directory is `-w`, else the image's `WorkingDir`, else `/`.
//! - The user is `-u`, else the image's `User`, else root; names are looked up later, in the
//!   image's own `/etc/passwd` (see [`crate::user`]).

use serde_json::Value;

use crate::{Result, RuntimeError};

/// `PATH` when neither the image nor the user sets one (what docker and podman use).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The parts of an OCI image config that decide how a container starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    /// Reads the `config` object of an OCI (or docker) image config blob. Missing fields are
    /// empty, as they are in images built `FROM scratch`.
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| RuntimeError::BadConfig(format!("not valid JSON: {e}")))?;
        let config = value.get("config").cloned().unwrap_or(Value::Null);
        let strings = |key: &str| -> Result<Vec<String>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            RuntimeError::BadConfig(format!("{key} holds a non-string"))
                        })
                    })
                    .collect(),
                Some(_) => Err(RuntimeError::BadConfig(format!("{key} is not a list"))),
            }
        };
        let string = |key: &str| {
            config
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Ok(ImageConfig {
            entrypoint: strings("Entrypoint")?,
            cmd: strings("Cmd")?,
            env: strings("Env")?,
            working_dir: string("WorkingDir"),
            user: string("User"),
        })
    }
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Arguments after the image reference; when not empty they replace the image's `Cmd`.
    pub command: Vec<String>,
    /// `--entrypoint`: Some("") clears the image's entrypoint.
    pub entrypoint: Option<String>,
    /// `-e` and `--env-file` entries as `KEY=VALUE`, in order.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
}

/// The process to start, before the user name is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `USER[:GROUP]` as written (names or numbers), empty for root.
    pub user: String,
}

impl ProcessPlan {
    /// The value of `key` in the planned environment.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env.iter().rev().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
        })
    }

    /// Sets `key` unless the environment already has it.
    pub fn env_default(&mut self, key: &str, value: &str) {
        if self.env_value(key).is_none() {
            self.env.push(format!("{key}={value}"));
        }
    }
}

/// Combines the image config with the request.
pub fn plan_process(image: &ImageConfig, req: &RunRequest) -> Result<ProcessPlan> {
    let (entrypoint, image_cmd) = match &req.entrypoint {
        Some(e) if e.is_empty() => (Vec::new(), Vec::new()),
        Some(e) => (vec![e.clone()], Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if req.command.is_empty() {
        image_cmd
    } else {
        req.command.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(RuntimeError::Invalid(
            "no command: the image has no entrypoint or command; give one after the image".into(),
        ));
    }
    let mut env = merge_env(&image.env, &req.env)?;
    if !env.iter().any(|kv| kv.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    let cwd = req
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(RuntimeError::Invalid(format!(
            "working directory {cwd:?} must be an absolute path"
        )));
    }
    let mut plan = ProcessPlan {
        args,
        env,
        cwd,
        user: req
            .user
            .clone()
            .or_else(|| image.user.clone())
            .unwrap_or_default(),
    };
    if req.tty {
        plan.env_default("TERM", "xterm");
    }
    Ok(plan)
}

/// The image's environment with the user's entries applied over it, by name, keeping the
/// order in which names first appear.
fn merge_env(image: &[String], user: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for kv in image.iter().chain(user) {
        let Some((key, _)) = kv.split_once('=') else {
            return Err(RuntimeError::Invalid(format!(
                "environment entry {kv:?} is not KEY=VALUE"
            )));
        };
        if key.is_empty() {
            return Err(RuntimeError::Invalid(format!(
                "environment entry {kv:?} has an empty name"
            )));
        }
        match out
            .iter_mut()
            .find(|e| e.split_once('=').map(|p| p.0) == Some(key))
        {
            Some(slot) => *slot = kv.clone(),
            None => out.push(kv.clone()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into(), "--flag".into()],
            cmd: vec!["serve".into()],
            env: vec!["A=1".into(), "PATH=/img/bin".into()],
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
        }
    }

    #[test]
    fn entrypoint_and_cmd_combine_like_docker() -> Result<()> {
        let img = image();
        let plan = plan_process(&img, &RunRequest::default())?;
        assert_eq!(plan.args, ["/entry", "--flag", "serve"]);
        let req = RunRequest {
            command: vec!["other".into()],
            ..Default::default()
        };
        assert_eq!(
            plan_process(&img, &req)?.args,
            ["/entry", "--flag", "other"]
        );
        // --entrypoint drops the image's Cmd too.
        let req = RunRequest {
            entrypoint: Some("sh".into()),
            ..Default::default()
        };
        assert_eq!(plan_process(&img, &req)?.args, ["sh"]);
        let req = RunRequest {
            entrypoint: Some(String::new()),
            command: vec!["ls".into(), "-l".into()],
            ..Default::default()
        };
        assert_eq!(plan_process(&img, &req)?.args, ["ls", "-l"]);
        let req = RunRequest {
            entrypoint: Some(String::new()),
            ..Default::default()
        };
        assert!(plan_process(&img, &req).is_err());
        Ok(())
    }

    #[test]
    fn env_overrides_by_name_and_path_defaults() -> Result<()> {
        let req = RunRequest {
            env: vec!["A=2".into(), "B=x=y".into()],
            ..Default::default()
        };
        let plan = plan_process(&image(), &req)?;
        assert_eq!(plan.env, ["A=2", "PATH=/img/bin", "B=x=y"]);
        let bare = ImageConfig {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        let plan = plan_process(&bare, &RunRequest::default())?;
        assert_eq!(plan.env_value("PATH"), Some(DEFAULT_PATH));
        assert_eq!(plan.cwd, "/");
        assert_eq!(plan.user, "");
        let bad = RunRequest {
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(plan_process(&bare, &bad).is_err());
        Ok(())
    }

    #[test]
    fn parses_a_real_config_shape() -> Result<()> {
        let json = br#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["sh"],
            "Entrypoint":null,"WorkingDir":"","User":"1000:1000"},"rootfs":{"type":"layers"}}"#;
        let cfg = ImageConfig::parse(json)?;
        assert_eq!(cfg.cmd, ["sh"]);
        assert!(cfg.entrypoint.is_empty());
        assert_eq!(cfg.working_dir, None);
        assert_eq!(cfg.user.as_deref(), Some("1000:1000"));
        assert_eq!(ImageConfig::parse(b"{}")?, ImageConfig::default());
        Ok(())
    }
}
