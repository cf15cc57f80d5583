//! Tokenizers and Megatron-LM indexed datasets against fixtures the real tools made
//! (`tools/data_fixtures.py`: the Python `tokenizers` library, a NumPy writer of Megatron's
//! layout): the tokenizer's ids are Python's, the Python-written datasets read exactly,
//! flotilla's writer and `prepare` write the same bytes, corrupt files are named errors,
//! the sample order is a function of `(seed, step, index)` that visits every window once
//! per epoch, a blend keeps its proportions, and a run on indexed data resumed from a
//! checkpoint takes the uninterrupted run's steps.

use flotilla_model::data::indexed::{bin_path, idx_path};
use flotilla_model::data::prepare::prepare;
use flotilla_model::data::sample::BLEND_PERIOD;
use flotilla_model::data::{IndexedDataset, IndexedSampler, IndexedWriter, TokenDtype, Tokenizer};
use flotilla_model::shard::{CheckpointReader, write_shard};
use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tokenizer.json"), None).unwrap()
}

#[test]
fn tokenizer_ids_are_pythons() {
    let expected = json("tokens.json");
    let t = tokenizer();
    assert_eq!(t.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap());
    assert_eq!(t.eod().unwrap() as u64, expected["eod"].as_u64().unwrap(), "<|endoftext|> found as eod");
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = t.encode(text).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        assert_eq!(t.decode(&got).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
    // An explicit eod, as an id or a token; bad ones are named.
    let path = fixtures().join("tokenizer.json");
    assert!(matches!(Tokenizer::from_file(&path, Some("7")).unwrap().eod(), Ok(7)));
    assert!(matches!(Tokenizer::from_file(&path, Some("<|endoftext|>")).unwrap().eod(), Ok(0)));
    let err = Tokenizer::from_file(&path, Some("<nope>")).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("<nope>"), "{err}");
    let err = Tokenizer::from_file(&path, Some("100000")).unwrap_err().to_string();
    assert!(err.contains("100000") && err.contains("368"), "{err}");
    let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"), None).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    // The model's vocabulary must cover the tokenizer's.
    let err = t.check_vocab(256).unwrap_err().to_string();
    assert!(err.contains("256") && err.contains("368") && err.contains("tokenizer.json"), "{err}");
    t.check_vocab(368).unwrap();
    assert_eq!(Tokenizer::Bytes.eod().unwrap(), 0);
}

#[test]
fn python_written_datasets_read_exactly() {
    let expected = json("expected.json");
    for (name, dtype) in [("python_u16", TokenDtype::U16), ("python_sentences", TokenDtype::I32)] {
        let e = &expected[name];
        let data = IndexedDataset::open(&fixtures().join(name)).unwrap();
        assert_eq!(data.dtype(), dtype);
        assert_eq!(data.dtype().code() as u64, e["dtype_code"].as_u64().unwrap());
        let lengths = ids(&e["sequence_lengths"]);
        assert_eq!(data.sequences(), lengths.len(), "{name}");
        assert_eq!((0..data.sequences()).map(|i| data.sequence_len(i) as u32).collect::<Vec<_>>(), lengths);
        let index: Vec<u64> = ids(&e["document_index"]).into_iter().map(u64::from).collect();
        assert_eq!(data.document_index(), index, "{name}");
        let docs = e["documents"].as_array().unwrap();
        assert_eq!(data.documents(), docs.len(), "{name}");
        let mut stream = Vec::new();
        for (d, doc) in docs.iter().enumerate() {
            assert_eq!(data.document(d).unwrap(), ids(doc), "{name} document {d}");
            stream.extend(ids(doc));
        }
        assert_eq!(data.tokens(), stream.len() as u64);
        assert_eq!(data.read(3, 20).unwrap(), stream[3..23]);
        assert!(data.document(docs.len()).is_err());
    }
}

