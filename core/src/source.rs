//! A TOML file kept together with its text, so every error can point at the file, line and
//! column it is about, with the line quoted and a hint how to fix it (in the style of cargo).

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One step of a path into a TOML document: a key, or an index into an array (of tables).
#[derive(Debug, Clone, PartialEq)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn read(path: &Path) -> Result<SourceFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(SourceFile {
            path: path.to_path_buf(),
            text,
        })
    }

    /// An in-memory file (for tests and for text that came from the command line).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> SourceFile {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }

    /// The directory that relative paths in this file are resolved against.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
        (line, col)
    }

    /// An error pointing at `span`, with the line quoted and an optional hint.
    pub fn error_at(&self, span: Range<usize>, message: &str, help: Option<&str>) -> anyhow::Error {
        let (line, col) = self.line_col(span.start);
        let line_text = self.text.lines().nth(line - 1).unwrap_or("");
        let width = span
            .len()
            .clamp(1, line_text.len().saturating_sub(col - 1).max(1));
        let gutter = " ".repeat(line.to_string().len());
        let mut out = format!(
            "{message}\n{gutter}--> {}:{line}:{col}\n",
            self.path.display()
        );
        let _ = writeln!(out, "{gutter} |\n{line} | {line_text}");
        let _ = write!(
            out,
            "{gutter} | {}{}",
            " ".repeat(col - 1),
            "^".repeat(width)
        );
        if let Some(help) = help {
            let _ = write!(out, "\n{gutter} = help: {help}");
        }
        anyhow::anyhow!(out)
    }

    /// An error about the whole file (no position known).
    pub fn error(&self, message: &str) -> anyhow::Error {
        anyhow::anyhow!("{message}\n  --> {}", self.path.display())
    }

    /// Deserialises the file, turning parse and schema errors into positioned errors.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        toml::from_str(&self.text).map_err(|e| self.toml_error(&e))
    }

    pub fn toml_error(&self, e: &toml::de::Error) -> anyhow::Error {
        let message = plain_words(e.message().trim());
        let help = help_for(&message);
        match e.span() {
            Some(span) => self.error_at(span, &message, help),
            None => self.error(&message),
        }
    }

    /// The span of the header line `[name]` (or `[[name]]` when `double`), if the file has one.
    pub fn header_span(&self, name: &str, double: bool) -> Option<Range<usize>> {
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let start = offset;
            offset += line.len();
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            let (open, close) = if double { ("[[", "]]") } else { ("[", "]") };
            let Some(rest) = trimmed.strip_prefix(open) else {
                continue;
            };
            if !double && rest.starts_with('[') {
                continue;
            }
            let Some(end) = rest.find(close) else {
                continue;
            };
            if rest[..end].trim() == name {
                let len = open.len() + end + close.len();
                return Some(start + indent..start + indent + len);
            }
        }
        None
    }

    /// The span of the key at `path` (e.g. `optimizer.momentum`), if present in the file.
    pub fn key_span(&self, path: &[Seg<'_>]) -> Option<Range<usize>> {
        let doc = DeTable::parse(&self.text).ok()?;
        let (last, parents) = path.split_last()?;
        let mut table: &DeTable<'_> = doc.get_ref();
        let mut value: Option<&Spanned<DeValue<'_>>> = None;
        for seg in parents {
            let next = match (seg, value) {
                (Seg::Key(k), _) => {
                    let t = match value {
                        Some(v) => v.get_ref().as_table()?,
                        None => table,
                    };
                    lookup(t, k)?.1
                }
                (Seg::Index(i), Some(v)) => v.get_ref().as_array()?.get(*i)?,
                (Seg::Index(_), None) => return None,
            };
            value = Some(next);
        }
        if let Some(v) = value {
            table = v.get_ref().as_table()?;
        }
        match last {
            Seg::Key(k) => lookup(table, k).map(|(key, _)| key.span()),
            Seg::Index(_) => None,
        }
    }

    /// The span of the value at `path`, if present.
    pub fn value_span(&self, path: &[Seg<'_>]) -> Option<Range<usize>> {
        let key = self.key_span(path)?;
        // The value follows `key =` on the same line.
        let rest = &self.text[key.end..];
        let eq = rest.find('=')?;
        let start = key.end + eq + 1 + (rest[eq + 1..].len() - rest[eq + 1..].trim_start().len());
        let end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let value = self.text[start..end].trim_end();
        let value = value.split(" #").next().unwrap_or(value).trim_end();
        Some(start..start + value.len().max(1))
    }
}

fn lookup<'a, 'i>(
    table: &'a DeTable<'i>,
    key: &str,
) -> Option<(
    &'a Spanned<std::borrow::Cow<'i, str>>,
    &'a Spanned<DeValue<'i>>,
)> {
    table.iter().find(|(k, _)| k.get_ref().as_ref() == key)
}

/// A serde message in the words of a TOML file: serde names Rust types ("expected usize",
/// "a sequence", "struct TrainConfig"), which a config's author never wrote.
pub fn plain_words(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("usize", "a whole number ≥ 0"),
        ("u64", "a whole number ≥ 0"),
        ("u32", "a whole number ≥ 0"),
        ("u16", "a whole number ≥ 0"),
        ("u8", "a whole number ≥ 0"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
        ("a sequence", "a list"),
        ("a map", "a table"),
        ("a boolean", "true or false"),
    ] {
        let from = format!("expected {rust}");
        // Whole words only: `expected u8` but not `expected u8x`.
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(&from) {
            let end = at + from.len();
            let whole = rest[end..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_alphanumeric() && c != '_');
            out.push_str(&rest[..at]);
            if whole {
                out.push_str("expected ");
                out.push_str(plain);
            } else {
                out.push_str(&from);
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        text = out;
    }
    for (rust, plain) in [
        ("invalid type: map", "invalid type: table"),
        ("invalid type: sequence", "invalid type: list"),
        ("integer number overflowed", "the number is too large"),
    ] {
        text = text.replace(rust, plain);
    }
    // `expected struct TrainConfig`, `expected enum Loss`: a Rust type's name.
    for (kind, plain) in [
        ("struct ", "a table"),
        ("enum ", "one of the listed values"),
    ] {
        let from = format!("expected {kind}");
        while let Some(at) = text.find(&from) {
            let name_start = at + from.len();
            let name_len = text[name_start..]
                .find(|c: char| !c.is_alphanumeric() && c != '_')
                .unwrap_or(text.len() - name_start);
            text.replace_range(at..name_start + name_len, &format!("expected {plain}"));
        }
    }
    text
}

pub(crate) fn help_for(message: &str) -> Option<&'static str> {
    if message.starts_with("unknown field") {
        Some("remove the key or fix its spelling; the expected keys are listed above")
    } else if message.starts_with("missing field") {
        Some("add the key to this table")
    } else if message.starts_with("invalid type") {
        Some("check the value's type: strings are quoted, numbers are not")
    } else if message.contains("expected a whole number ≥ 0") {
        Some("this key counts something, so it takes a whole number such as 0, 1 or 100")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_file_line_and_column() {
        let f = SourceFile::from_text("run.toml", "[train]\nepochs = 2\nbatch = 3\n");
        let span = f.key_span(&[Seg::Key("train"), Seg::Key("batch")]).unwrap();
        let text = format!(
            "{:#}",
            f.error_at(span, "unknown field `batch`", Some("fix it"))
        );
        assert!(text.contains("run.toml:3:1"), "{text}");
        assert!(text.contains("3 | batch = 3"), "{text}");
        assert!(text.contains("help: fix it"), "{text}");
    }

    #[test]
    fn finds_keys_in_arrays_of_tables() {
        let f = SourceFile::from_text(
            "r.toml",
            "[[metrics]]\nuse = \"a\"\n[[metrics]]\nuse = \"b\"\nk = 1\n",
        );
        let span = f
            .key_span(&[Seg::Key("metrics"), Seg::Index(1), Seg::Key("k")])
            .unwrap();
        assert_eq!(f.line_col(span.start), (5, 1));
        let v = f
            .value_span(&[Seg::Key("metrics"), Seg::Index(0), Seg::Key("use")])
            .unwrap();
        assert_eq!(&f.text[v], "\"a\"");
    }

    #[test]
    fn parse_errors_carry_position() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            a: i64,
        }
        let f = SourceFile::from_text("t.toml", "a = 1\nb = 2\n");
        let text = format!("{:#}", f.parse::<T>().unwrap_err());
        assert!(text.contains("t.toml:2:1"), "{text}");
    }
}
