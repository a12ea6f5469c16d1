//! unpacker-tool's command line as a library, for `cargo xtask dist` (man
//! pages and shell completions); the binary is `src/main.rs`.

pub mod cli;
