//! recdistill: turns raw recommendation logs in a data lake into a small,
//! fast recommender, with the evidence of how good it is.
//!
//! Data flows one way through the stages ([`stages`]), each a module with
//! one entry point:
//!
//! ```text
//! ingest ─► features ─► baselines ─► teacher ─► soft-labels ─► distill ─► compress ─► evaluate ─► commit
//! (check)   (features/)  (models/)    (models/)  (soft_labels/)  (models/,  (models/)   (recommendations/,  (_SUCCESS)
//!                                                                soft_labels/)           evaluation/)
//! ```
//!
//! The crate is layered; a module imports only the layers below it:
//!
//! | layer | what it owns |
//! |---|---|
//! | [`cli`] | argument structs, one function per command, the results table |
//! | [`tools`] | `sql`, `import`, `sample`, `recommend`, `bench` |
//! | [`stages`] | one file per stage, and the one stage table `run` and `stage` walk |
//! | [`artifacts`] | what stages share: model files, soft-label files, recommendation lists |
//! | [`train`] | the fit loop, early stopping, CPU and candle trainers, losses |
//! | [`model`] | scoring and storage only: SASRec, baselines, stored matrices, ranking |
//! | [`dataset`] | the compact training set built from the split |
//! | [`run`] | the run-folder protocol: folder, lease, commit, gc |
//! | [`lake`] | object store, DataFusion session, table contracts |
//! | [`config`] | the job spec, a leaf |
//! | [`error`], [`progress`] | the error type and exit codes; progress bars |
//!
//! [`lake`] and [`run`] are the only code that writes to the lake.

pub mod artifacts;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod error;
pub mod lake;
pub mod model;
pub mod progress;
pub mod run;
pub mod stages;
pub mod tools;
pub mod train;

pub use error::{Error, Result};

/// The house rules of the source tree, checked by reading every file's
/// references to `crate::…` and `super::…`: imports run down the layers of
/// the table above, and a stage never reaches into another stage.
#[cfg(test)]
mod layering {
    use std::path::{Path, PathBuf};

    /// Top-level modules from the bottom up. A module may refer to its own
    /// top-level module and to those in lower rows, never to its row or above.
    const LAYERS: &[&[&str]] = &[
        &["error"],
        &["config", "progress"],
        &["lake"],
        &["run", "dataset"],
        &["model"],
        &["train"],
        &["artifacts"],
        &["stages"],
        &["tools"],
        &["cli"],
    ];

    fn rank(module: &str) -> Option<usize> {
        LAYERS.iter().position(|row| row.contains(&module))
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The module path of a file under `src/` (`src/a/b.rs` → `[a, b]`,
    /// `src/a/mod.rs` → `[a]`).
    fn module_of(src: &Path, file: &Path) -> Vec<String> {
        let rel = file.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
            parts.pop();
        }
        parts
    }

    fn ident(text: &str) -> &str {
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len());
        &text[..end]
    }

    /// The paths `crate::…` and `super::…` name in `code` (comments
    /// removed), as written: `["crate", "lake", "engine"]`; a `{…}` group
    /// gives one path per member.
    fn references(code: &str) -> Vec<(usize, Vec<String>)> {
        let mut found = Vec::new();
        for root in ["crate::", "super::"] {
            let mut from = 0;
            while let Some(at) = code[from..].find(root).map(|i| i + from) {
                from = at + root.len();
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let line = code[..at].matches('\n').count() + 1;
                let mut path = vec![root.trim_end_matches(':').to_string()];
                let mut rest = &code[from..];
                loop {
                    if let Some(group) = rest.strip_prefix('{') {
                        let end = group.find('}').unwrap_or(group.len());
                        for member in group[..end].split(',') {
                            let name = ident(member.trim());
                            if !name.is_empty() && name != "self" {
                                let mut p = path.clone();
                                p.push(name.to_string());
                                found.push((line, p));
                            }
                        }
                        break;
                    }
                    let name = ident(rest);
                    if name.is_empty() {
                        found.push((line, path));
                        break;
                    }
                    path.push(name.to_string());
                    rest = &rest[name.len()..];
                    match rest.strip_prefix("::") {
                        Some(after) => rest = after,
                        None => {
                            found.push((line, path));
                            break;
                        }
                    }
                }
            }
        }
        found
    }

    #[test]
    fn imports_run_down_and_stages_never_import_each_other() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let stage_modules: Vec<String> = std::fs::read_dir(src.join("stages"))
            .unwrap()
            .map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.trim_end_matches(".rs").to_string()
            })
            .filter(|n| n != "mod")
            .collect();
        assert!(stage_modules.len() >= 8, "{stage_modules:?}");
        let mut broken = Vec::new();
        let mut checked = 0;
        for file in &files {
            let module = module_of(&src, file);
            let Some(top) = module.first() else { continue };
            if top == "main" {
                continue;
            }
            let own_rank = rank(top).unwrap_or_else(|| {
                panic!(
                    "{}: module {top} is in no layer of the table",
                    file.display()
                )
            });
            let text = std::fs::read_to_string(file).unwrap();
            // Comments go; inline test modules resolve `super` from the file itself.
            let test_start = text.find("\nmod tests {").unwrap_or(text.len());
            let code: String = text
                .lines()
                .map(|l| match l.find("//") {
                    Some(i) => &l[..i],
                    None => l,
                })
                .collect::<Vec<_>>()
                .join("\n");
            for (line, path) in references(&code) {
                checked += 1;
                let in_tests = text[..test_start].matches('\n').count() + 1 < line;
                let target: Vec<String> = if path[0] == "crate" {
                    path[1..].to_vec()
                } else {
                    let depth = if in_tests { 0 } else { 1 };
                    let base = &module[..module.len().saturating_sub(depth)];
                    base.iter()
                        .cloned()
                        .chain(path[1..].iter().cloned())
                        .collect()
                };
                let at = format!("{}:{line}: {}", file.display(), path.join("::"));
                let Some(first) = target.first() else {
                    continue;
                };
                if let Some(r) = rank(first)
                    && first != top
                    && r >= own_rank
                {
                    broken.push(format!("{at}: {top} may not use {first}"));
                }
                if top == "stages"
                    && module.len() > 1
                    && first == "stages"
                    && let Some(other) = target.get(1)
                    && stage_modules.contains(other)
                    && *other != module[1]
                {
                    broken.push(format!("{at}: stage {} uses stage {other}", module[1]));
                }
            }
        }
        assert!(checked > 200, "only {checked} references found");
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    }

    #[test]
    fn references_are_read_with_groups_and_super() {
        let code = "use crate::lake::{engine, Lake};\nuse super::x::Y;\nlet a = crate::model::score::top_k(s);";
        let refs: Vec<String> = references(code)
            .into_iter()
            .map(|(_, p)| p.join("::"))
            .collect();
        assert_eq!(
            refs,
            [
                "crate::lake::engine",
                "crate::lake::Lake",
                "crate::model::score::top_k",
                "super::x::Y"
            ]
        );
    }
}
