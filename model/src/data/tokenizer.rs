//! Tokenizers: flotilla's byte tokenizer (the default) or a Hugging Face `tokenizer.json`
//! (the file DeepSeek-V3 and most models ship), loaded with the `tokenizers` crate.
//!
//! Text is encoded without the tokenizer's post-processor (no BOS/EOS template is added);
//! documents get their end-of-document token from whoever frames them (`data prepare`
//! appends one per document). The end-of-document token is, in order: the id or token
//! string the caller names (`--eod`); the `eos_token` of a `tokenizer_config.json` beside
//! the `tokenizer.json`; the first special added token among the common end-of-text
//! spellings ([`EOD_SPELLINGS`]). The byte tokenizer's is byte 0 (NUL), which text does
//! not contain, so its vocabulary stays 256.

use super::{BYTE_VOCAB, DataError, decode_bytes, encode_bytes};
use std::path::{Path, PathBuf};

/// Special-token spellings taken as end-of-document, first match wins.
pub const EOD_SPELLINGS: [&str; 5] =
    ["<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<eos>"];

/// The byte tokenizer's end-of-document token.
pub const BYTE_EOD: u32 = 0;

/// A tokenizer.
pub enum Tokenizer {
    /// One token per UTF-8 byte.
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    Hf {
        /// The file.
        path: PathBuf,
        /// The tokenizer.
        tokenizer: Box<tokenizers::Tokenizer>,
        /// The end-of-document token, if one was named or found.
        eod: Option<u32>,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => f.write_str("Tokenizer::Bytes"),
            Tokenizer::Hf { path, eod, .. } => {
                f.debug_struct("Tokenizer::Hf").field("path", path).field("eod", eod).finish()
            }
        }
    }
}

impl Tokenizer {
    /// Loads `path` (a `tokenizer.json`); `eod` names the end-of-document token, as an id
    /// or a token string, overriding what the files say.
    pub fn from_file(path: &Path, eod: Option<&str>) -> Result<Self, DataError> {
        let bad = |detail: String| DataError::Tokenizer { path: path.to_path_buf(), detail };
        if !path.is_file() {
            return Err(bad("no such file".into()));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        let vocab = tokenizer.get_vocab_size(true);
        let eod = match eod {
            Some(spec) => Some(match spec.parse::<u32>() {
                Ok(id) if (id as usize) < vocab => id,
                Ok(id) => {
                    return Err(bad(format!("end-of-document id {id} is outside its vocabulary of {vocab}")));
                }
                Err(_) => tokenizer
                    .token_to_id(spec)
                    .ok_or_else(|| bad(format!("end-of-document token {spec:?} is not in its vocabulary")))?,
            }),
            None => config_eos(path, &tokenizer)?.or_else(|| {
                let added = tokenizer.get_added_tokens_decoder();
                EOD_SPELLINGS
                    .iter()
                    .find_map(|s| added.iter().find(|(_, t)| t.special && t.content == *s).map(|(&id, _)| id))
            }),
        };
        Ok(Tokenizer::Hf { path: path.to_path_buf(), tokenizer: Box::new(tokenizer), eod })
    }

    /// The byte tokenizer, or `path`'s.
    pub fn load(path: Option<&Path>, eod: Option<&str>) -> Result<Self, DataError> {
        match path {
            None => Ok(Tokenizer::Bytes),
            Some(p) => Tokenizer::from_file(p, eod),
        }
    }

    /// `"bytes"` or the file.
    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Bytes => "the byte tokenizer".into(),
            Tokenizer::Hf { path, .. } => path.display().to_string(),
        }
    }

    /// Text to token ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(encode_bytes(text)),
            Tokenizer::Hf { path, tokenizer, .. } => tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Tokenizer { path: path.clone(), detail: format!("encoding: {e}") }),
        }
    }

    /// Token ids to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        match self {
            Tokenizer::Bytes => Ok(decode_bytes(ids)),
            Tokenizer::Hf { path, tokenizer, .. } => tokenizer
                .decode(ids, false)
                .map_err(|e| DataError::Tokenizer { path: path.clone(), detail: format!("decoding: {e}") }),
        }
    }

    /// Ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTE_VOCAB,
            Tokenizer::Hf { tokenizer, .. } => tokenizer.get_vocab_size(true),
        }
    }

    /// The end-of-document token; errors (naming the file and its special tokens) when
    /// none was named or found.
    pub fn eod(&self) -> Result<u32, DataError> {
        match self {
            Tokenizer::Bytes => Ok(BYTE_EOD),
            Tokenizer::Hf { eod: Some(id), .. } => Ok(*id),
            Tokenizer::Hf { path, tokenizer, eod: None } => {
                let mut special: Vec<String> = tokenizer
                    .get_added_tokens_decoder()
                    .values()
                    .filter(|t| t.special)
                    .map(|t| t.content.clone())
                    .collect();
                special.sort();
                Err(DataError::Tokenizer {
                    path: path.clone(),
                    detail: format!(
                        "no end-of-document token: no tokenizer_config.json eos_token beside it and none of its special tokens {special:?} is one of {EOD_SPELLINGS:?}; name one with --eod"
                    ),
                })
            }
        }
    }

    /// Errors unless a model of `vocab_size` embeds every id this tokenizer produces.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), DataError> {
        if vocab_size < self.vocab_size() {
            return Err(DataError::Config(format!(
                "`model.vocab_size` = {vocab_size} does not cover the {} ids of {}",
                self.vocab_size(),
                self.describe()
            )));
        }
        Ok(())
    }
}

/// The `eos_token` of `tokenizer_config.json` beside `path`, if there is one.
fn config_eos(path: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<Option<u32>, DataError> {
    let config = path.with_file_name("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&config) else {
        return Ok(None);
    };
    let bad = |detail: String| DataError::Tokenizer { path: config.clone(), detail };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let eos = match json.get("eos_token") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => match v.get("content").and_then(|c| c.as_str()) {
            Some(s) => s.to_string(),
            None => return Err(bad(format!("`eos_token` is {v}, neither a string nor {{\"content\": …}}"))),
        },
    };
    tokenizer
        .token_to_id(&eos)
        .map(Some)
        .ok_or_else(|| bad(format!("`eos_token` {eos:?} is not in the tokenizer's vocabulary")))
}
