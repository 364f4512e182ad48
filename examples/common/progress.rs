//! How the long examples report progress: a bar per stage on a terminal, and plain timed lines
//! (each stage's start, its progress every tenth unit or twentieth of the stage, its end) when
//! the output goes to a file or a pipe, where a bar would print nothing until the stage ends.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use spf_harness::progress::Progress;

/// Bars on a terminal, lines otherwise (judged on standard error, where both go).
pub fn reporter() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bars(None))
    } else {
        Box::new(Lines {
            started: Instant::now(),
            stage: String::new(),
            done: 0,
            total: 0,
        })
    }
}

/// One indicatif bar per stage.
struct Bars(Option<ProgressBar>);

impl Progress for Bars {
    fn start(&mut self, name: &str, total: u64) {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{msg:>24} [{bar:36.cyan/blue}] {pos}/{len} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(name.to_owned());
        self.0 = Some(bar);
    }

    fn advance(&mut self, n: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(n);
        }
    }

    fn finish(&mut self, summary: &str) {
        if let Some(bar) = self.0.take() {
            bar.finish_with_message(summary.to_owned());
        }
    }
}

/// Timed lines on standard error.
struct Lines {
    started: Instant,
    stage: String,
    done: u64,
    total: u64,
}

impl Lines {
    fn line(&self, text: &str) {
        eprintln!("[{:>7.1}s] {text}", self.started.elapsed().as_secs_f64());
    }
}

impl Progress for Lines {
    fn start(&mut self, name: &str, total: u64) {
        (self.stage, self.done, self.total) = (name.to_owned(), 0, total);
        self.line(&format!("{name} ..."));
    }

    fn advance(&mut self, n: u64) {
        // Every tenth unit, or every twentieth of a long stage: at most about 20 lines each.
        let every = (self.total / 20).max(10);
        let before = self.done;
        self.done += n;
        if self.total > 1 && before / every != self.done / every {
            self.line(&format!("  {} {}/{}", self.stage, self.done, self.total));
        }
    }

    fn finish(&mut self, summary: &str) {
        self.line(&format!("{}: {summary}", self.stage));
    }
}
