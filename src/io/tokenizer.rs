//! Tokenizers and chat templates.
//!
//! [`HatTokenizer`] wraps a `tokenizers::Tokenizer` with what generation needs besides: the end of
//! sequence ids, whether raw text gets a BOS token, and the model's [`ChatTemplate`]. It loads from
//! a Hugging Face directory (`tokenizer.json` + `tokenizer_config.json`) or is rebuilt from GGUF
//! metadata (byte-level BPE: tokens, merges, token types, pre-tokenizer, chat template).

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Serialize;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::model::config::json_ids;
use crate::error::{Error, Result};

/// Pre-tokenizer regexes of llama.cpp's `llama-bpe` (Llama 3) and `qwen2` pre-tokenizer types.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.pre` values hat can rebuild, for error messages.
const SUPPORTED_GGUF_PRE: &str = "smollm, gpt-2/default, llama-bpe/llama3, qwen2";

/// A chat template (Jinja, as in `tokenizer_config.json` or GGUF `tokenizer.chat_template`).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// One chat message.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let t = Self { source, bos_token, eos_token };
        // Parse once now so a broken template is reported when the model loads.
        t.environment()?;
        Ok(t)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        Ok(env)
    }

    /// Renders `messages`, followed by the assistant's turn opener when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let tmpl = env.get_template("chat").map_err(|e| Error::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

/// A tokenizer with the metadata generation needs.
#[derive(Clone)]
pub struct HatTokenizer {
    inner: Tokenizer,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// BOS token text and id, if the model has one.
    pub bos: Option<(String, u32)>,
    /// Whether raw (un-templated) text starts with BOS.
    pub add_bos: bool,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for HatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HatTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos", &self.bos)
            .finish()
    }
}

/// A `tokenizer_config.json` entry that is a plain string or an `AddedToken`-like object.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

