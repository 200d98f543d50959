//! `hat split` on tiny in-process models: bundle contents, split ids, equivalence, errors.

use candle_core::{DType, Device, Tensor};
use hat::model::config::Family;
use hat::decode::{Decoder, ModelDecoder};
use hat::split::LocalSplitDecoder;
use hat::io::source::{LoadedModel, ModelSpec};
use hat::split::{write_split, CloudBundle, DeviceBundle, SplitPlan};
use hat::testing::{tiny_model, TinySpec};

fn tiny(spec: TinySpec) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(&dir.path().join("model"), spec).unwrap();
    let m = LoadedModel::load(&ModelSpec::HfDir(dir.path().join("model"))).unwrap();
    (dir, m)
}

fn hidden_bar() -> indicatif::ProgressBar {
    indicatif::ProgressBar::hidden()
}

fn tensor_names(path: &std::path::Path) -> Vec<String> {
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path).unwrap() };
    let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    names
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn bundles_hold_exactly_their_layers_and_share_a_split_id() {
    let (dir, model) = tiny(TinySpec::default());
    let plan = SplitPlan::new(6, 1, 2).unwrap();
    let out = dir.path().join("split");
    let res = write_split(&model, &plan, &out, DType::F32, false, &hidden_bar()).unwrap();

    let device = tensor_names(&out.join("device/weights.safetensors"));
    let cloud = tensor_names(&out.join("cloud/weights.safetensors"));
    assert!(device.contains(&"model.embed_tokens.weight".to_string()));
    assert!(device.contains(&"model.norm.weight".to_string()));
    let layers_of = |names: &[String]| {
        let mut l: Vec<usize> = names
            .iter()
            .filter_map(|n| n.strip_prefix("model.layers.")?.split('.').next()?.parse().ok())
            .collect();
        l.dedup();
        l
    };
    assert_eq!(layers_of(&device), [0, 4, 5]);
    assert_eq!(layers_of(&cloud), [1, 2, 3]);
    assert!(cloud.iter().all(|n| n.starts_with("model.layers.")), "cloud holds only middle layers: {cloud:?}");
    for f in ["tokenizer.json", "tokenizer_config.json", "manifest.json"] {
        assert!(out.join("device").join(f).exists(), "device/{f}");
    }
    assert!(!out.join("cloud/tokenizer.json").exists());

    let d = DeviceBundle::load(&out.join("device"), &Device::Cpu).unwrap();
    let c = CloudBundle::load(&out.join("cloud"), &Device::Cpu).unwrap();
    assert_eq!(d.manifest.split_id, res.split_id);
    assert_eq!(c.manifest.split_id, res.split_id);
    assert_eq!((d.input.range(), c.middle.range(), d.output.range()), (0..1, 1..4, 4..6));

    // The same split made twice gets the same id; another cut another id.
    let again = write_split(&model, &plan, &dir.path().join("again"), DType::F32, false, &hidden_bar()).unwrap();
    assert_eq!(again.split_id, res.split_id);
    let other = write_split(&model, &SplitPlan::new(6, 2, 2).unwrap(), &dir.path().join("other"), DType::F32, false, &hidden_bar()).unwrap();
    assert_ne!(other.split_id, res.split_id);

    // Halves of different splits refuse to work together; roles are checked.
    let d_other = DeviceBundle::load(&dir.path().join("other/device"), &Device::Cpu).unwrap();
    let err = LocalSplitDecoder::new(&d_other, &c).unwrap_err().to_string();
    assert!(err.contains("different splits"), "{err}");
    let err = DeviceBundle::load(&out.join("cloud"), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not a device bundle"), "{err}");
}

#[test]
fn split_pipeline_reproduces_the_unsplit_model() {
    for spec in [TinySpec::default(), TinySpec { family: Family::Qwen2, tie_embeddings: false, ..TinySpec::default() }] {
        let (dir, model) = tiny(spec);
        let out = dir.path().join("split");
        write_split(&model, &SplitPlan::new(6, 2, 1).unwrap(), &out, DType::F32, false, &hidden_bar()).unwrap();
        let d = DeviceBundle::load(&out.join("device"), &Device::Cpu).unwrap();
        let c = CloudBundle::load(&out.join("cloud"), &Device::Cpu).unwrap();
        let reference = model.model(DType::F32, &Device::Cpu).unwrap();
        let ids = d.tokenizer.encode_prompt("Hello there, tiny model!", true).unwrap();

        let want = reference.forward_all(&ids, &mut reference.new_cache()).unwrap();
        let mut split = LocalSplitDecoder::new(&d, &c).unwrap();
        let got = split.feed_all(&ids).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{spec:?}");

        // Decoding continues identically.
        let mut whole = ModelDecoder::new(&reference);
        whole.feed(&ids).unwrap();
        for t in [5u32, 77, 200] {
            assert_eq!(max_abs_diff(&split.feed(&[t]).unwrap(), &whole.feed(&[t]).unwrap()), 0.0);
        }
    }
}

#[test]
fn half_precision_bundles_load_and_stay_close() {
    let (dir, model) = tiny(TinySpec::default());
    let reference = model.model(DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (10..40).collect();
    let want = reference.forward_all(&ids, &mut reference.new_cache()).unwrap();
    let plan = SplitPlan::new(6, 2, 2).unwrap();
    let f32_bytes = write_split(&model, &plan, &dir.path().join("f32"), DType::F32, false, &hidden_bar()).unwrap().cloud_bytes;
    // Rounding the weights moves the logits of this random 6-layer model by ~1% (f16) and several
    // percent (bf16, 8 bits of mantissa); a wrong conversion would give garbage.
    for (dtype, tolerance) in [(DType::F16, 0.05), (DType::BF16, 0.2)] {
        let out = dir.path().join(dtype.as_str());
        let res = write_split(&model, &plan, &out, dtype, false, &hidden_bar()).unwrap();
        assert!(res.cloud_bytes < f32_bytes * 6 / 10, "{} vs {f32_bytes}", res.cloud_bytes);
        let d = DeviceBundle::load(&out.join("device"), &Device::Cpu).unwrap();
        let c = CloudBundle::load(&out.join("cloud"), &Device::Cpu).unwrap();
        assert_eq!(d.manifest.dtype, dtype.as_str());
        let got = LocalSplitDecoder::new(&d, &c).unwrap().feed_all(&ids).unwrap();
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let rel = max_abs_diff(&got, &want) / scale;
        assert!(rel > 0.0 && rel < tolerance, "{dtype:?}: {rel}");
    }
}

#[test]
fn out_must_be_empty_unless_forced_and_force_replaces() {
    let (dir, model) = tiny(TinySpec::default());
    let plan = SplitPlan::new(6, 2, 2).unwrap();
    let out = dir.path().join("split");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let err = write_split(&model, &plan, &out, DType::F32, false, &hidden_bar()).unwrap_err().to_string();
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    assert!(out.join("keep.txt").exists(), "a refused split leaves --out alone");

    write_split(&model, &plan, &out, DType::F32, true, &hidden_bar()).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("device/manifest.json").exists());
    // No staging folders are left beside --out.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hat-split"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn tampered_manifests_are_refused() {
    let (dir, model) = tiny(TinySpec::default());
    let out = dir.path().join("split");
    write_split(&model, &SplitPlan::new(6, 2, 2).unwrap(), &out, DType::F32, false, &hidden_bar()).unwrap();
    let path = out.join("cloud/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["plan"]["input_layers"] = 3.into();
    std::fs::write(&path, m.to_string()).unwrap();
    let err = CloudBundle::load(&out.join("cloud"), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("split id does not match"), "{err}");
    std::fs::write(&path, "{ not json").unwrap();
    assert!(CloudBundle::load(&out.join("cloud"), &Device::Cpu).unwrap_err().to_string().contains("invalid manifest"));
    let err = CloudBundle::load(dir.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("no manifest.json"), "{err}");
}

/// Several sessions' blocks in one packed pass compute bitwise what each computes alone
/// (sequences of 1 and 7 rows after different prefixes, a draft tree on an empty cache), and
/// leave every cache as alone; blocks that would not compute exactly packed are refused.
#[test]
fn a_packed_pass_computes_every_block_bitwise_as_alone() {
    use hat::model::tree::{TreeShape, ROOT};
    use hat::model::PackedBlock;
    let (_d, loaded) = tiny(TinySpec::default());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("split");
    write_split(&loaded, &SplitPlan::new(6, 1, 1).unwrap(), &out, DType::F32, false, &hidden_bar()).unwrap();
    let cloud = CloudBundle::load(&out.join("cloud"), &Device::Cpu).unwrap();
    let stack = &cloud.middle;
    let rand = |n: usize| Tensor::randn(0f32, 1f32, (1, n, 64), &Device::Cpu).unwrap();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mut caches = Vec::new();
    for prefix in [5, 9, 0] {
        let mut c = stack.new_cache();
        if prefix > 0 {
            stack.forward(&rand(prefix), 0, &mut c).unwrap();
        }
        caches.push(c);
    }
    let tree = TreeShape::new(vec![ROOT, 0, 0, 1, 2]).unwrap();
    let blocks = [rand(1), rand(7), rand(5)];
    let mut alone_caches = caches.clone();
    let alone = [
        stack.forward(&blocks[0], 5, &mut alone_caches[0]).unwrap(),
        stack.forward(&blocks[1], 9, &mut alone_caches[1]).unwrap(),
        stack.forward_tree(&blocks[2], &mut alone_caches[2], tree.mask(0, 0..5)).unwrap(),
    ];
    let mut packed_caches = caches.clone();
    let mut items: Vec<PackedBlock> = packed_caches.iter_mut().zip(&blocks).enumerate().map(|(i, (cache, x))| PackedBlock { x: x.clone(), cache, tree: (i == 2).then(|| tree.mask(0, 0..5)) }).collect();
    let packed = stack.forward_packed(&mut items).unwrap();
    for i in 0..3 {
        assert_eq!(bits(&alone[i]), bits(&packed[i]), "block {i}");
        assert_eq!(alone_caches[i].len(), packed_caches[i].len());
    }
    // The caches hold the same: the next position computes the same after either.
    for i in 0..2 {
        let next = rand(1);
        let a = stack.forward(&next, alone_caches[i].len(), &mut alone_caches[i]).unwrap();
        let b = stack.forward(&next, packed_caches[i].len(), &mut packed_caches[i]).unwrap();
        assert_eq!(bits(&a), bits(&b), "after block {i}");
    }
    // A sequence longer than the small-m kernel's (gemm computes it alone) cannot join, nor can
    // more rows than the exact kernels take; the caches stay as they were.
    let mut c = stack.new_cache();
    assert!(stack.forward_packed(&mut [PackedBlock { x: rand(13), cache: &mut c, tree: None }]).is_err());
    let mut cs: Vec<_> = (0..6).map(|_| stack.new_cache()).collect();
    let mut many: Vec<PackedBlock> = cs.iter_mut().map(|cache| PackedBlock { x: rand(12), cache, tree: None }).collect();
    assert!(stack.forward_packed(&mut many).is_err());
    assert!(cs.iter().all(|c| c.is_empty()) && c.is_empty());
}
