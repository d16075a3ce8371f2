//! A run config in layers: the file given, the files it inherits from with `base = "..."`, and
//! the `--set` overrides on top, merged into the one document the config is read from.
//!
//! Tables merge key by key, at every depth; any other value — a number, a string, a list, a
//! list of tables such as `[[metrics]]` — replaces the base's wholesale (a list merged entry by
//! entry would make "which metrics does this run have?" a puzzle). Every error about a key is
//! reported where the key's value came from: the line of the file that wrote it, or the `--set`
//! that did.
//!
//! Paths the core reads (`plugins`, `data.path`, `pruner.masks`) are relative to the file that
//! writes them; a plugin's own path keys are relative to the file given to `trellis run`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Result;
use toml::de::{DeTable, DeValue};
use toml::Spanned;
use toml_edit::{DocumentMut, Item, TableLike};

use crate::source::{plain_words, Seg, SourceFile};

/// Paths the core resolves itself, made absolute when they come from a base in another directory.
const CORE_PATHS: &[&[&str]] = &[&["plugins"], &["data", "path"], &["pruner", "masks"]];

/// A segment of a key path that owns its key (paths found in the merged text).
#[derive(Debug, Clone, PartialEq)]
enum OwnedSeg {
    Key(String),
    Index(usize),
}

impl OwnedSeg {
    fn text(&self) -> String {
        match self {
            OwnedSeg::Key(k) => k.clone(),
            OwnedSeg::Index(i) => i.to_string(),
        }
    }
}

fn borrowed(path: &[OwnedSeg]) -> Vec<Seg<'_>> {
    path.iter()
        .map(|s| match s {
            OwnedSeg::Key(k) => Seg::Key(k),
            OwnedSeg::Index(i) => Seg::Index(*i),
        })
        .collect()
}

fn owned(path: &[Seg<'_>]) -> Vec<OwnedSeg> {
    path.iter()
        .map(|s| match s {
            Seg::Key(k) => OwnedSeg::Key(k.to_string()),
            Seg::Index(i) => OwnedSeg::Index(*i),
        })
        .collect()
}

/// Which part of a `key = value` an error is about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Part {
    Key,
    Value,
}

#[derive(Debug, Clone)]
struct Override {
    /// As given: `train.epochs=5`.
    text: String,
    keys: Vec<String>,
}

