//! `flotilla data prepare|inspect`, `train` on `kind = "indexed"` with a tokenizer, and
//! `score --tokenizer`, end to end on the fixtures `tools/data_fixtures.py` made with the
//! Python `tokenizers` library and a writer of Megatron-LM's layout.

use std::path::{Path, PathBuf};

mod common;
use common::{failure, flotilla, ok, temp_dir};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/data")
}

fn fixture(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

#[test]
fn prepare_inspect_train_and_score_with_a_tokenizer() {
    let dir = temp_dir("flow");
    let prefix = dir.join("data/prepared");
    let p = prefix.to_str().unwrap();
    let tokenizer = fixture("tokenizer.json");
    ok(&flotilla(&[
        "data",
        "prepare",
        "--tokenizer",
        &tokenizer,
        "--input",
        &fixture("docs.jsonl"),
        "--out",
        p,
        "--workers",
        "2",
    ]));
    for ext in ["idx", "bin"] {
        assert_eq!(
            std::fs::read(format!("{p}.{ext}")).unwrap(),
            std::fs::read(fixtures().join(format!("python_u16.{ext}"))).unwrap(),
            "the .{ext} is the one Megatron's layout in NumPy wrote"
        );
    }

    let report: serde_json::Value =
        serde_json::from_str(&ok(&flotilla(&["data", "inspect", p, "--json"]))).unwrap();
    assert_eq!(report["dtype"], "uint16");
    assert_eq!(report["dtype_code"], 8);
    // 14 documents, one of them empty: a document without a sequence, as Megatron's.
    assert_eq!(report["sequences"], 13);
    assert_eq!(report["documents"], 14);
    let tokens = std::fs::metadata(format!("{p}.bin")).unwrap().len() / 2;
    assert_eq!(report["tokens"], tokens);
    let doc: serde_json::Value = serde_json::from_str(&ok(&flotilla(&[
        "data",
        "inspect",
        p,
        "--doc",
        "13",
        "--tokenizer",
        &tokenizer,
        "--json",
    ])))
    .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    assert_eq!(doc["document"]["tokens"], expected["python_u16"]["documents"][13]);
    assert_eq!(doc["document"]["text"], "ünïcode — 专家<|endoftext|>");
    let plain = ok(&flotilla(&["data", "inspect", p, "--doc", "0"]));
    assert!(
        plain.contains("dtype uint16") && plain.contains("14 documents") && plain.contains("document 0:"),
        "{plain}"
    );

    // A short single-process run on the prepared data.
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
seed = 1
steps = 3
batch_size = 2
seq_len = 16
threads = 1

[model]
preset = "tiny"
num_hidden_layers = 2
vocab_size = 368

[data]
kind = "indexed"
path = "data/prepared"
tokenizer = "{tokenizer}"

[optimizer]
peak_lr = 3e-3
warmup_steps = 1
constant_steps = 10
decay_steps = 0
final_lr = 3e-3
"#
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let printed = ok(&flotilla(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    assert!(printed.contains("trained 3 steps") && !printed.contains("unigram"), "{printed}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);

    // score --tokenizer encodes the text with it.
    let text = dir.join("text.txt");
    std::fs::write(&text, "the expert router").unwrap();
    let scored: serde_json::Value = serde_json::from_str(&ok(&flotilla(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--tokenizer",
        &tokenizer,
        "--json",
    ])))
    .unwrap();
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap()).unwrap();
    assert_eq!(scored["tokens"], tokens["cases"][0]["ids"]);

    // Errors name what is wrong.
    let err = failure(&flotilla(&["data", "prepare", "--input", "/nonexistent/a.jsonl", "--out", p]));
    assert!(err.contains("/nonexistent/a.jsonl"), "{err}");
    std::fs::write(dir.join("bad.jsonl"), "{\"text\": \"a\"}\n{\"content\": \"b\"}\n").unwrap();
    let bad = dir.join("bad.jsonl");
    let err = failure(&flotilla(&["data", "prepare", "--input", bad.to_str().unwrap(), "--out", p]));
    assert!(err.contains("bad.jsonl:2") && err.contains("no field `text`"), "{err}");
    let idx = std::fs::read(format!("{p}.idx")).unwrap();
    std::fs::write(format!("{p}.idx"), &idx[..idx.len() - 8]).unwrap();
    let err = failure(&flotilla(&["data", "inspect", p]));
    assert!(err.contains("prepared.idx") && err.contains("truncated"), "{err}");
    std::fs::write(
        config.with_file_name("small.toml"),
        std::fs::read_to_string(&config).unwrap().replace("368", "256"),
    )
    .unwrap();
    std::fs::write(format!("{p}.idx"), &idx).unwrap();
    let err = failure(&flotilla(&[
        "train",
        dir.join("small.toml").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("256") && err.contains("368") && err.contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
