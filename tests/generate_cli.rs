//! `flotilla generate` as a process on the committed transformers checkpoint
//! (`model/tests/fixtures/hf_checkpoints/sharded_bf16`): greedy ids equal to
//! transformers' `generate` (`model/tests/fixtures/hf_generate/greedy.json`, see
//! `model/tests/hf_generate.rs` for how near ties are excluded), from `--tokens` and from a
//! `--prompts` file, and bad input refused naming the flag, field or `file:line`.

use std::path::{Path, PathBuf};

mod common;
use common::{failure, flotilla, ok, temp_dir};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures")
}

fn checkpoint() -> String {
    fixtures().join("hf_checkpoints/sharded_bf16").to_str().unwrap().to_owned()
}

/// A prompt and transformers' generated ids for it.
type Case = (Vec<u32>, Vec<u32>);

/// The fixture's prompts with transformers' generated ids, and its eos and length limit.
fn reference() -> (Vec<Case>, u32, usize) {
    let text = std::fs::read_to_string(fixtures().join("hf_generate/greedy.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let cases =
        json["prompts"].as_array().unwrap().iter().map(|p| (ids(&p["input_ids"]), ids(&p["generated"])));
    (
        cases.collect(),
        json["eos_token_id"].as_u64().unwrap() as u32,
        json["max_new_tokens"].as_u64().unwrap() as usize,
    )
}

fn list(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn tokens_of(line: &serde_json::Value) -> Vec<u32> {
    line["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn generate_prints_transformers_greedy_ids() {
    let (cases, eos, max_new) = reference();
    let (max_new, eos) = (max_new.to_string(), eos.to_string());
    let model = checkpoint();
    let common = ["generate", "--model", &model, "--max-new-tokens", &max_new, "--stop", &eos, "--json"];

    let (prompt, expected) = &cases[0];
    let tokens = list(prompt);
    let mut args = common.to_vec();
    args.extend(["--tokens", &tokens, "--threads", "1"]);
    let lines = json_lines(&ok(&flotilla(&args)));
    assert_eq!(lines.len(), 1);
    assert_eq!(tokens_of(&lines[0]), *expected);
    assert_eq!(lines[0]["finish"], "length");
    // A 64-token vocabulary is not bytes and there is no tokenizer.json: no text.
    assert!(lines[0]["text"].is_null());
    let stats = &lines[0]["stats"];
    assert_eq!(stats["prefill_tokens"].as_u64().unwrap() as usize, prompt.len());
    assert_eq!(stats["decode_tokens"].as_u64().unwrap() as usize, expected.len() - 1);
    assert!(stats["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // MLA's formula: 2 layers × (kv_lora_rank 16 + qk_rope_head_dim 8) × 4 bytes.
    assert_eq!(stats["kv_cache_bytes_per_token"], 2 * (16 + 8) * 4);
    assert!(stats["acceptance_rate"].is_null());

    // Every prompt from a file, one batch; the second stops at eos.
    let dir = temp_dir("generate-prompts");
    let file = dir.join("prompts.jsonl");
    let body: String = cases.iter().map(|(p, _)| format!("{{\"tokens\": [{}]}}\n\n", list(p))).collect();
    std::fs::write(&file, body).unwrap();
    let mut args = common.to_vec();
    args.extend(["--prompts", file.to_str().unwrap()]);
    let lines = json_lines(&ok(&flotilla(&args)));
    assert_eq!(lines.len(), cases.len());
    for (i, ((_, expected), line)) in cases.iter().zip(&lines).enumerate() {
        assert_eq!(tokens_of(line), *expected, "prompt {i}");
        let stopped = expected.last().map(u32::to_string) == Some(eos.clone());
        assert_eq!(line["finish"], if stopped { "stop" } else { "length" }, "prompt {i}");
    }
    assert!(lines.iter().any(|l| l["finish"] == "stop"));

    // The plain report names the speeds and the cache.
    let mut args = common[..common.len() - 1].to_vec();
    args.extend(["--tokens", &tokens]);
    let report = ok(&flotilla(&args));
    assert!(report.contains("prefill:") && report.contains("tokens/s"), "{report}");
    assert!(report.contains("KV cache: 192 B per token"), "{report}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_refuses_bad_input_naming_the_flag_or_line() {
    let model = checkpoint();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &model];
        args.extend_from_slice(extra);
        failure(&flotilla(&args))
    };
    let err = run(&["--tokens", "1,2,99"]);
    assert!(err.contains("--tokens") && err.contains("token 99 at position 2"), "{err}");
    let err = run(&["--tokens", "1,x"]);
    assert!(err.contains("--tokens"), "{err}");
    let err = run(&["--tokens", "1,2", "--temperature", "-1"]);
    assert!(err.contains("--temperature"), "{err}");
    let err = run(&["--tokens", "1,2", "--top-p", "0"]);
    assert!(err.contains("--top-p"), "{err}");
    let err = run(&["--tokens", "1,2", "--stop", "64"]);
    assert!(err.contains("--stop") && err.contains("64"), "{err}");
    let err = run(&["--tokens", "1,2", "--max-new-tokens", "0"]);
    assert!(err.contains("--max-new-tokens"), "{err}");
    let err = run(&["--tokens", "1,2", "--max-new-tokens", "63"]);
    assert!(err.contains("--tokens") && err.contains("max_position_embeddings = 64"), "{err}");
    // transformers saves no MTP module: nothing to draft with.
    let err = run(&["--tokens", "1,2", "--speculative", "mtp"]);
    assert!(err.contains("--speculative mtp") && err.contains("no MTP module"), "{err}");
    // Text needs a tokenizer covering the vocabulary: bytes do not fit 64 ids.
    let err = run(&["--prompt", "hello"]);
    assert!(err.contains("--prompt") && err.contains("vocabulary"), "{err}");
    let err = run(&[]);
    assert!(err.contains("--prompt") && err.contains("--tokens"), "{err}");

    let dir = temp_dir("generate-bad");
    let file = dir.join("prompts.jsonl");
    std::fs::write(&file, "{\"tokens\": [1, 2]}\n{\"tokens\": [1, \"a\"]}\n").unwrap();
    let err = run(&["--prompts", file.to_str().unwrap(), "--max-new-tokens", "4"]);
    assert!(err.contains(&format!("{}:2", file.display())) && err.contains("tokens[1]"), "{err}");
    std::fs::write(&file, "{\"tokens\": [1, 2]}\n\n{\"tokens\": []}\n").unwrap();
    let err = run(&["--prompts", file.to_str().unwrap(), "--max-new-tokens", "4"]);
    assert!(err.contains(&format!("{}:3", file.display())) && err.contains("empty"), "{err}");
    std::fs::write(&file, "\n").unwrap();
    let err = run(&["--prompts", file.to_str().unwrap(), "--max-new-tokens", "4"]);
    assert!(err.contains("no prompts"), "{err}");
    let err = run(&["--prompts", dir.join("missing.jsonl").to_str().unwrap()]);
    assert!(err.contains("missing.jsonl"), "{err}");
    let err = failure(&flotilla(&["generate", "--model", dir.to_str().unwrap(), "--tokens", "1"]));
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
