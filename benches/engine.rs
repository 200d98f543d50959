//! Engine benchmark: prefill tokens/s on a ~200-token prompt and decode tokens/s over 64 tokens,
//! hat's engine side by side with candle-transformers' `quantized_llama` on the same GGUF with
//! dequantized (f32) weights. Runs alternate between the two, and medians are reported. Then
//! the LM head alone, as the device runs it per verification block: every row in f32 against
//! greedy decoding's screened head (an 8-bit copy bounds which rows can be the largest; those are
//! computed in f32: the same argmax), on the model's own final states of the prompt.
//!
//! `cargo bench --bench engine` (needs the default GGUF: recipes/fetch-assets.sh).
//! Environment: HAT_BENCH_MODEL (GGUF path), HAT_BENCH_REPEATS (default 5),
//! HAT_BENCH_PROMPT_TOKENS (default 200), HAT_BENCH_DECODE_TOKENS (default 64), HAT_BENCH_PARTS
//! (default `engine,head`; `kernel` adds the small-m kernel on one decoder layer's projections:
//! ms per layer and GFLOP/s at 1 to 64 rows, beside candle's gemm; `packed` the cloud's packed
//! pass over the default middle layers: N sessions' one-row blocks against one session's N-row
//! block, which shows what the per-session work costs; `rows` the default middle layers on a block
//! of 1 to 8 rows after the prompt, causal, as a chain and as a branching tree: what each row a
//! verification block adds costs the cloud; `q8` the 8-bit draft kernels; `q4` the f32 kernel
//! against the same weights read as exact 4-bit blocks).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use hat::io::source::{assets_dir, LoadedModel, ModelSpec, DEFAULT_ASSET_GGUF};
use hat::model::screen::{Screen, ScreenedHead};
use hat::testing::bench::{env_or, median};

const TEXT: &str = "The history of computing is a story of ideas that moved from laboratories into everyday \
life. Early machines filled entire rooms, consumed enormous amounts of power and could perform only a few \
thousand operations per second. Engineers programmed them by rewiring panels or feeding punched cards, and a \
single error could waste days of work. Over the following decades, transistors replaced vacuum tubes, \
integrated circuits replaced discrete components, and the microprocessor put a complete central processing \
unit on a single chip. Each step made computers smaller, cheaper and more reliable, and each step opened new \
markets: minicomputers for laboratories and small businesses, personal computers for homes and offices, and \
finally phones that carry more computing power than the machines that guided astronauts to the moon. Software \
followed a similar path, from hand-written machine code to compilers, operating systems, databases, networks \
and the web, and now to large language models that write text and code on request.";

fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()
}

