//! How a model wants its prompt: the chat template it ships (GGUF `tokenizer.chat_template`,
//! or an HF directory's `chat_template.jinja` or `tokenizer_config.json` `chat_template`),
//! whether a raw prompt starts with BOS, and the tokens that end a reply.

use std::path::Path;

use serde_json::Value;

use crate::io::gguf::MetaValue;
use crate::io::{Gguf, GgufModel, read_json_if_present};
use crate::{LlamaConfig, ModelError, Result, Tokenizer};

/// A Jinja chat template, rendered as transformers' `apply_chat_template` renders it
/// (`trim_blocks`, `lstrip_blocks`, loop controls, Python's string methods, `raise_exception`).
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// One turn of a conversation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatTemplate {
    /// A template from its source and the texts of the BOS and EOS tokens it may print.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Self {
        Self {
            source,
            bos_token,
            eos_token,
        }
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The conversation as the model's prompt text, ending with the assistant's header when
    /// `add_generation_prompt`.
    ///
    /// # Errors
    /// [`ModelError::Text`] when the template does not parse or fails (its own
    /// `raise_exception` included), with minijinja's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let bad = |e: minijinja::Error| ModelError::Text {
            what: "chat template",
            msg: format!("{e:#}"),
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, _> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source).map_err(bad)?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(bad)
    }
}

/// What generation (`loftq_models::generate`) needs to know about a model's prompts.
#[derive(Clone, Debug)]
pub struct PromptFormat {
    /// The model's chat template, if it has one.
    pub template: Option<ChatTemplate>,
    /// BOS, prepended to a raw prompt when the model expects it.
    pub bos: Option<u32>,
    /// Tokens that end a reply: EOS, and end-of-turn tokens.
    pub stop: Vec<u32>,
}

impl PromptFormat {
    /// The format of the model at `path` (a `.gguf` file or an HF directory).
    ///
    /// # Errors
    /// [`ModelError::Format`] when the config cannot be read, or a side file exists but cannot
    /// be read.
    pub fn for_model(path: &Path, tok: &Tokenizer) -> Result<Self> {
        if crate::io::is_gguf(path) {
            let m = GgufModel::open(path)?;
            return Ok(Self::of_gguf(&m.gguf, &m.config));
        }
        let config = LlamaConfig::from_file(&path.join("config.json"))?;
        let read_json = |name: &str| read_json_if_present::<Value>(&path.join(name), "bad JSON");
        let tc = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let token_text = |key: &str| match &tc[key] {
            Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let jinja = path.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            match &tc["chat_template"] {
                Value::String(s) => Some(s.clone()),
                // A list of named templates: the default one.
                Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let template =
            source.map(|s| ChatTemplate::new(s, token_text("bos_token"), token_text("eos_token")));
        // The tokenizer's own post-processor says whether BOS starts a sequence.
        let bos = config.bos_token_id.filter(|&b| {
            tok.encode_with_special("a")
                .is_ok_and(|ids| ids.first() == Some(&b))
        });
        let mut stop: Vec<u32> = config.eos_token_id.into_iter().collect();
        if let Some(gc) = read_json("generation_config.json")? {
            stop.extend(ids_of(&gc["eos_token_id"]));
        }
        stop.sort_unstable();
        stop.dedup();
        Ok(Self {
            template,
            bos,
            stop,
        })
    }

    fn of_gguf(g: &Gguf, config: &LlamaConfig) -> Self {
        let tokens = g
            .meta("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array);
        let id = |key: &str| {
            g.meta(&format!("tokenizer.ggml.{key}"))
                .and_then(MetaValue::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| tokens?.get(i as usize)?.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let template = g
            .meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(|s| {
                ChatTemplate::new(
                    s.to_string(),
                    text(config.bos_token_id),
                    text(config.eos_token_id),
                )
            });
        // llama.cpp's default: SentencePiece vocabularies start with BOS, BPE ones do not.
        let spm = g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str) == Some("llama");
        let add_bos = match g.meta("tokenizer.ggml.add_bos_token") {
            Some(MetaValue::Bool(b)) => *b,
            _ => spm,
        };
        let mut stop: Vec<u32> = [config.eos_token_id, id("eot_token_id"), id("eom_token_id")]
            .into_iter()
            .flatten()
            .collect();
        stop.sort_unstable();
        stop.dedup();
        Self {
            template,
            bos: config.bos_token_id.filter(|_| add_bos),
            stop,
        }
    }

    /// The token ids of a prompt: through the chat template when `chat` and the model has one
    /// (`system` first when given), else the raw text after BOS when the model expects it.
    ///
    /// # Errors
    /// [`ModelError::Settings`] when `chat` is asked of a model without a template;
    /// [`ModelError::Text`] when the template or the tokenizer fails.
    pub fn encode(
        &self,
        tok: &Tokenizer,
        prompt: &str,
        chat: bool,
        system: Option<&str>,
    ) -> Result<Vec<u32>> {
        if !chat {
            let mut ids: Vec<u32> = self.bos.into_iter().collect();
            ids.extend(tok.encode(prompt)?);
            return Ok(ids);
        }
        let template = self.template.as_ref().ok_or_else(|| {
            ModelError::Settings("the model has no chat template; use a raw prompt".into())
        })?;
        let turn = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let messages: Vec<Message> = system
            .map(|s| turn("system", s))
            .into_iter()
            .chain([turn("user", prompt)])
            .collect();
        // As transformers: the rendered text carries its own BOS, if any.
        tok.encode(&template.render(&messages, true)?)
    }
}

/// Token ids in a JSON number or list of numbers.
fn ids_of(v: &Value) -> Vec<u32> {
    let one = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        Value::Array(a) => a.iter().filter_map(one).collect(),
        v => one(v).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_as_transformers() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new());
        let m = [Message {
            role: "user".into(),
            content: " Hi there ".into(),
        }];
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let raising = "{{ raise_exception('no system role') }}";
        let t = ChatTemplate::new(raising.into(), String::new(), String::new());
        let e = t.render(&m, true).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0]['content'].strip().upper() }}{% if messages[0].content.startswith('x') %}!{% endif %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new());
        let m = [Message {
            role: "user".into(),
            content: " xy ".into(),
        }];
        assert_eq!(t.render(&m, false).unwrap(), "XY");
    }
}
