//! Progress: one line per target with its current step and, while bytes
//! move, how many. Drawn on stderr only when it is a terminal and `--json`
//! is off; every step is also a tracing event with the target's context.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// All targets' lines.
#[derive(Clone)]
pub struct Board {
    multi: MultiProgress,
    width: usize,
}

impl Board {
    /// `visible`: draw at all (off for `--json`); `names` sizes the first column.
    pub fn new(visible: bool, names: &[String]) -> Board {
        let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let width = names.iter().map(String::len).max().unwrap_or(10).min(40);
        Board { multi: MultiProgress::with_draw_target(target), width }
    }

    /// A line for one target.
    pub fn line(&self, name: &str) -> Line {
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(idle_style(self.width));
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Line { bar, width: self.width, phase: std::sync::Mutex::default() }
    }

    /// Print a line above the bars without tearing them.
    pub fn println(&self, s: &str) {
        if self.multi.is_hidden() {
            return;
        }
        let _ = self.multi.println(s);
    }
}

fn idle_style(width: usize) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{spinner}} {{prefix:{width}}} {{msg}} {{elapsed:>4}}"))
        .expect("valid template")
}

fn bytes_style(width: usize) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{spinner}} {{prefix:{width}}} {{msg:18}} [{{bar:30}}] {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}

/// One target's line.
pub struct Line {
    bar: ProgressBar,
    width: usize,
    /// The phase whose bytes the bar shows, if any.
    phase: std::sync::Mutex<Option<String>>,
}

impl Line {
    /// A new step with no byte count.
    pub fn step(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(step = %what);
        *self.phase.lock().expect("phase lock") = None;
        self.bar.set_style(idle_style(self.width));
        self.bar.set_message(what);
    }

    /// Bytes moving in the current phase.
    pub fn bytes(&self, phase: &str, done: u64, total: u64) {
        let mut current = self.phase.lock().expect("phase lock");
        if current.as_deref() != Some(phase) {
            tracing::info!(step = %phase, total_bytes = total);
            *current = Some(phase.to_owned());
            self.bar.set_style(bytes_style(self.width));
            self.bar.set_message(phase.to_owned());
        }
        self.bar.set_length(total);
        self.bar.set_position(done);
    }

    /// The target is done; leave its final word on the line.
    pub fn finish(&self, what: impl Into<String>) {
        self.bar.set_style(idle_style(self.width));
        self.bar.finish_with_message(what.into());
    }
}