/// Where a key's value came from.
enum Origin<'a> {
    File(&'a SourceFile, Vec<OwnedSeg>),
    Override(&'a Override),
}

#[derive(Debug, Clone)]
pub struct Layers {
    /// The merged document, as text; its path is the given file's.
    pub merged: SourceFile,
    /// The given file first, then its base, that one's base, ...
    pub files: Vec<SourceFile>,
    overrides: Vec<Override>,
}

impl Layers {
    /// Reads `path` and its chain of bases, merges them and applies `overrides` (`key=value`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Layers> {
        let mut files: Vec<SourceFile> = Vec::new();
        let mut docs: Vec<DocumentMut> = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut next: Option<(PathBuf, Option<Range<usize>>)> = Some((path.to_path_buf(), None));
        while let Some((file_path, named_at)) = next.take() {
            let naming = |message: &str, help: &str| match (&named_at, files.last()) {
                (Some(span), Some(child)) => child.error_at(span.clone(), message, Some(help)),
                _ => anyhow::anyhow!("{message}"),
            };
            let file = match SourceFile::read(&file_path) {
                Ok(file) => file,
                Err(e) if named_at.is_some() => {
                    return Err(naming(
                        &format!("{:#}", e),
                        "`base` is relative to the file that names it",
                    ))
                }
                Err(e) => return Err(e),
            };
            let canonical = file_path
                .canonicalize()
                .unwrap_or_else(|_| file_path.clone());
            if let Some(at) = seen.iter().position(|p| *p == canonical) {
                let chain: Vec<String> = files[at..]
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .chain([file.path.display().to_string()])
                    .collect();
                return Err(naming(
                    &format!("`base` makes a cycle: {}", chain.join(" → ")),
                    "a config's bases must end in a file without `base`",
                ));
            }
            let doc = parse_document(&file)?;
            next = match doc.get("base") {
                None => None,
                Some(item) => {
                    let span = file.value_span(&[Seg::Key("base")]);
                    match item.as_str() {
                        Some(base) => Some((file.dir().join(base), span)),
                        None => {
                            return Err(file.error_at(
                                span.unwrap_or(0..0),
                                "`base` takes the path of another config, in quotes",
                                Some("e.g. base = \"base.toml\", relative to this file"),
                            ))
                        }
                    }
                }
            };
            seen.push(canonical);
            files.push(file);
            docs.push(doc);
        }

        let dir_of = |p: &PathBuf| p.parent().map(Path::to_path_buf).unwrap_or_default();
        let top_dir = dir_of(&seen[0]);
        let mut merged = DocumentMut::new();
        for (canonical, mut doc) in seen.iter().zip(docs).rev() {
            doc.remove("base");
            if dir_of(canonical) != top_dir {
                absolutize_core_paths(&mut doc, &dir_of(canonical));
            }
            merge(merged.as_table_mut(), doc.as_table());
        }
        let mut applied = Vec::new();
        for o in overrides {
            crate::config::apply_override(&mut merged, o)?;
            let keys = o
                .split_once('=')
                .map(|(k, _)| k.trim().split('.').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default();
            applied.push(Override {
                text: o.clone(),
                keys,
            });
        }
        let merged = SourceFile {
            path: files[0].path.clone(),
            text: if files.len() == 1 && overrides.is_empty() {
                // As written, so positions in it are the file's own.
                files[0].text.clone()
            } else {
                merged.to_string()
            },
        };
        Ok(Layers {
            merged,
            files,
            overrides: applied,
        })
    }

    /// The file given on the command line.
    pub fn path(&self) -> &Path {
        &self.merged.path
    }

    /// The directory relative paths are resolved against: the given file's.
    pub fn dir(&self) -> PathBuf {
        self.merged.dir()
    }

    /// Whether the merged config has the key at `path`.
    pub fn has(&self, path: &[Seg<'_>]) -> bool {
        self.merged.key_span(path).is_some()
    }

    /// The overrides, as given.
    pub fn overrides(&self) -> Vec<String> {
        self.overrides.iter().map(|o| o.text.clone()).collect()
    }

    /// An error about the whole config (no key known).
    pub fn error(&self, message: &str) -> anyhow::Error {
        self.merged.error(message)
    }

    /// An error about the key at `path`, where its value came from: the line of the file that
    /// wrote it, or the `--set` that did; a key in no layer (left to its default) is reported
    /// against the given file.
    pub fn error_at(
        &self,
        path: &[Seg<'_>],
        part: Part,
        message: &str,
        help: Option<&str>,
    ) -> anyhow::Error {
        match self.origin(&owned(path)) {
            Some(Origin::Override(o)) => {
                let mut text = format!("{message}\n  --> --set {}", o.text);
                if let Some(help) = help {
                    text.push_str(&format!("\n  = help: {help}"));
                }
                anyhow::anyhow!(text)
            }
            Some(Origin::File(file, at)) => {
                let at = borrowed(&at);
                let span = match part {
                    Part::Value => file.value_span(&at).or_else(|| file.key_span(&at)),
                    Part::Key => file.key_span(&at),
                };
                match span {
                    Some(span) => file.error_at(span, message, help),
                    None => with_help(file.error(message), help),
                }
            }
            None => with_help(self.merged.error(message), help),
        }
    }

    /// Deserialises the merged config; a schema error names the layer its key came from.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        toml::from_str(&self.merged.text).map_err(|e| self.toml_error(&e))
    }

    fn toml_error(&self, e: &toml::de::Error) -> anyhow::Error {
        if self.files.len() == 1 && self.overrides.is_empty() {
            return self.merged.toml_error(e);
        }
        let message = plain_words(e.message().trim());
        let help = crate::source::help_for(&message);
        match e
            .span()
            .and_then(|span| path_at(&self.merged.text, span.start))
        {
            Some((path, part)) => self.error_at(&borrowed(&path), part, &message, help),
            None => with_help(self.merged.error(&message), help),
        }
    }

    fn origin(&self, path: &[OwnedSeg]) -> Option<Origin<'_>> {
        let texts: Vec<String> = path.iter().map(OwnedSeg::text).collect();
        if let Some(o) = self
            .overrides
            .iter()
            .rev()
            .find(|o| !o.keys.is_empty() && texts.starts_with(&o.keys))
        {
            return Some(Origin::Override(o));
        }
        for file in &self.files {
            if file.key_span(&borrowed(path)).is_some() {
                return Some(Origin::File(file, path.to_vec()));
            }
            // A list this file wrote replaced the bases' list: its entries are this file's.
            for (i, seg) in path.iter().enumerate() {
                if matches!(seg, OwnedSeg::Index(_))
                    && file.key_span(&borrowed(&path[..i])).is_some()
                {
                    return Some(Origin::File(file, path[..i].to_vec()));
                }
            }
        }
        // A table left to its defaults: the key is in no file, its table may be.
        if path.len() > 1 {
            return self.origin(&path[..path.len() - 1]);
        }
        None
    }
}

fn with_help(e: anyhow::Error, help: Option<&str>) -> anyhow::Error {
    match help {
        Some(help) => anyhow::anyhow!("{e:#}\n  = help: {help}"),
        None => e,
    }
}

/// Parses one file of the chain; syntax errors point into it.
fn parse_document(file: &SourceFile) -> Result<DocumentMut> {
    let doc: DocumentMut = file.text.parse().map_err(|e: toml_edit::TomlError| {
        // `[metrics]` written twice for `[[metrics]]` is a duplicate key to TOML.
        if let Some(e) = crate::config::bracket_error(file, None) {
            return e;
        }
        let span = e.span().unwrap_or(0..0);
        file.error_at(span, &plain_words(e.message().trim()), None)
    })?;
    if let Some(e) = crate::config::bracket_error(file, Some(&doc)) {
        return Err(e);
    }
    Ok(doc)
}

/// `from`'s keys over `into`'s: tables merge, everything else replaces.
fn merge(into: &mut dyn TableLike, from: &dyn TableLike) {
    for (key, item) in from.iter() {
        let both_tables = item.is_table_like()
            && into
                .get(key)
                .is_some_and(|existing| existing.is_table_like());
        if both_tables {
            let sub = into
                .get_mut(key)
                .and_then(Item::as_table_like_mut)
                .expect("checked to be a table");
            merge(sub, item.as_table_like().expect("checked to be a table"));
        } else {
            into.insert(key, item.clone());
        }
    }
}

fn absolutize_core_paths(doc: &mut DocumentMut, dir: &Path) {
    for keys in CORE_PATHS {
        if let Some(item) = item_at(doc.as_table_mut(), keys) {
            if let Some(p) = item.as_str().filter(|p| Path::new(p).is_relative()) {
                let absolute = dir.join(p).display().to_string();
                *item = toml_edit::value(absolute);
            }
        }
    }
}

fn item_at<'t>(table: &'t mut dyn TableLike, keys: &[&str]) -> Option<&'t mut Item> {
    let (first, rest) = keys.split_first()?;
    let item = table.get_mut(first)?;
    if rest.is_empty() {
        Some(item)
    } else {
        item_at(item.as_table_like_mut()?, rest)
    }
}