impl HatTokenizer {
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json`, `generation_config.json`
    /// and `config.json` from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::bad_file(&tok_path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg = if cfg_path.exists() { read_json(&cfg_path)? } else { serde_json::Value::Null };

        let bos_text = token_text(tcfg.get("bos_token"));
        let eos_text = token_text(tcfg.get("eos_token"));
        let bos = bos_text.as_ref().and_then(|t| inner.token_to_id(t).map(|id| (t.clone(), id)));

        // End of sequence: generation_config.json, then config.json, then the tokenizer's eos_token.
        let mut eos = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            let p = dir.join(name);
            if eos.is_empty() && p.exists() {
                eos = json_ids(read_json(&p)?.get("eos_token_id"));
            }
        }
        if let Some(id) = eos_text.as_ref().and_then(|t| inner.token_to_id(t)) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        if let Some(extra) = tcfg.get("eos_token_ids") {
            for id in json_ids(Some(extra)) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }

        let template_src = match tcfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let chat_template = template_src
            .map(|s| ChatTemplate::new(s, bos_text.clone().unwrap_or_default(), eos_text.clone().unwrap_or_default()))
            .transpose()?;
        let add_bos = tcfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Self { inner, eos_token_ids: eos, bos, add_bos, chat_template })
    }

    /// Rebuilds the tokenizer of a GGUF file from its metadata (byte-level BPE models only).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let bad = |reason: String| Error::bad_file(path, reason);
        let get = |key: &str| md.get(key).ok_or_else(|| bad(format!("GGUF metadata has no {key}")));
        let model = get("tokenizer.ggml.model")?.to_string().map_err(|e| bad(e.to_string()))?;
        if model != "gpt2" {
            return Err(bad(format!(
                "GGUF tokenizer model '{model}' cannot be rebuilt (hat rebuilds byte-level BPE, 'gpt2'); \
                 use the model's Hugging Face directory instead"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            get(key)?
                .to_vec()
                .map_err(|e| bad(e.to_string()))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| bad(format!("{key}: {e}"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("malformed merge '{m}'")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| bad(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| bad(e.to_string())))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("cannot build BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);

        let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            let s = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| bad(format!("pre-tokenizer regex: {e}")))?;
            Ok(s.into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            "gpt-2" | "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            "llama-bpe" | "llama3" | "smaug-bpe" => {
                Sequence::new(vec![split(LLAMA3_REGEX)?, ByteLevel::new(false, true, false).into()]).into()
            }
            "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, ByteLevel::new(false, true, false).into()]).into(),
            other => {
                return Err(bad(format!(
                    "GGUF pre-tokenizer '{other}' is not supported (supported: {SUPPORTED_GGUF_PRE})"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));

        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == 3))
            .collect();
        inner.add_special_tokens(&special);

        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let name = |id: u32| tokens.get(id as usize).cloned().unwrap_or_default();
        let bos = id("tokenizer.ggml.bos_token_id").map(|i| (name(i), i));
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut eos_token_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !eos_token_ids.contains(&eot) {
                eos_token_ids.push(eot);
            }
        }
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(|s| {
                ChatTemplate::new(
                    s.clone(),
                    bos.as_ref().map(|b| b.0.clone()).unwrap_or_default(),
                    eos_id.map(name).unwrap_or_default(),
                )
            })
            .transpose()?;
        Ok(Self { inner, eos_token_ids, bos, add_bos, chat_template })
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` that [`Self::from_hf_dir`] reads back.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tok_path = dir.join("tokenizer.json");
        self.inner
            .save(&tok_path, false)
            .map_err(|e| Error::bad_file(&tok_path, format!("cannot write tokenizer: {e}")))?;
        let eos_text = self.eos_token_ids.first().and_then(|&id| self.inner.id_to_token(id));
        let cfg = serde_json::json!({
            "bos_token": self.bos.as_ref().map(|b| b.0.clone()),
            "eos_token": eos_text,
            "eos_token_ids": self.eos_token_ids,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template.as_ref().map(|t| t.source().to_string()),
        });
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::bad_file(&cfg_path, e))?;
        std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))
    }

    /// Encodes text; special tokens written in the text (e.g. `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens included when `skip_special` is false.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Turns a user prompt into the model's input ids: through the chat template when
    /// `use_chat_template` (and the model has one), else raw text with BOS if the model wants it.
    pub fn encode_prompt(&self, prompt: &str, use_chat_template: bool) -> Result<Vec<u32>> {
        match (&self.chat_template, use_chat_template) {
            (Some(t), true) => self.encode(&t.render(&[Message::user(prompt)], true)?),
            _ => {
                let mut ids = Vec::new();
                if self.add_bos {
                    ids.extend(self.bos.as_ref().map(|b| b.1));
                }
                ids.extend(self.encode(prompt)?);
                Ok(ids)
            }
        }
    }

    /// [`Self::encode_prompt`] cut to at most `max_tokens` ids by dropping the end of the prompt's
    /// own text, so that the chat template's opening and closing (e.g. the assistant header the
    /// reply follows) stay intact. Errors when the template alone takes more than `max_tokens`.
    pub fn encode_prompt_within(&self, prompt: &str, use_chat_template: bool, max_tokens: usize) -> Result<Vec<u32>> {
        let ids = self.encode_prompt(prompt, use_chat_template)?;
        if ids.len() <= max_tokens {
            return Ok(ids);
        }
        // The template around an empty prompt: the common prefix and suffix of the two encodings.
        let frame = self.encode_prompt("", use_chat_template)?;
        let head = ids.iter().zip(&frame).take_while(|(a, b)| a == b).count();
        let tail = ids.iter().rev().zip(frame.iter().rev()).take_while(|(a, b)| a == b).count().min(frame.len() - head.min(frame.len()));
        if head + tail >= max_tokens {
            return Err(Error::invalid(format!("a prompt cannot fit in {max_tokens} tokens: the chat template alone takes {}", head + tail)));
        }
        let mut cut = ids[..max_tokens - tail].to_vec();
        cut.extend_from_slice(&ids[ids.len() - tail..]);
        Ok(cut)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }
}

/// Incremental detokenizer: turns a stream of ids into a stream of text, holding back a piece
/// until it is complete (multi-token UTF-8 characters, byte-level merges).
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a HatTokenizer,
    ids: Vec<u32>,
    prev: usize,
    current: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a HatTokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prev: 0, current: 0 }
    }

    /// Adds one id; returns the text that became final, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let before = self.tokenizer.decode(&self.ids[self.prev..self.current], true)?;
        self.ids.push(id);
        let now = self.tokenizer.decode(&self.ids[self.prev..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{fffd}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_string();
            self.prev = self.current;
            self.current = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of the stream.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tokenizer.decode(&self.ids[self.prev..self.current], true)?;
        let now = self.tokenizer.decode(&self.ids[self.prev..], true)?;
        Ok((now.len() > before.len() && now.is_char_boundary(before.len())).then(|| now[before.len()..].to_string()))
    }
}
