//! Progress bars for long stages: drawn on a terminal, silent otherwise
//! (schedulers read the `tracing` logs instead).

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns bars off for the whole process (e.g. with `--log-format json`).
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// A bar of `len` steps labelled `message`; hidden unless stderr is a terminal.
pub fn bar(len: u64, message: &str) -> ProgressBar {
    let target = if ENABLED.load(Ordering::Relaxed) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}