/// The key path whose key or value spans `offset` in `text`, the deepest one.
fn path_at(text: &str, offset: usize) -> Option<(Vec<OwnedSeg>, Part)> {
    let doc = DeTable::parse(text).ok()?;
    let mut best: Option<(Vec<OwnedSeg>, Part)> = None;
    let mut nearest: Option<(usize, Vec<OwnedSeg>)> = None;
    visit(
        doc.get_ref(),
        &mut Vec::new(),
        offset,
        &mut best,
        &mut nearest,
    );
    best.or_else(|| nearest.map(|(_, path)| (path, Part::Key)))
}

fn visit(
    table: &DeTable<'_>,
    path: &mut Vec<OwnedSeg>,
    offset: usize,
    best: &mut Option<(Vec<OwnedSeg>, Part)>,
    nearest: &mut Option<(usize, Vec<OwnedSeg>)>,
) {
    for (key, value) in table.iter() {
        path.push(OwnedSeg::Key(key.get_ref().to_string()));
        let key_span = key.span();
        if key_span.contains(&offset) {
            keep_deeper(best, path, Part::Key);
        } else if value.span().contains(&offset) && !value.get_ref().is_table() {
            keep_deeper(best, path, Part::Value);
        }
        if key_span.start <= offset && nearest.as_ref().is_none_or(|(s, _)| key_span.start >= *s) {
            *nearest = Some((key_span.start, path.clone()));
        }
        visit_value(value, path, offset, best, nearest);
        path.pop();
    }
}

