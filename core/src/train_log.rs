//! `train.log` in a run directory: the log lines the terminal showed, and the summary printed at
//! the end, so that what a run said is kept with what it wrote.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

static FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// From now on, log lines are also appended to `path`.
pub fn start(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if let Ok(mut f) = FILE.lock() {
        *f = Some(file);
    }
    Ok(())
}

pub fn stop() {
    if let Ok(mut f) = FILE.lock() {
        *f = None;
    }
}

/// Prints to stdout and appends to the log.
pub fn println(text: &str) {
    println!("{text}");
    append(format!("{text}\n").as_bytes());
}

fn append(bytes: &[u8]) {
    if let Ok(mut f) = FILE.lock() {
        if let Some(file) = f.as_mut() {
            let _ = file.write_all(&without_colours(bytes));
        }
    }
}

/// The text without the ANSI colour sequences (`ESC [ ... m`) a terminal shows as colours.
fn without_colours(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0x1b && bytes.get(i + 1) == Some(&b'[') {
            let end = bytes[i + 2..]
                .iter()
                .position(|b| b.is_ascii_alphabetic())
                .map_or(bytes.len(), |p| i + 2 + p + 1);
            i = end;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The writer of the `tracing` subscriber: stderr, and the run's `train.log` while one is open.
pub struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(buf);
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;

    fn make_writer(&'a self) -> Tee {
        Tee
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn colours_are_left_out_of_the_file() {
        let text = b"\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m epoch 1/2";
        assert_eq!(super::without_colours(text), b"2026  INFO epoch 1/2");
    }
}
