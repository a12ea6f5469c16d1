//! The config file: global flags by their long names in TOML, filled in
//! where the command line and the environment leave them unset.

use std::{ffi::OsString, path::PathBuf};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, parser::ValueSource};

use super::args::Cli;

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ami-publisher/config.toml"))
}

/// Parse the command line, filling global flags the command line and
/// environment leave unset from the config file.
pub fn parse_args(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    let cmd = Cli::command();
    let m = cmd.clone().try_get_matches_from(&args)?;
    let explicit = m.get_one::<PathBuf>("config").cloned();
    let path = match explicit.clone().or_else(default_config_path) {
        Some(p) if explicit.is_some() || p.exists() => p,
        _ => return Cli::from_arg_matches(&m),
    };
    let fail = |msg: String| cmd.clone().error(clap::error::ErrorKind::InvalidValue, msg);
    let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("config file {}: {e}", path.display())))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(format!("config file {}: {e}", path.display())))?;
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        if key == "kms-keys" {
            // `[kms-keys]`: "ACCOUNT,REGION" = "KEY", one --target-kms-key each.
            let Some(keys) = value.as_table() else {
                return Err(fail(format!(
                    "config file {}: 'kms-keys' is a table of \"ACCOUNT,REGION\" = \"KEY\"",
                    path.display()
                )));
            };
            if matches!(m.value_source("target_kms_key"), Some(ValueSource::CommandLine)) {
                continue;
            }
            for (target, k) in keys {
                let Some(k) = k.as_str() else {
                    return Err(fail(format!(
                        "config file {}: kms-keys.\"{target}\" must be a string",
                        path.display()
                    )));
                };
                extra.push("--target-kms-key".into());
                extra.push(format!("{target}={k}").into());
            }
            continue;
        }
        let Some(arg) =
            cmd.get_arguments().find(|a| a.is_global_set() && a.get_long() == Some(key.as_str()) && key != "config")
        else {
            return Err(fail(format!(
                "config file {}: unknown setting '{key}' (settings are the global flags' long names, e.g. targets, image-server)",
                path.display()
            )));
        };
        let id = arg.get_id().as_str();
        if matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        // `--key=value`, one argument: also right for a flag whose value
        // is optional (and must follow an `=`).
        let with_value = |v: String| OsString::from(format!("--{key}={v}"));
        let takes_value = arg.get_action().takes_values();
        let value_optional = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        let scalar = |v: &toml::Value| -> Result<String, clap::Error> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(fail(format!("config file {}: '{key}' must be a string or number", path.display()))),
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value || value_optional => {
                if *b {
                    extra.push(flag);
                }
            }
            toml::Value::Array(items) => {
                for v in items {
                    extra.push(with_value(scalar(v)?));
                }
            }
            v if takes_value => extra.push(with_value(scalar(v)?)),
            _ => return Err(fail(format!("config file {}: '{key}' is a switch: true or false", path.display()))),
        }
    }
    let mut all = vec![args.first().cloned().unwrap_or_else(|| "ami-publisher".into())];
    all.extend(extra);
    all.extend(args.into_iter().skip(1));
    Cli::try_parse_from(all)
}
