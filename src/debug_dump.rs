//! Diagnostics: named intermediate arrays of one forward call, collected while a sink is open
//! (`Model::hidden` opens it for layer 0 of the `ZMLX_DUMP_DIR` prefill) and saved beside the
//! layer outputs, so a GPU run can be compared op by op with mlx-lm (scripts/gpu/layer_diff.py).
use std::cell::RefCell;

use mlx_rs::Array;

thread_local! {
    static SINK: RefCell<Option<Vec<(String, Array)>>> = const { RefCell::new(None) };
}

pub fn open() {
    SINK.with(|s| *s.borrow_mut() = Some(Vec::new()));
}

/// Closes the sink and returns what was recorded.
pub fn close() -> Vec<(String, Array)> {
    SINK.with(|s| s.borrow_mut().take()).unwrap_or_default()
}

/// Records `a` under `name` if a sink is open (cheap no-op otherwise).
pub fn record(name: &str, a: &Array) {
    SINK.with(|s| {
        if let Some(v) = s.borrow_mut().as_mut() {
            v.push((name.to_owned(), a.clone()));
        }
    });
}
