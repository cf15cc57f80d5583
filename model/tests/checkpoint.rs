//! HF-layout checkpoints: round trips in f32 and BF16, DeepSeek's FP8 weights with
//! `weight_scale_inv`, and errors naming the tensor.

use flotilla_kernels::quant::{Granularity, QuantConfig, quantize};
use flotilla_model::Preset;
use flotilla_model::checkpoint::{CheckpointError, NamedTensor, WeightDtype, fill_params, load_hf, save_hf};
use flotilla_model::param::{Init, Param};
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn params() -> Vec<Param<f32>> {
    vec![
        Param::new("model.embed_tokens.weight", &[7, 5], Init::Normal { std: 0.5 }, 1),
        Param::new("model.norm.weight", &[5], Init::Constant(1.0), 1),
        Param::new("model.layers.1.mlp.gate.e_score_correction_bias", &[4], Init::Normal { std: 0.1 }, 1),
    ]
}

fn named(params: &[Param<f32>]) -> Vec<NamedTensor<'_>> {
    params.iter().map(|p| NamedTensor { name: &p.name, shape: &p.shape, data: p.value.host() }).collect()
}

#[test]
fn f32_and_bf16_round_trip() {
    let config = Preset::Tiny.config();
    let original = params();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let dir = temp_dir(&format!("{dtype:?}"));
        save_hf(&dir, &config, &named(&original), dtype).unwrap();
        let ckpt = load_hf(&dir).unwrap();
        assert_eq!(ckpt.config, config);
        let mut loaded = params();
        for p in &mut loaded {
            p.value.host_mut().iter_mut().for_each(|v| *v = f32::NAN);
        }
        fill_params(&mut loaded.iter_mut().collect::<Vec<_>>(), &ckpt).unwrap();
        for (a, b) in original.iter().zip(&loaded) {
            let expected: Vec<f32> = match dtype {
                WeightDtype::F32 => a.value.to_host_vec(),
                WeightDtype::Bf16 => a.value.host().iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                WeightDtype::Fp8 => unreachable!("FP8 export is tested in tests/shard.rs"),
            };
            assert_eq!(b.value.host(), expected, "{}", a.name);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn fp8_weights_with_block_scales_dequantize_on_load() {
    let dir = temp_dir("fp8");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), Preset::Tiny.config().to_hf_json()).unwrap();
    let (rows, cols) = (200, 300);
    let w =
        Param::<f32>::new("model.layers.0.mlp.up_proj.weight", &[rows, cols], Init::Normal { std: 1.0 }, 3);
    let q = quantize(w.value.host(), rows, cols, Granularity::Block128x128, &QuantConfig::default()).unwrap();
    let scale_bytes: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let views = vec![
        (w.name.clone(), TensorView::new(Dtype::F8_E4M3, vec![rows, cols], &q.codes).unwrap()),
        (format!("{}_scale_inv", w.name), TensorView::new(Dtype::F32, vec![2, 3], &scale_bytes).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("model-00001-of-00001.safetensors")).unwrap();
    let ckpt = load_hf(&dir).unwrap();
    assert_eq!(ckpt.tensors.len(), 1, "the scale tensor is folded into its weight");
    assert_eq!(ckpt.tensors[&w.name].1, q.dequantize());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let config = Preset::Tiny.config();
    let original = params();
    let dir = temp_dir("bad");
    save_hf(&dir, &config, &named(&original[..2]), WeightDtype::F32).unwrap();
    let ckpt = load_hf(&dir).unwrap();
    let mut model = params();
    match fill_params(&mut model.iter_mut().collect::<Vec<_>>(), &ckpt) {
        Err(CheckpointError::Tensor { tensor, detail, .. }) => {
            assert_eq!(tensor, "model.layers.1.mlp.gate.e_score_correction_bias");
            assert!(detail.contains("missing"));
        }
        other => panic!("{other:?}"),
    }
    // Nothing was written when the fill failed.
    assert_eq!(model[0].value, params()[0].value);

    let mut wrong = [Param::<f32>::new("model.norm.weight", &[6], Init::Constant(1.0), 1)];
    match fill_params(&mut wrong.iter_mut().collect::<Vec<_>>(), &ckpt) {
        Err(CheckpointError::Tensor { tensor, detail, .. }) => {
            assert_eq!(tensor, "model.norm.weight");
            assert!(detail.contains("[5]") && detail.contains("[6]"), "{detail}");
        }
        other => panic!("{other:?}"),
    }

    let ints = [1u8; 16];
    safetensors::serialize_to_file(
        vec![("model.x.weight", TensorView::new(Dtype::I32, vec![4], &ints).unwrap())],
        None,
        &dir.join("zz-extra.safetensors"),
    )
    .unwrap();
    match load_hf(&dir) {
        Err(CheckpointError::Tensor { tensor, .. }) => assert_eq!(tensor, "model.x.weight"),
        other => panic!("{other:?}"),
    }
    std::fs::write(dir.join("zz-extra.safetensors"), b"not a safetensors file").unwrap();
    assert!(matches!(load_hf(&dir), Err(CheckpointError::Format { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(load_hf(&dir), Err(CheckpointError::Io { .. })));
}
