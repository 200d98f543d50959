//! Integration tests on the real default model, SmolLM2-135M-Instruct (GGUF, from
//! `recipes/fetch-assets.sh`). They fail when the assets are missing: run the recipe first.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use hat::decode::{generate, Decoder, ModelDecoder, SamplingParams};
use hat::split::LocalSplitDecoder;
use hat::io::source::{LoadedModel, ModelSpec};
use hat::testing::{default_gguf, SplitWorld};
use hat::split::{write_split, SplitPlan};
use hat::io::tokenizer::Message;

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load(&ModelSpec::Gguf(default_gguf().unwrap())).expect("load the default model"))
}

#[test]
fn split_reproduces_the_unsplit_model_to_the_last_logit() {
    let loaded = model();
    assert_eq!(loaded.config.num_hidden_layers, 30);
    let world = SplitWorld::new(loaded, 2, 2).unwrap();
    let (device, cloud) = (&world.device, world.cloud.as_ref());
    let reference = loaded.model(DType::F32, &Device::Cpu).unwrap();

    let ids = device.tokenizer.encode_prompt("Explain in two sentences why the sky is blue.", true).unwrap();
    assert_eq!(ids, loaded.tokenizer.encode_prompt("Explain in two sentences why the sky is blue.", true).unwrap());
    let want = reference.forward_all(&ids, &mut reference.new_cache()).unwrap();
    let got = LocalSplitDecoder::new(device, cloud).unwrap().feed_all(&ids).unwrap();
    let delta = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(delta <= 1e-4, "max |Δ logits| = {delta}");

    let greedy = SamplingParams::greedy();
    let eos = &device.tokenizer.eos_token_ids;
    let run = |d: &mut dyn FnMut(&[u32]) -> hat::Result<Tensor>| -> Vec<u32> {
        struct Dyn<'a>(&'a mut dyn FnMut(&[u32]) -> hat::Result<Tensor>, usize);
        impl Decoder for Dyn<'_> {
            fn feed(&mut self, ids: &[u32]) -> hat::Result<Tensor> {
                self.1 += ids.len();
                (self.0)(ids)
            }
            fn position(&self) -> usize {
                self.1
            }
            fn max_positions(&self) -> usize {
                8192
            }
            fn reset(&mut self) {}
        }
        // No EOS stop: always 32 tokens.
        generate(&mut Dyn(d, 0), &ids, 32, &greedy, &[], |_| Ok(())).unwrap().token_ids
    };
    let mut whole = ModelDecoder::new(&reference);
    let mut split = LocalSplitDecoder::new(device, cloud).unwrap();
    let a = run(&mut |x| whole.feed(x));
    let b = run(&mut |x| split.feed(x));
    assert_eq!(a.len(), 32);
    assert_eq!(a, b, "greedy tokens differ");
    let text = device.tokenizer.decode(&a, true).unwrap();
    assert!(text.to_lowercase().contains("light") || text.to_lowercase().contains("scatter"), "{text}");
    let _ = eos;
}