#[test]
fn the_writer_and_prepare_write_pythons_bytes() {
    let expected = json("expected.json");
    let dir = temp_dir("writer");
    let out = dir.join("rust_u16");
    let mut writer = IndexedWriter::create(&out, TokenDtype::U16).unwrap();
    for doc in expected["python_u16"]["documents"].as_array().unwrap() {
        writer.add_document(&ids(doc)).unwrap();
    }
    writer.finish().unwrap();
    let python = fixtures().join("python_u16");
    assert_eq!(std::fs::read(idx_path(&out)).unwrap(), std::fs::read(idx_path(&python)).unwrap());
    assert_eq!(std::fs::read(bin_path(&out)).unwrap(), std::fs::read(bin_path(&python)).unwrap());

    // `prepare` on the JSONL the Python documents came from writes the same bytes, with
    // any number of workers; every input byte is reported.
    let t = tokenizer();
    let input = vec![fixtures().join("docs.jsonl")];
    let size = std::fs::metadata(&input[0]).unwrap().len();
    for workers in [1, 3] {
        let out = dir.join(format!("prepared_{workers}"));
        let done = std::sync::atomic::AtomicU64::new(0);
        let summary = prepare(&t, &input, &out, "text", workers, &|n| {
            done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(done.into_inner(), size);
        assert_eq!(summary.dtype, TokenDtype::U16);
        assert_eq!(summary.documents, 14);
        assert_eq!(std::fs::read(idx_path(&out)).unwrap(), std::fs::read(idx_path(&python)).unwrap());
        assert_eq!(std::fs::read(bin_path(&out)).unwrap(), std::fs::read(bin_path(&python)).unwrap());
    }

    // Plain text is one document per file; bad inputs name the file and line.
    std::fs::write(dir.join("a.txt"), "the expert").unwrap();
    std::fs::write(dir.join("b.jsonl"), "{\"text\": \"gate\"}\n\n{\"body\": \"x\"}\n").unwrap();
    std::fs::write(dir.join("c.txt"), b"ok\nbad \xff byte").unwrap();
    std::fs::write(dir.join("d.jsonl"), "{\"text\": 3}\n").unwrap();
    std::fs::write(dir.join("e.jsonl"), "not json\n").unwrap();
    let run = |files: &[&str], field: &str| {
        let inputs: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        prepare(&t, &inputs, &dir.join("bad"), field, 1, &|_| {}).map_err(|e| e.to_string())
    };
    let summary = run(&["a.txt", "b.jsonl"], "body").unwrap_err();
    assert!(summary.contains("b.jsonl:1") && summary.contains("no field `body`"), "{summary}");
    let err = run(&["a.txt", "b.jsonl"], "text").unwrap_err();
    assert!(err.contains("b.jsonl:3") && err.contains("no field `text`"), "{err}");
    let err = run(&["c.txt"], "text").unwrap_err();
    assert!(err.contains("c.txt:2") && err.contains("UTF-8"), "{err}");
    let err = run(&["d.jsonl"], "text").unwrap_err();
    assert!(err.contains("d.jsonl:1") && err.contains("not a string"), "{err}");
    let err = run(&["e.jsonl"], "text").unwrap_err();
    assert!(err.contains("e.jsonl:1") && err.contains("not JSON"), "{err}");
    let err = run(&["missing.txt"], "text").unwrap_err();
    assert!(err.contains("missing.txt") && err.contains("no such file"), "{err}");
    std::fs::write(dir.join("b.jsonl"), "{\"text\": \"gate\"}\n\n").unwrap();
    run(&["a.txt", "b.jsonl"], "text").unwrap();
    let data = IndexedDataset::open(&dir.join("bad")).unwrap();
    assert_eq!(data.documents(), 2, "a blank JSONL line is no document");
    let eod = t.eod().unwrap();
    assert_eq!(data.document(0).unwrap(), [t.encode("the expert").unwrap(), vec![eod]].concat());
    assert_eq!(data.document(1).unwrap(), [t.encode("gate").unwrap(), vec![eod]].concat());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copies `python_sentences` to `dir/name`, applies `edit` to its (.idx, .bin) bytes and
/// returns the error of opening it.
fn corrupted(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> String {
    let source = fixtures().join("python_sentences");
    let mut idx = std::fs::read(idx_path(&source)).unwrap();
    let mut bin = std::fs::read(bin_path(&source)).unwrap();
    edit(&mut idx, &mut bin);
    let prefix = dir.join(name);
    std::fs::write(idx_path(&prefix), idx).unwrap();
    std::fs::write(bin_path(&prefix), bin).unwrap();
    IndexedDataset::open(&prefix).unwrap_err().to_string()
}

#[test]
fn corrupt_and_truncated_files_are_named() {
    let dir = temp_dir("corrupt");
    let data = IndexedDataset::open(&fixtures().join("python_sentences")).unwrap();
    let s = data.sequences();
    let put = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let cases: Vec<(&str, String, &str)> = vec![
        ("magic", corrupted(&dir, "magic", |i, _| i[0] = b'X'), "bad magic"),
        ("version", corrupted(&dir, "version", |i, _| put(i, 9, 2)), "version 2"),
        ("dtype", corrupted(&dir, "dtype", |i, _| i[17] = 9), "unknown dtype code 9"),
        ("float", corrupted(&dir, "float", |i, _| i[17] = 7), "float32"),
        ("header", corrupted(&dir, "header", |i, _| i.truncate(20)), "header alone needs 34"),
        ("truncated", corrupted(&dir, "truncated", |i, _| i.truncate(i.len() - 3)), "truncated or corrupt"),
        ("count", corrupted(&dir, "count", |i, _| put(i, 18, 1 << 40)), "need"),
        ("multimodal", corrupted(&dir, "multimodal", |i, _| i.extend(vec![0u8; s])), "multimodal"),
        ("trailing", corrupted(&dir, "trailing", |i, _| i.push(0)), "1 bytes after the document index"),
        (
            "length",
            corrupted(&dir, "length", |i, _| i[34..38].copy_from_slice(&(-1i32).to_le_bytes())),
            "length -1",
        ),
        (
            "pointer",
            corrupted(&dir, "pointer", |i, _| put(i, 34 + 4 * s + 8, 1 << 30)),
            "pointer of sequence 1 (1073741824) is past the end",
        ),
        ("gap", corrupted(&dir, "gap", |i, _| put(i, 34 + 4 * s + 8, 4)), "not stored back to back"),
        ("bin", corrupted(&dir, "bin", |_, b| b.truncate(b.len() - 4)), "truncated"),
        ("longbin", corrupted(&dir, "longbin", |_, b| b.extend([0; 4])), "does not belong"),
        (
            "monotonic",
            corrupted(&dir, "monotonic", |i, _| put(i, 34 + 12 * s + 16, 0)),
            "not monotonic: entry 2 is 0",
        ),
        ("first", corrupted(&dir, "first", |i, _| put(i, 34 + 12 * s, 1)), "starts at 1"),
        (
            "last",
            corrupted(&dir, "last", |i, _| {
                let n = i.len();
                i[n - 8..].copy_from_slice(&1u64.to_le_bytes())
            }),
            "not monotonic",
        ),
    ];
    for (name, err, needle) in cases {
        assert!(err.contains(needle), "{name}: {err}");
        let file = if name.contains("bin") { format!("{name}.bin") } else { format!("{name}.idx") };
        assert!(err.contains(&file), "{name} names {file}: {err}");
    }
    let err = IndexedDataset::open(&dir.join("absent")).unwrap_err().to_string();
    assert!(err.contains("absent.idx"), "{err}");
    // A negative token is refused when read, naming its position.
    let source = fixtures().join("python_sentences");
    let prefix = dir.join("negative");
    std::fs::copy(idx_path(&source), idx_path(&prefix)).unwrap();
    let mut bin = std::fs::read(bin_path(&source)).unwrap();
    bin[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    std::fs::write(bin_path(&prefix), bin).unwrap();
    let err = IndexedDataset::open(&prefix).unwrap().read(0, 4).unwrap_err().to_string();
    assert!(err.contains("negative.bin") && err.contains("token 2 is -5"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sampler(datasets: &[(f64, &str)], seed: u64, seq_len: usize) -> IndexedSampler {
    let opened =
        datasets.iter().map(|(w, n)| (*w, IndexedDataset::open(&fixtures().join(n)).unwrap())).collect();
    IndexedSampler::new(opened, seed, seq_len, 1, 4).unwrap()
}

#[test]
fn the_sample_order_is_a_function_of_seed_step_and_index() {
    let a = sampler(&[(1.0, "python_u16")], 3, 16);
    let b = sampler(&[(1.0, "python_u16")], 3, 16);
    let data = IndexedDataset::open(&fixtures().join("python_u16")).unwrap();
    let windows = (data.tokens() - 18) / 16 + 1;
    // Each epoch visits every window once, in an order that changes with the epoch.
    let epoch = |e: u64| -> Vec<u64> { (e * windows..(e + 1) * windows).map(|g| a.locate(g).1).collect() };
    for e in 0..3 {
        let mut starts = epoch(e);
        starts.sort_unstable();
        assert_eq!(starts, (0..windows).map(|w| w * 16).collect::<Vec<_>>(), "epoch {e}");
    }
    assert_ne!(epoch(0), epoch(1));
    for step in [1u64, 2, 7, 40] {
        for index in 0..4 {
            let w = a.window(step, index).unwrap();
            assert_eq!(w, b.window(step, index).unwrap(), "a new sampler draws the same");
            let (_, start) = a.locate((step - 1) * 4 + index);
            assert_eq!(w.tokens, data.read(start, 18).unwrap());
        }
    }
    assert_ne!(a.window(1, 0).unwrap(), sampler(&[(1.0, "python_u16")], 4, 16).window(1, 0).unwrap());
    // Too short a dataset is named.
    let short = IndexedSampler::new(
        vec![(1.0, IndexedDataset::open(&fixtures().join("python_u16")).unwrap())],
        0,
        1000,
        1,
        4,
    )
    .unwrap_err()
    .to_string();
    assert!(short.contains("python_u16.bin") && short.contains("seq_len 1000"), "{short}");
}

#[test]
fn a_blend_keeps_its_proportions() {
    let blend = sampler(&[(0.3, "python_u16"), (0.7, "python_sentences")], 1, 8);
    let n = 3 * BLEND_PERIOD as u64 + 1000;
    let first = (0..n).filter(|&g| blend.locate(g).0 == 0).count() as f64;
    assert!((first - 0.3 * n as f64).abs() <= 4.0, "{first} of {n}");
    // Within a period the two interleave: no run of the smaller longer than 1.
    let order: Vec<usize> = (0..20).map(|g| blend.locate(g).0).collect();
    assert!(order.windows(2).all(|w| !(w[0] == 0 && w[1] == 0)), "{order:?}");
    let err = IndexedSampler::new(
        vec![
            (1e-9, IndexedDataset::open(&fixtures().join("python_u16")).unwrap()),
            (1.0, IndexedDataset::open(&fixtures().join("python_sentences")).unwrap()),
        ],
        0,
        8,
        1,
        4,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("python_u16") && err.contains("below one sample"), "{err}");
}

fn run_config(data: &str, vocab: usize) -> String {
    format!(
        r#"
seed = 2
steps = 4
batch_size = 2
seq_len = 16
threads = 2

[model]
preset = "tiny"
num_hidden_layers = 2
vocab_size = {vocab}

[data]
{data}

[optimizer]
peak_lr = 3e-3
warmup_steps = 1
constant_steps = 10
decay_steps = 0
final_lr = 3e-3
"#
    )
}

fn steps(trainer: &mut Trainer, n: usize) -> Vec<StepRecord> {
    (0..n).map(|_| trainer.train_step().unwrap()).collect()
}

fn loss_bits(records: &[StepRecord]) -> Vec<(u64, u64)> {
    records.iter().map(|r| (r.step, r.loss.to_bits())).collect()
}

#[test]
fn indexed_training_resumes_at_the_same_sample() {
    let data = r#"kind = "indexed"
path = [1, "python_u16", 1, "python_sentences"]
tokenizer = "tokenizer.json""#;
    let text = run_config(data, 368);
    let build = || {
        let (config, model) = TrainConfig::from_toml(&text, &fixtures()).unwrap();
        Trainer::new(config, &model).unwrap()
    };
    let mut whole = build();
    let uninterrupted = steps(&mut whole, 4);
    assert!(uninterrupted.iter().all(|r| r.loss.is_finite()));
    let mut first = build();
    assert_eq!(loss_bits(&steps(&mut first, 2)), loss_bits(&uninterrupted[..2]));
    let dir = temp_dir("resume");
    let files = vec![write_shard(&dir, &first.snapshot(0, 1)).unwrap()];
    let mut resumed = build();
    resumed.restore(&CheckpointReader::open(&dir, &files).unwrap()).unwrap();
    assert_eq!(loss_bits(&steps(&mut resumed, 2)), loss_bits(&uninterrupted[2..]));
    std::fs::remove_dir_all(&dir).unwrap();

    // The model's vocabulary must cover the tokenizer's, named with both numbers.
    let (config, model) = TrainConfig::from_toml(&run_config(data, 300), &fixtures()).unwrap();
    let err = Trainer::new(config, &model).err().unwrap().to_string();
    assert!(err.contains("300") && err.contains("368") && err.contains("tokenizer.json"), "{err}");
    // A blend list that is not weight, prefix pairs is named.
    let bad = run_config("kind = \"indexed\"\npath = [1, \"a\", \"b\"]", 368);
    let err = TrainConfig::from_toml(&bad, &fixtures()).unwrap_err().to_string();
    assert!(err.contains("data.path") && err.contains("3 elements"), "{err}");
    // Text data with the tokenizer is the tokenizer's ids.
    let (config, _) = TrainConfig::from_toml(
        &run_config("kind = \"text\"\npath = \"docs.jsonl\"\ntokenizer = \"tokenizer.json\"", 368),
        &fixtures(),
    )
    .unwrap();
    let raw = std::fs::read_to_string(fixtures().join("docs.jsonl")).unwrap();
    assert_eq!(config.load_tokens().unwrap(), tokenizer().encode(&raw).unwrap());
}