fn visit_value(
    value: &Spanned<DeValue<'_>>,
    path: &mut Vec<OwnedSeg>,
    offset: usize,
    best: &mut Option<(Vec<OwnedSeg>, Part)>,
    nearest: &mut Option<(usize, Vec<OwnedSeg>)>,
) {
    match value.get_ref() {
        DeValue::Table(t) => visit(t, path, offset, best, nearest),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.get_ref().is_table() {
                    path.push(OwnedSeg::Index(i));
                    visit_value(item, path, offset, best, nearest);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn keep_deeper(best: &mut Option<(Vec<OwnedSeg>, Part)>, path: &[OwnedSeg], part: Part) {
    if best.as_ref().is_none_or(|(b, _)| path.len() > b.len()) {
        *best = Some((path.to_vec(), part));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in list {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn tables_merge_and_other_values_replace() {
        let dir = files(&[
            (
                "base.toml",
                "[train]\nepochs = 3\nseed = 1\n[optimizer]\nuse = \"sgd\"\nlr = 0.1\n\
                 [[metrics]]\nuse = \"accuracy\"\n[[metrics]]\nuse = \"loss\"\n",
            ),
            (
                "mid.toml",
                "base = \"base.toml\"\n[train]\nseed = 2\n[optimizer]\nmomentum = 0.9\n",
            ),
            (
                "top.toml",
                "base = \"mid.toml\"\n[train]\nepochs = 5\n[[metrics]]\nuse = \"ece\"\n",
            ),
        ]);
        let layers = Layers::load(&dir.path().join("top.toml"), &["train.seed=7".into()]).unwrap();
        let value: toml::Table = toml::from_str(&layers.merged.text).unwrap();
        assert_eq!(value["train"]["epochs"].as_integer(), Some(5));
        assert_eq!(value["train"]["seed"].as_integer(), Some(7));
        assert_eq!(value["optimizer"]["lr"].as_float(), Some(0.1));
        assert_eq!(value["optimizer"]["momentum"].as_float(), Some(0.9));
        let metrics = value["metrics"].as_array().unwrap();
        assert_eq!(metrics.len(), 1, "a list replaces the base's");
        assert_eq!(metrics[0]["use"].as_str(), Some("ece"));
        assert!(!value.contains_key("base"));
        assert_eq!(layers.files.len(), 3);
    }

    #[test]
    fn errors_name_the_layer_the_key_came_from() {
        let dir = files(&[
            (
                "base.toml",
                "[train]\nepochs = 3\n\n[optimizer]\nuse = \"sgd\"\nlr = \"fast\"\n",
            ),
            ("top.toml", "base = \"base.toml\"\n\n[train]\nepocs = 5\n"),
        ]);
        let top = dir.path().join("top.toml");
        let layers = Layers::load(&top, &[]).unwrap();
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Train {
            epochs: usize,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Config {
            train: Train,
            optimizer: toml::Table,
        }
        let e = format!("{:#}", layers.parse::<Config>().unwrap_err());
        assert!(
            e.contains("unknown field `epocs`") && e.contains("top.toml:4:1"),
            "{e}"
        );

        let e = layers.error_at(
            &[Seg::Key("optimizer"), Seg::Key("lr")],
            Part::Value,
            "not a rate",
            None,
        );
        let e = format!("{e:#}");
        assert!(
            e.contains("base.toml:6:6") && e.contains("lr = \"fast\""),
            "{e}"
        );
        let e = format!(
            "{:#}",
            layers.error_at(
                &[Seg::Key("train"), Seg::Key("epochs")],
                Part::Value,
                "x",
                None
            )
        );
        assert!(e.contains("base.toml:2:10"), "{e}");

        let layers = Layers::load(&top, &["optimizer.lr=-1".into()]).unwrap();
        let e = layers.error_at(
            &[Seg::Key("optimizer"), Seg::Key("lr")],
            Part::Value,
            "optimizer.lr must be >= 0",
            Some("pass a rate"),
        );
        let e = format!("{e:#}");
        assert!(
            e.contains("--> --set optimizer.lr=-1") && e.contains("help: pass a rate"),
            "{e}"
        );
        assert!(!e.contains(".toml:"), "{e}");
    }

    #[test]
    fn a_list_written_in_a_file_owns_its_entries() {
        let dir = files(&[
            (
                "base.toml",
                "[[metrics]]\nuse = \"a\"\n[[metrics]]\nuse = \"b\"\nk = 1\n",
            ),
            (
                "top.toml",
                "base = \"base.toml\"\n[[metrics]]\nuse = \"c\"\n",
            ),
        ]);
        let layers = Layers::load(&dir.path().join("top.toml"), &[]).unwrap();
        let path = [Seg::Key("metrics"), Seg::Index(0), Seg::Key("k")];
        let e = format!("{:#}", layers.error_at(&path, Part::Key, "m", None));
        assert!(e.contains("top.toml:2:"), "{e}");
    }

    #[test]
    fn cycles_and_missing_bases_are_refused_at_the_base_line() {
        let dir = files(&[
            ("a.toml", "base = \"b.toml\"\n"),
            ("b.toml", "\nbase = \"a.toml\"\n"),
            ("c.toml", "[train]\n\n\nbase = 1\n"),
            ("d.toml", "base = \"nothere.toml\"\n"),
            ("e.toml", "base = \"e.toml\"\n"),
        ]);
        let e = format!(
            "{:#}",
            Layers::load(&dir.path().join("a.toml"), &[]).unwrap_err()
        );
        assert!(e.contains("cycle") && e.contains("b.toml:2:8"), "{e}");
        let e = format!(
            "{:#}",
            Layers::load(&dir.path().join("e.toml"), &[]).unwrap_err()
        );
        assert!(e.contains("cycle") && e.contains("e.toml:1:8"), "{e}");
        let e = format!(
            "{:#}",
            Layers::load(&dir.path().join("d.toml"), &[]).unwrap_err()
        );
        assert!(
            e.contains("nothere.toml") && e.contains("d.toml:1:8") && e.contains("relative"),
            "{e}"
        );
        // `base` inside a table is not the chain's key: it is an unknown key of [train].
        assert!(Layers::load(&dir.path().join("c.toml"), &[]).is_ok());
    }

    #[test]
    fn core_paths_of_a_base_elsewhere_stay_relative_to_it() {
        let dir = files(&[
            (
                "shared/base.toml",
                "plugins = \"plugins.toml\"\n[data]\npath = \"data\"\n[model]\narch = \"mlp\"\n",
            ),
            ("exp/top.toml", "base = \"../shared/base.toml\"\n"),
        ]);
        let layers = Layers::load(&dir.path().join("exp/top.toml"), &[]).unwrap();
        let value: toml::Table = toml::from_str(&layers.merged.text).unwrap();
        let shared = dir.path().canonicalize().unwrap().join("shared");
        assert_eq!(
            value["plugins"].as_str().map(PathBuf::from),
            Some(shared.join("plugins.toml"))
        );
        assert_eq!(
            value["data"]["path"].as_str().map(PathBuf::from),
            Some(shared.join("data"))
        );
        assert_eq!(value["model"]["arch"].as_str(), Some("mlp"));
    }

    #[test]
    fn syntax_errors_point_into_the_file_that_has_them() {
        let dir = files(&[
            ("base.toml", "[train]\nepochs = = 3\n"),
            ("top.toml", "base = \"base.toml\"\n"),
        ]);
        let e = format!(
            "{:#}",
            Layers::load(&dir.path().join("top.toml"), &[]).unwrap_err()
        );
        assert!(e.contains("base.toml:2:"), "{e}");
    }
}