struct Sample {
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

/// Times one prefill of `prompt` and `decode` greedy steps, given a `step(ids, pos) -> logits`.
fn run(prompt: &[u32], decode: usize, mut step: impl FnMut(&[u32], usize) -> anyhow::Result<Tensor>) -> anyhow::Result<Sample> {
    let t = Instant::now();
    let logits = step(prompt, 0)?;
    let mut next = argmax(&logits)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..decode {
        let logits = step(&[next], prompt.len() + i)?;
        next = argmax(&logits)?;
    }
    let dec = t.elapsed().as_secs_f64();
    Ok(Sample { prefill_tok_s: prompt.len() as f64 / prefill, decode_tok_s: decode as f64 / dec })
}

fn main() -> anyhow::Result<()> {
    // candle's QMatMul dequantizes every weight to f32 when this is set (read once per thread).
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = std::env::var("HAT_BENCH_MODEL").map(Into::into).unwrap_or_else(|_| assets_dir().join(DEFAULT_ASSET_GGUF));
    let repeats = env_or::<usize>("HAT_BENCH_REPEATS", 5);
    let prompt_len = env_or::<usize>("HAT_BENCH_PROMPT_TOKENS", 200);
    let decode = env_or::<usize>("HAT_BENCH_DECODE_TOKENS", 64);
    let dev = Device::Cpu;

    let loaded = LoadedModel::load(&ModelSpec::Gguf(path.clone()))?;
    let hat_model = loaded.model(DType::F32, &dev)?;
    let mut file = std::fs::File::open(&path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut candle_model = ModelWeights::from_gguf(content, &mut file, &dev)?;

    let mut prompt = Vec::new();
    while prompt.len() < prompt_len {
        prompt.extend(loaded.tokenizer.encode(TEXT)?);
    }
    prompt.truncate(prompt_len);

    let parts = std::env::var("HAT_BENCH_PARTS").unwrap_or_else(|_| "engine,head".into());
    if parts.split(',').any(|p| p == "engine") {
        engine(&hat_model, &mut candle_model, &prompt, repeats, decode)?;
    }
    if parts.split(',').any(|p| p == "head") {
        head(&hat_model, &prompt)?;
    }
    if parts.split(',').any(|p| p == "kernel") {
        kernel(&hat_model)?;
    }
    if parts.split(',').any(|p| p == "packed") {
        packed(&hat_model, &prompt)?;
    }
    if parts.split(',').any(|p| p == "rows") {
        rows(&hat_model, &prompt)?;
    }
    if parts.split(',').any(|p| p == "q8") {
        q8(&hat_model)?;
    }
    if parts.split(',').any(|p| p == "q4") {
        q4(&hat_model)?;
    }
    Ok(())
}

/// The head on 1, 3 and 5 rows of the model's final states: full f32 against screened.
fn head(model: &hat::model::Model, prompt: &[u32]) -> anyhow::Result<()> {
    let x = model.layers.forward(&model.embedder.embed_ids(prompt)?, 0, &mut model.new_cache())?; // (1, n, hidden)
    let mut screened = model.head.clone();
    screened.set_screen(true)?;
    let n = x.dim(1)?;
    // Every position's argmax agrees (what greedy decoding takes).
    let (mut same, mut kept) = (0, vec![]);
    for i in 0..n {
        let row = x.narrow(1, i, 1)?;
        let s = screened.forward_greedy(&row)?;
        same += usize::from(argmax(&model.head.forward_exact(&row)?)? == argmax(&s)?);
        kept.push(s.flatten_all()?.to_vec1::<f32>()?.iter().filter(|v| v.is_finite()).count() as f64);
    }
    // Both screens, on the normalised states the head multiplies.
    let screen = ScreenedHead::new(model.head.weight())?;
    let reps = 40;
    println!();
    println!("| LM head ({} threads), rows | full f32 ms | screened ms (as greedy decoding does) | ratio | screened with f32 states | screened with 16-bit states (VNNI) |", candle_core::utils::get_num_threads());
    println!("|---|---|---|---|---|---|");
    for rows in [1usize, 3, 5, 8] {
        let (mut full, mut scr, mut f32s, mut ints) = (vec![], vec![], vec![], vec![]);
        for r in 0..reps {
            let block = x.narrow(1, (r * 7) % (n - rows), rows)?;
            let normed = model.head.norm(&block)?;
            // Each screened pass follows a full one, which streams 113 MB through the caches as
            // the device's other layers do between verifications (a screened pass right after
            // another finds much of the 28 MB copy still cached).
            let t = Instant::now();
            model.head.forward_exact(&block)?;
            full.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            screened.forward_greedy(&block)?;
            scr.push(t.elapsed().as_secs_f64() * 1e3);
            model.head.forward_exact(&block)?;
            let t = Instant::now();
            screen.logits_with(&normed, model.head.weight(), Screen::F32)?;
            f32s.push(t.elapsed().as_secs_f64() * 1e3);
            model.head.forward_exact(&block)?;
            let t = Instant::now();
            screen.logits_with(&normed, model.head.weight(), Screen::Int8)?;
            ints.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (f, s) = (median(&full), median(&scr));
        println!("| {rows} | {f:.2} | {s:.2} | {:.2}x | {:.2} | {:.2} |", s / f, median(&f32s), median(&ints));
    }
    println!("argmax equal at {same}/{n} positions; rows computed in f32 after screening: median {:.0}, most {:.0}", median(&kept), kept.iter().copied().fold(0.0, f64::max));
    anyhow::ensure!(same == n, "the screened head's argmax differs from the full head's");
    Ok(())
}

/// The row-invariant small-m kernel on the projections of one decoder layer (the fused QKV,
/// output, fused gate/up and down weights of the model's first layer), as the cloud's packed
/// passes and the device's blocks run it, beside candle's gemm on the same rows, interleaved
/// repetition by repetition.
fn kernel(model: &hat::model::Model) -> anyhow::Result<()> {
    let weights = model.layers.projection_weights(0)?;
    let params: usize = weights.iter().map(|w| w.elem_count()).sum();
    let reps = env_or::<usize>("HAT_BENCH_KERNEL_REPEATS", 40);
    println!();
    println!("| rows ({} threads) | small-m ms per layer | GFLOP/s | gemm ms per layer | gemm / small-m |", candle_core::utils::get_num_threads());
    println!("|---|---|---|---|---|");
    let time = |xs: &[Tensor], gemm: bool| -> anyhow::Result<f64> {
        let t = Instant::now();
        for (w, x) in weights.iter().zip(xs) {
            if gemm {
                x.broadcast_matmul(&w.t()?)?;
            } else {
                hat::model::kernels::small_m_matmul(x, w)?;
            }
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    for m in [1usize, 2, 3, 5, 8, 16, 32, 48, 64] {
        let xs: Vec<Tensor> = weights.iter().map(|w| Tensor::randn(0f32, 1.0, (1, m, w.dim(1)?), &Device::Cpu)).collect::<Result<_, _>>()?;
        let (mut small, mut gemm) = (vec![], vec![]);
        for _ in 0..reps {
            small.push(time(&xs, false)?);
            gemm.push(time(&xs, true)?);
        }
        let (s, g) = (median(&small), median(&gemm));
        println!("| {m} | {s:.3} | {:.1} | {g:.3} | {:.2}x |", 2.0 * (m * params) as f64 / (s * 1e6), g / s);
    }
    Ok(())
}

/// The draft path's 8-bit kernels against the f32 one on a decoder layer's projections: ms per
/// layer and the bytes of weights read per second, hot (one layer, again and again: its weights
/// stay in the caches) and cold (each repetition the next of every layer: the weights come from
/// memory, as in a decode step); the 8-bit weights with f32 states (converted to f32 in the
/// kernel) and with states rounded to 16 bits (integer dot products, AVX-512 VNNI: what
/// `Q8Matrix::matmul` uses where the CPU has it), interleaved repetition by repetition.
fn q8(model: &hat::model::Model) -> anyhow::Result<()> {
    use hat::model::q8::{Q16States, Q8Matrix};
    let layers = model.layers.num_layers();
    let weights: Vec<Vec<Tensor>> = (0..layers).map(|l| model.layers.projection_weights(l)).collect::<Result<_, _>>()?;
    let ints: Vec<Vec<Q8Matrix>> = weights.iter().map(|ws| ws.iter().map(Q8Matrix::quantize).collect::<Result<_, _>>()).collect::<Result<_, _>>()?;
    let params: usize = weights[0].iter().map(|w| w.elem_count()).sum();
    let reps = env_or::<usize>("HAT_BENCH_KERNEL_REPEATS", 40) * layers / 4;
    let vnni = hat::model::kernels::has_vnni();
    println!();
    println!("| rows ({} threads) | weights | f32 ms per layer | GB/s | int8, f32 states, ms | GB/s | int8, 16-bit states{}, ms | GB/s | 16-bit / f32 states |", candle_core::utils::get_num_threads(), if vnni { " (VNNI)" } else { " (no VNNI: scalar)" });
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in [1usize, 3, 5, 8] {
        for cold in [false, true] {
            let xs: Vec<Tensor> = weights[0].iter().map(|w| Tensor::randn(0f32, 1.0, (1, m, w.dim(1)?), &Device::Cpu)).collect::<Result<_, _>>()?;
            let flat: Vec<Vec<f32>> = xs.iter().map(|x| x.flatten_all()?.to_vec1::<f32>()).collect::<Result<_, _>>()?;
            let (mut f, mut q, mut v) = (vec![], vec![], vec![]);
            let timed = |out: &mut Vec<f64>, run: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
                let t = Instant::now();
                run()?;
                out.push(t.elapsed().as_secs_f64() * 1e3);
                Ok(())
            };
            for r in 0..reps {
                // Each kernel reads another third of the layers, so none finds the last one's.
                let at = |shift: usize| if cold { (r + shift * layers / 3) % layers } else { 0 };
                timed(&mut f, &mut || {
                    for (w, x) in weights[at(0)].iter().zip(&xs) {
                        hat::model::kernels::small_m_matmul(x, w)?;
                    }
                    Ok(())
                })?;
                timed(&mut q, &mut || {
                    for (w, x) in ints[at(1)].iter().zip(&flat) {
                        w.matmul_rows(x, m);
                    }
                    Ok(())
                })?;
                timed(&mut v, &mut || {
                    for (w, x) in ints[at(2)].iter().zip(&flat) {
                        w.matmul_q16(&Q16States::new(x, w.cols()))?;
                    }
                    Ok(())
                })?;
            }
            let (f, q, v) = (median(&f), median(&q), median(&v));
            let name = if cold { "cold (every layer in turn)" } else { "hot (one layer)" };
            println!("| {m} | {name} | {f:.3} | {:.1} | {q:.3} | {:.1} | {v:.3} | {:.1} | {:.2} |", 4.0 * params as f64 / (f * 1e6), params as f64 / (q * 1e6), params as f64 / (v * 1e6), v / q);
        }
    }
    Ok(())
}

/// The LLM path's f32 small-m kernel against the same weights as 4-bit affine blocks
/// (`PackedQ4`, the same bits) on a decoder layer's projections: ms per layer, hot and cold as in
/// part `q8`, interleaved repetition by repetition.
fn q4(model: &hat::model::Model) -> anyhow::Result<()> {
    use hat::model::q4::PackedQ4;
    let layers = model.layers.num_layers();
    let weights: Vec<Vec<Tensor>> = (0..layers).map(|l| model.layers.projection_weights(l)).collect::<Result<_, _>>()?;
    let packed: Vec<Vec<PackedQ4>> = weights
        .iter()
        .map(|ws| ws.iter().map(|w| PackedQ4::detect(w)?.ok_or_else(|| anyhow::anyhow!("a projection is not 4-bit blocks (or no AVX-512)"))).collect::<anyhow::Result<_>>())
        .collect::<anyhow::Result<_>>()?;
    let params: usize = weights[0].iter().map(|w| w.elem_count()).sum();
    let bytes: usize = packed[0].iter().map(|p| p.bytes()).sum();
    let reps = env_or::<usize>("HAT_BENCH_KERNEL_REPEATS", 40) * layers / 4;
    println!();
    println!("| rows ({} threads) | weights | f32 ms per layer | GB/s | 4-bit blocks ms | GB/s | blocks / f32 |", candle_core::utils::get_num_threads());
    println!("|---|---|---|---|---|---|---|");
    for m in [1usize, 2, 3, 4, 5, 6, 8, 10, 12, 16] {
        for cold in [false, true] {
            let xs: Vec<Tensor> = weights[0].iter().map(|w| Tensor::randn(0f32, 1.0, (1, m, w.dim(1)?), &Device::Cpu)).collect::<Result<_, _>>()?;
            let (mut f, mut q) = (vec![], vec![]);
            for r in 0..reps {
                let at = |shift: usize| if cold { (r + shift * layers / 2) % layers } else { 0 };
                let t = Instant::now();
                for (w, x) in weights[at(0)].iter().zip(&xs) {
                    hat::model::kernels::small_m_matmul(x, w)?;
                }
                f.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                for (w, x) in packed[at(1)].iter().zip(&xs) {
                    w.matmul(x)?;
                }
                q.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let (f, q) = (median(&f), median(&q));
            let name = if cold { "cold (every layer in turn)" } else { "hot (one layer)" };
            println!("| {m} | {name} | {f:.3} | {:.1} | {q:.3} | {:.1} | {:.2} |", 4.0 * params as f64 / (f * 1e6), bytes as f64 / (q * 1e6), q / f);
        }
    }
    Ok(())
}

/// The default split's middle layers ([2, 28)) and the prompt's input-submodel states, split
/// into the context before its last `tail` positions `(1, len - tail, hidden)` and those
/// positions `(1, tail, hidden)`, the rows a benchmark sends after the cached context.
fn middle_and_prompt(model: &hat::model::Model, prompt: &[u32], tail: usize) -> anyhow::Result<(hat::model::LayerStack, Tensor, Tensor)> {
    let middle = model.layers.slice(2..28)?;
    let input = model.layers.slice(0..2)?;
    let x = input.forward(&model.embedder.embed_ids(prompt)?, 0, &mut input.new_cache())?;
    let n = x.dim(1)?.checked_sub(tail).ok_or_else(|| anyhow::anyhow!("the prompt is shorter than {tail} positions"))?;
    Ok((middle, x.narrow(1, 0, n)?, x.narrow(1, n, tail)?))
}

/// The cloud's packed pass through the default split's middle layers ([2, 28)): N sessions, each
/// with the prompt's states in its cache, send one row each (`forward_packed`), against one
/// session sending a block of N rows (the same weights and row count, one session's work) and N
/// one-row passes one after the other (no packing).
fn packed(model: &hat::model::Model, prompt: &[u32]) -> anyhow::Result<()> {
    let (middle, context, rows) = middle_and_prompt(model, prompt, 64)?;
    let n = context.dim(1)?;
    let reps = env_or::<usize>("HAT_BENCH_KERNEL_REPEATS", 15);
    println!();
    println!("| sessions ({} threads) | packed pass ms | one session's block of as many rows, ms | one-row passes one by one, ms | packed / one block |", candle_core::utils::get_num_threads());
    println!("|---|---|---|---|---|");
    for sessions in [1usize, 4, 16, 32] {
        let mut caches: Vec<hat::model::StackCache> = (0..sessions).map(|_| middle.new_cache()).collect();
        for c in caches.iter_mut() {
            middle.forward(&context, 0, c)?;
        }
        let mut one = middle.new_cache();
        middle.forward(&context, 0, &mut one)?;
        let (mut pk, mut blk, mut seq) = (vec![], vec![], vec![]);
        for r in 0..reps {
            let t = Instant::now();
            let mut blocks: Vec<hat::model::PackedBlock> = caches.iter_mut().enumerate().map(|(i, cache)| Ok(hat::model::PackedBlock { x: rows.narrow(1, (i + r) % 64, 1)?, cache, tree: None })).collect::<candle_core::Result<_>>()?;
            middle.forward_packed(&mut blocks)?;
            pk.push(t.elapsed().as_secs_f64() * 1e3);
            caches.iter_mut().for_each(|c| c.truncate(n));
            let t = Instant::now();
            middle.forward_tree(&rows.narrow(1, 0, sessions)?, &mut one, hat::model::tree::TreeShape::chain(sessions)?.mask(n, 0..sessions))?;
            blk.push(t.elapsed().as_secs_f64() * 1e3);
            one.truncate(n);
            let t = Instant::now();
            for (i, cache) in caches.iter_mut().enumerate() {
                middle.forward(&rows.narrow(1, (i + r) % 64, 1)?, n, cache)?;
            }
            seq.push(t.elapsed().as_secs_f64() * 1e3);
            caches.iter_mut().for_each(|c| c.truncate(n));
        }
        let (p, b, q) = (median(&pk), median(&blk), median(&seq));
        println!("| {sessions} | {p:.1} | {b:.1} | {q:.1} | {:.2}x |", p / b);
    }
    Ok(())
}

/// The default middle layers (26) on a block of `m` rows after the prompt's cache: a causal
/// block, the same rows as a chain through the tree path, and a two-wide tree (every node's
/// parent is the node two before it, or the block's first), interleaved repetitions.
fn rows(model: &hat::model::Model, prompt: &[u32]) -> anyhow::Result<()> {
    use hat::model::tree::TreeShape;
    let (middle, context, block) = middle_and_prompt(model, prompt, 16)?;
    let n = context.dim(1)?;
    let mut cache = middle.new_cache();
    middle.forward(&context, 0, &mut cache)?;
    let reps = env_or::<usize>("HAT_BENCH_KERNEL_REPEATS", 15);
    // Idle time before each timed pass, as a server waiting for the next block has (0: back to back).
    let idle = std::time::Duration::from_millis(env_or::<u64>("HAT_BENCH_IDLE_MS", 0));
    println!();
    println!("| rows after {n} cached ({} threads) | causal ms | chain (tree path) ms | two-wide tree ms | causal ms per row over one |", candle_core::utils::get_num_threads());
    println!("|---|---|---|---|---|");
    let mut one = None;
    for m in [1usize, 2, 3, 4, 5, 6, 8, 10, 12, 16] {
        let rows = block.narrow(1, 0, m)?;
        let wide = TreeShape::new((0..m).map(|i| if i == 0 { hat::model::tree::ROOT } else { i.saturating_sub(2) as u16 }).collect())?;
        let (mut causal, mut chain, mut tree) = (vec![], vec![], vec![]);
        for _ in 0..reps {
            std::thread::sleep(idle);
            let t = Instant::now();
            middle.forward(&rows, n, &mut cache)?;
            causal.push(t.elapsed().as_secs_f64() * 1e3);
            cache.truncate(n);
            std::thread::sleep(idle);
            let t = Instant::now();
            middle.forward_tree(&rows, &mut cache, TreeShape::chain(m)?.mask(n, 0..m))?;
            chain.push(t.elapsed().as_secs_f64() * 1e3);
            cache.truncate(n);
            std::thread::sleep(idle);
            let t = Instant::now();
            middle.forward_tree(&rows, &mut cache, wide.mask(n, 0..m))?;
            tree.push(t.elapsed().as_secs_f64() * 1e3);
            cache.truncate(n);
        }
        let (c, h, w) = (median(&causal), median(&chain), median(&tree));
        let base = *one.get_or_insert(c);
        let per_row = if m > 1 { format!("{:.2}", (c - base) / (m - 1) as f64) } else { "–".into() };
        println!("| {m} | {c:.1} | {h:.1} | {w:.1} | {per_row} |");
    }
    Ok(())
}

/// The engines side by side: prefill and decode tokens/s.
fn engine(hat_model: &hat::model::Model, candle_model: &mut ModelWeights, prompt: &[u32], repeats: usize, decode: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let prompt_len = prompt.len();
    let (mut hp, mut hd, mut cp, mut cd) = (vec![], vec![], vec![], vec![]);
    let (mut rp, mut rd) = (vec![], vec![]);
    eprintln!("{repeats} alternating runs of each engine: {prompt_len}-token prefill + {decode} decode steps");
    for r in 0..=repeats {
        let mut cache = hat_model.new_cache();
        let h = run(prompt, decode, |ids, _| Ok(hat_model.forward_last(ids, &mut cache)?))?;
        let c = run(prompt, decode, |ids, pos| {
            let x = Tensor::new(ids, &dev)?.unsqueeze(0)?;
            Ok(candle_model.forward(&x, pos)?)
        })?;
        if r == 0 {
            continue; // warm-up
        }
        eprintln!(
            "run {r}: hat {:.0} / {:.1} tok/s, candle {:.0} / {:.1} tok/s (prefill / decode)",
            h.prefill_tok_s, h.decode_tok_s, c.prefill_tok_s, c.decode_tok_s
        );
        rp.push(h.prefill_tok_s / c.prefill_tok_s);
        rd.push(h.decode_tok_s / c.decode_tok_s);
        hp.push(h.prefill_tok_s);
        hd.push(h.decode_tok_s);
        cp.push(c.prefill_tok_s);
        cd.push(c.decode_tok_s);
    }
    let (hp, hd, cp, cd) = (median(&hp), median(&hd), median(&cp), median(&cd));
    println!("| engine ({} threads) | prefill tok/s ({prompt_len} tokens) | decode tok/s ({decode} tokens) |", candle_core::utils::get_num_threads());
    println!("|---|---|---|");
    println!("| hat (f32) | {hp:.0} | {hd:.1} |");
    println!("| candle quantized_llama (dequantized f32) | {cp:.0} | {cd:.1} |");
    println!("| ratio of medians hat / candle | {:.2}x | {:.2}x |", hp / cp, hd / cd);
    println!("| median of paired per-run ratios | {:.2}x | {:.2}x |", median(&rp), median(&rd));
    Ok(())
}
