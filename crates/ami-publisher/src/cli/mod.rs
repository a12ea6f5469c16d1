//! The command line: [`args`] (what it takes, checked at parse time),
//! [`config`] (the TOML config file for global flags), [`dispatch`]
//! (running a command and what it prints).
//!
//! Must not: call AWS before every argument is checked (a refusal exits 2
//! having made nothing).

pub mod args;
pub mod config;
pub mod dispatch;

pub use self::{
    args::{Cli, Command, LaunchArgs, SearchArgs, UsageArgs, parse_size},
    config::parse_args,
    dispatch::{Outcome, Refused, run, table},
};

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;
    use crate::targets::TargetSpec;
    use dispatch::render_name;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2_000_000_000);
        assert!(parse_size("2 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn names_render_and_are_checked() {
        assert_eq!(render_name("{stream}/{leaf}", "base/deb", "7", "ab").unwrap(), "base/deb/7");
        assert_eq!(render_name("x:{leaf}", "s", "1", "ab").unwrap(), "x_1");
        assert!(render_name("{leaf}", "s", "1", "ab").unwrap_err().to_string().contains("3 to 128"));
    }

    #[test]
    fn config_file_fills_unset_flags_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "targets = [\"a,r-1\", \"b,\"]\nimage-server = \"img:1\"\nena-support = true\nmax-concurrency = 3\n",
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut v: Vec<OsString> = vec!["ami-publisher".into(), "--config".into(), cfg.clone().into()];
            v.extend(extra.iter().map(OsString::from));
            v
        };
        let cli = parse_args(args(&["publish", "s", "1"])).unwrap();
        assert_eq!(cli.targets.len(), 2);
        assert_eq!(cli.image_server, "img:1");
        assert!(cli.ena_support);
        assert_eq!(cli.max_concurrency, 3);
        let cli = parse_args(args(&["--targets", "c,r-2", "publish", "s", "1", "--image-server", "other:2"])).unwrap();
        assert_eq!(cli.targets, vec!["c,r-2".parse::<TargetSpec>().unwrap()]);
        assert_eq!(cli.image_server, "other:2");
        // A flag whose value is optional: `= "cooldown"` or `= true`.
        std::fs::write(&cfg, "deregistration-protection = \"cooldown\"\n").unwrap();
        let cli = parse_args(args(&["publish", "s", "1"])).unwrap();
        assert_eq!(cli.deregistration_protection, Some(crate::lifecycle::ProtectionMode::Cooldown));
        std::fs::write(&cfg, "deregistration-protection = true\n").unwrap();
        let cli = parse_args(args(&["publish", "s", "1"])).unwrap();
        assert_eq!(cli.deregistration_protection, Some(crate::lifecycle::ProtectionMode::On));
        std::fs::write(&cfg, "no-such-flag = 1\n").unwrap();
        let e = parse_args(args(&["publish", "s", "1"])).unwrap_err().to_string();
        assert!(e.contains("unknown setting 'no-such-flag'"), "{e}");
    }
}
