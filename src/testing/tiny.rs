//! Tiny random models written to disk, for tests that need a real model directory without any
//! download.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::config::Family;
use crate::error::{Error, Result};

/// Shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub family: Family,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tie_embeddings: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self { family: Family::Llama, layers: 6, hidden: 64, heads: 4, kv_heads: 2, intermediate: 128, tie_embeddings: true, seed: 7 }
    }
}

/// The special tokens of the tiny tokenizer, after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Vocabulary size of tiny models (256 bytes + specials + padding).
pub const TINY_VOCAB: usize = 264;
const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A byte-level BPE tokenizer without merges: every byte is a token, plus [`SPECIAL_TOKENS`].
pub fn byte_tokenizer() -> Result<Tokenizer> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(&SPECIAL_TOKENS.map(|t| AddedToken::from(t, true)));
    Ok(tok)
}

/// A small deterministic generator (candle's CPU device cannot be seeded).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
}

/// Writes a random model of `spec` as a Hugging Face directory under `dir`; returns `dir`.
pub fn tiny_model(dir: &Path, spec: TinySpec) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dev = Device::Cpu;
    let mut rng = SplitMix64(spec.seed);
    let head_dim = spec.hidden / spec.heads;
    let (h, i, q, kv) = (spec.hidden, spec.intermediate, spec.hidden, spec.kv_heads * head_dim);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f64, offset: f64| -> Result<()> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| (rng.normal() * scale + offset) as f32).collect();
        t.insert(name, Tensor::from_vec(values, shape, &dev)?.to_dtype(DType::F32)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[TINY_VOCAB, h], 1.0, 0.0)?;
    put("model.norm.weight".into(), &[h], 0.1, 1.0)?;
    if !spec.tie_embeddings {
        put("lm_head.weight".into(), &[TINY_VOCAB, h], 0.2, 0.0)?;
    }
    let w = 1.0 / (h as f64).sqrt();
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], 0.1, 1.0)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.1, 1.0)?;
        put(format!("{p}.self_attn.q_proj.weight"), &[q, h], 3.0 * w, 0.0)?;
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 3.0 * w, 0.0)?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], w, 0.0)?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, q], w, 0.0)?;
        if spec.family == Family::Qwen2 {
            put(format!("{p}.self_attn.q_proj.bias"), &[q], 0.1, 0.0)?;
            put(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.1, 0.0)?;
            put(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.1, 0.0)?;
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], w, 0.0)?;
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], w, 0.0)?;
        put(format!("{p}.mlp.down_proj.weight"), &[h, i], 1.0 / (i as f64).sqrt(), 0.0)?;
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let (model_type, arch) = match spec.family {
        Family::Llama => ("llama", "LlamaForCausalLM"),
        Family::Mistral => ("mistral", "MistralForCausalLM"),
        Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let config = serde_json::json!({
        "architectures": [arch], "model_type": model_type, "vocab_size": TINY_VOCAB,
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": spec.tie_embeddings, "hidden_act": "silu",
        "bos_token_id": 257, "eos_token_id": 258,
    });
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).map_err(|e| Error::bad_file(&p, e))?).map_err(|e| Error::io(&p, e))
    };
    write("config.json", &config)?;
    write(
        "tokenizer_config.json",
        &serde_json::json!({ "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE }),
    )?;
    let tok_path = dir.join("tokenizer.json");
    byte_tokenizer()?.save(&tok_path, false).map_err(|e| Error::bad_file(&tok_path, e))?;
    Ok(dir.to_path_buf())
}
