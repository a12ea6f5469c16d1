//! What every fleet command line shares: client certificate flags and log
//! set-up (the daemons, the tools and ami-publisher alike).

use std::path::PathBuf;

use fleet_tls::TlsFiles;

/// Client certificate flags: `--ssl-dir` (CA.pem, cert.pem, key.pem), each
/// file overridable on its own.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Directory holding CA.pem, cert.pem and key.pem [default: ~/.ssl].
    #[arg(long, global = true, value_name = "DIR")]
    pub ssl_dir: Option<PathBuf>,
    /// CA certificate (overrides --ssl-dir).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (overrides --ssl-dir).
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client key (overrides --ssl-dir).
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// The files these flags name.
    pub fn files(&self) -> TlsFiles {
        let dir = self.ssl_dir.clone().unwrap_or_else(TlsFiles::default_ssl_dir);
        let base = TlsFiles::from_ssl_dir(&dir);
        TlsFiles {
            ca: self.ca.clone().unwrap_or(base.ca),
            cert: self.cert.clone().unwrap_or(base.cert),
            key: self.key.clone().unwrap_or(base.key),
        }
    }
}

/// Log to stderr, filtered by `RUST_LOG` (else `default_level`); JSON lines
/// when asked, colours only on a terminal.
pub fn init_tracing(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Parse a byte count: a number with an optional K/M/G/T (powers of 1000)
/// or KiB/MiB/GiB/TiB suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 1073741824, 512MiB, 2G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use K, M, G, T, KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}