/// The default GGUF's decoder layers are Q4_1: with AVX-512 every projection packs as exact
/// 4-bit blocks, and the packed product of the model's own hidden states is the f32 kernel's,
/// bit for bit, for the block sizes decoding, verification and trees use.
#[test]
fn every_projection_packs_and_computes_the_f32_bits() {
    use hat::model::q4::{self, PackedQ4};
    let loaded = model();
    let reference = loaded.model(DType::F32, &Device::Cpu).unwrap();
    let (packed, all) = reference.layers.packed_projections();
    if !q4::enabled() {
        assert_eq!(packed, 0, "packed without the kernel");
        eprintln!("no AVX-512 here (or HAT_PACKED_WEIGHTS=off): the f32 weights serve alone");
        return;
    }
    assert_eq!((packed, all), (120, 120));
    let ids = loaded.tokenizer.encode_prompt("Write a haiku about the sea.", true).unwrap();
    let x = reference.embedder.embed_ids(&ids).unwrap(); // (1, n, 576)
    for layer in [0, 13, 29] {
        for w in reference.layers.projection_weights(layer).unwrap() {
            let p = PackedQ4::detect(&w).unwrap().expect("a Q4_1 projection packs");
            let k = w.dim(1).unwrap();
            for m in [1, 3, 8] {
                // The layer's real input width: the states themselves, or tiled up to the down
                // projection's 1536.
                let rows = x.narrow(1, 0, m).unwrap();
                let rows = Tensor::cat(&vec![&rows; k.div_ceil(576)], 2).unwrap().narrow(2, 0, k).unwrap().contiguous().unwrap();
                let want = hat::model::kernels::small_m_matmul(&rows, &w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = p.matmul(&rows).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {layer}, {:?}, m = {m}", w.dims());
            }
        }
    }
}

#[test]
fn gguf_tokenizer_round_trips() {
    let tok = &model().tokenizer;
    for text in [
        "Hello, world!",
        "naïve café — Straße, 東京, Привет, 🚀🦀",
        "1234567890 and 3.14159 and 2024-11-21",
        "  leading,   multiple   spaces\n\ttabs\r\nand\n\n\nnewlines  ",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "fn main() { println!(\"{}\", x + 1); }",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
    // Special tokens are single ids; digits are split one by one (SmolLM's pre-tokenizer).
    assert_eq!(tok.encode("<|im_start|>").unwrap(), [1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), [2]);
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), [0]);
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
    assert_eq!(tok.encode(" hello world").unwrap().len(), 2);
    assert_eq!(tok.eos_token_ids, [2]);
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn chat_template_renders_like_the_model_expects() {
    let tok = &model().tokenizer;
    let tmpl = tok.chat_template.as_ref().expect("the GGUF carries a chat template");
    let text = tmpl.render(&[Message::user("What is 2+2?")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = tmpl
        .render(&[Message { role: "system".into(), content: "Be brief.".into() }, Message::user("Hi")], false)
        .unwrap();
    assert_eq!(with_system, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    let ids = tok.encode_prompt("What is 2+2?", true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.encode_prompt("What is 2+2?", false).unwrap(), tok.encode("What is 2+2?").unwrap());
    // A prompt cut to fit keeps the template around it: the reply still follows the assistant header.
    let long = "Tell me about the history of the Roman Empire, its emperors, wars and roads. ".repeat(20);
    let cut = tok.encode_prompt_within(&long, true, 64).unwrap();
    assert_eq!(cut.len(), 64);
    let cut_text = tok.decode(&cut, false).unwrap();
    assert!(cut_text.starts_with("<|im_start|>system\nYou are a helpful AI assistant") && cut_text.contains("user\nTell me about"), "{cut_text}");
    assert!(cut_text.ends_with("<|im_end|>\n<|im_start|>assistant\n"), "{cut_text}");
    assert_eq!(tok.encode_prompt_within("What is 2+2?", true, 64).unwrap(), ids, "a prompt that fits is left alone");
    assert!(tok.encode_prompt_within(&long, true, 10).unwrap_err().to_string().contains("chat template alone"));
}

#[test]
fn greedy_generation_answers_and_stops_at_eos() {
    let loaded = model();
    let m = loaded.model(DType::F32, &Device::Cpu).unwrap();
    let ids = loaded.tokenizer.encode_prompt("What is the capital of France?", true).unwrap();
    let r = generate(&mut ModelDecoder::new(&m), &ids, 64, &SamplingParams::greedy(), &loaded.tokenizer.eos_token_ids, |_| Ok(())).unwrap();
    let text = loaded.tokenizer.decode(&r.token_ids, true).unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(r.stop_reason, hat::decode::StopReason::Eos);
    assert_eq!(r.token_ids.last(), Some(&2));

    // Sampling is deterministic per seed and differs across seeds.
    let s = |seed| {
        let p = SamplingParams { temperature: 1.0, top_p: Some(0.95), top_k: None, seed };
        generate(&mut ModelDecoder::new(&m), &ids, 24, &p, &[], |_| Ok(())).unwrap().token_ids
    };
    assert_eq!(s(1), s(1));
    assert_ne!(s(1), s(2));
}

#[test]
fn split_validation_errors_are_clear() {
    let loaded = model();
    for (k1, k2, needle) in [(0, 2, "--input-layers"), (2, 0, "--output-layers"), (15, 15, "less than the model's 30 layers"), (29, 1, "less than")] {
        let err = SplitPlan::new(30, k1, k2).unwrap_err().to_string();
        assert!(err.contains(needle), "K1={k1} K2={k2}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    // A non-empty --out without --force.
    std::fs::write(dir.path().join("x"), "x").unwrap();
    let err = write_split(loaded, &SplitPlan::new(30, 2, 2).unwrap(), dir.path(), DType::F32, false, &indicatif::ProgressBar::hidden())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");
    // A corrupt (truncated) GGUF and an unreadable model.
    let bytes = std::fs::read(default_gguf().unwrap()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = LoadedModel::load(&ModelSpec::parse(cut.to_str().unwrap()).unwrap()).unwrap_err().to_string();
    assert!(err.contains("cut.gguf") && err.contains("corrupt"), "{err}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a gguf file").unwrap();
    let err = LoadedModel::load(&ModelSpec::parse(junk.to_str().unwrap()).unwrap()).unwrap_err().to_string();
    assert!(err.contains("not a readable GGUF file"), "{err}");
    let err = ModelSpec::parse(dir.path().to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("no config.json"), "{err}");
}

#[test]
fn truncated_sharegpt_recovers_every_complete_conversation() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(hat::io::source::assets_dir())
        .join("sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json");
    assert!(path.is_file(), "ShareGPT is missing at {}: run recipes/fetch-assets.sh", path.display());
    let r = hat::io::dataset::load_sharegpt(&path).unwrap();
    assert_eq!(r.conversations.len(), 17_671);
    assert!(r.truncated);
    assert_eq!((r.skipped(), r.skipped_malformed, r.empty()), (1, 0, 126));
    assert!(r.conversations.iter().filter_map(|c| c.first_prompt()).count() > 17_000);
}
