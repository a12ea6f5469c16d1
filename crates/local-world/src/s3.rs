//! An object store on its own: moto's S3 on loopback (with the world's
//! S3 behaviours, see `world/s3_conditional.py`), for imageservers whose
//! images live in a bucket. [`ObjectStore::start`] is cheaper than a whole
//! [`crate::World`]: no accounts, no unpackers.

use std::time::Duration;

use anyhow::Context as _;
use aws_config::{BehaviorVersion, Region};

use crate::moto::{Moto, start_moto};

/// The static keys the store's clients sign with (moto accepts any).
const ACCESS_KEY: &str = "AKIALOCALWORLD000001";
const SECRET_KEY: &str = "local-world-secret";

/// moto serving S3. Dropped: stopped.
pub struct ObjectStore {
    moto: Moto,
    _dir: tempfile::TempDir,
}

impl ObjectStore {
    /// Start moto for S3 alone: no pace, no faults, no IAM.
    pub fn start() -> anyhow::Result<ObjectStore> {
        let dir = tempfile::Builder::new().prefix("local-s3-").tempdir()?;
        let vars: Vec<(String, String)> = [
            ("LOCAL_WORLD_PACE", "instant"),
            ("LOCAL_WORLD_FAULTS", ""),
            ("LOCAL_WORLD_IAM", "off"),
            ("LOCAL_WORLD_SEED", "1"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let moto = start_moto(dir.path(), &vars)?;
        Ok(ObjectStore { moto, _dir: dir })
    }

    /// The endpoint URL (`AWS_ENDPOINT_URL` for child processes).
    pub fn endpoint(&self) -> &str {
        &self.moto.endpoint
    }

    /// The moto server's process id (for CPU accounting in benchmarks).
    pub fn pid(&self) -> u32 {
        self.moto.child.id()
    }

    /// SDK configuration that reaches this store.
    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        sdk_config_for(self.endpoint())
    }

    /// Environment for a child process to reach this store through the
    /// standard AWS settings.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    /// Create a bucket; returns its name.
    pub async fn bucket(&self, name: &str) -> anyhow::Result<String> {
        create_bucket(&self.sdk_config(), name).await?;
        Ok(name.to_owned())
    }

    /// An S3 client of this store, for tests that look at or damage
    /// objects behind the imageservers' backs.
    pub fn client(&self) -> aws_sdk_s3::Client {
        s3_client(&self.sdk_config())
    }
}

/// SDK configuration with static keys for an S3 endpoint.
pub(crate) fn sdk_config_for(endpoint: &str) -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(aws_sdk_s3::config::Credentials::new(
            ACCESS_KEY,
            SECRET_KEY,
            None,
            None,
            "local-world",
        )))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .build()
}

fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(sdk).force_path_style(true).build())
}

pub(crate) async fn create_bucket(sdk: &aws_config::SdkConfig, name: &str) -> anyhow::Result<()> {
    s3_client(sdk).create_bucket().bucket(name).send().await.with_context(|| format!("creating bucket {name}"))?;
    Ok(())
}
