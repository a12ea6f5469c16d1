//! The AWS profile files the world writes (`first` with static keys,
//! `second` by assume-role from it, both with moto's endpoint), and SDK
//! configurations loaded from them.

use std::path::{Path, PathBuf};

use aws_config::{BehaviorVersion, Region};

use crate::{CONSUMER, CONSUMER_ACCOUNT_ID, SECOND_ACCOUNT_ID};

pub(crate) fn write_profiles(dir: &Path, endpoint: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let aws = dir.join("aws");
    std::fs::create_dir_all(&aws)?;
    let config = aws.join("config");
    let credentials = aws.join("credentials");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\nendpoint_url = {endpoint}\n\n\
             [profile first]\nregion = us-east-1\nendpoint_url = {endpoint}\n\n\
             [profile second]\nregion = us-east-1\nendpoint_url = {endpoint}\n\
             role_arn = arn:aws:iam::{SECOND_ACCOUNT_ID}:role/AmiPublisher\nsource_profile = first\n"
        ),
    )?;
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = AKIALOCALWORLD000001\naws_secret_access_key = local-world-secret\n\n\
         [first]\naws_access_key_id = AKIALOCALWORLD000001\naws_secret_access_key = local-world-secret\n",
    )?;
    Ok((config, credentials))
}

/// SDK configuration from explicit profile files (the world's own clients).
/// `CONSUMER` has no profile of its own (so that no tool's "every
/// profile" includes it): it is reached by a role from `first`.
pub async fn sdk_config(config: &Path, credentials: &Path, profile: &str, region: &str) -> aws_config::SdkConfig {
    let (loader, role_account) = match profile {
        "second" => (load_profile(config, credentials, profile, region), SECOND_ACCOUNT_ID),
        CONSUMER => (load_profile(config, credentials, "first", region), CONSUMER_ACCOUNT_ID),
        _ => return load_profile(config, credentials, profile, region).load().await,
    };
    // The world's own AssumeRole into another account names its session
    // WORLD_SESSION, so the launcher serves it as the world's (no faults):
    // aws-config's provider calls STS without the app name.
    let first = load_profile(config, credentials, "first", region).load().await;
    let role = aws_config::sts::AssumeRoleProvider::builder(format!("arn:aws:iam::{role_account}:role/AmiPublisher"))
        .session_name(WORLD_SESSION)
        .configure(&first)
        .build()
        .await;
    loader.credentials_provider(role).load().await
}

/// The session name of the world's own AssumeRole calls (moto_launch.py
/// knows it too).
pub const WORLD_SESSION: &str = "local-world";

fn load_profile(config: &Path, credentials: &Path, profile: &str, region: &str) -> aws_config::ConfigLoader {
    use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
    let files = EnvConfigFiles::builder()
        .with_file(EnvConfigFileKind::Config, config)
        .with_file(EnvConfigFileKind::Credentials, credentials)
        .build();
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .profile_files(files)
        .profile_name(profile)
        .region(Region::new(region.to_owned()))
        .app_name(aws_config::AppName::new("local-world").expect("a valid app name"))
}
