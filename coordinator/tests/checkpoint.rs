//! Checkpoint manifests: the commit protocol's checks, listing, retention and verification,
//! on real directories.

use flotilla_coordinator::checkpoint::{
    CheckpointError, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ShardEntry, commit, find_committed,
    list_committed, read_manifest, retain, run_root, verify,
};
use std::fs;
use std::path::{Path, PathBuf};

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Writes one shard per rank of `workers` into `root/step-N` (deterministic contents of
/// differing sizes) and returns the manifest describing them, not yet committed.
fn write_shards(
    root: &Path,
    run_id: &str,
    created_unix_ms: u64,
    step: u64,
    workers: u32,
) -> (PathBuf, Manifest) {
    let dir = step_dir(root, step);
    fs::create_dir_all(&dir).unwrap();
    let shards: Vec<ShardEntry> = (0..workers)
        .map(|rank| {
            let file = format!("shard-{rank:05}.safetensors");
            let data: Vec<u8> =
                (0..1000 + 37 * rank as usize).map(|i| (i as u64 * 31 + step + rank as u64) as u8).collect();
            fs::write(dir.join(&file), &data).unwrap();
            ShardEntry { rank, file, bytes: data.len() as u64, crc32: crc32fast::hash(&data) }
        })
        .collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        job_id: run_id.split('-').next().unwrap().into(),
        run_id: run_id.into(),
        step,
        created_unix_ms,
        workers,
        layout: format!("dp={workers}"),
        config_toml: "seed = 1\nsteps = 10\n".into(),
        bytes: shards.iter().map(|s| s.bytes).sum(),
        shards,
    };
    (dir, manifest)
}

fn committed(root: &Path, run_id: &str, created: u64, step: u64, workers: u32) -> Manifest {
    let (dir, manifest) = write_shards(root, run_id, created, step, workers);
    commit(&dir, &manifest).unwrap();
    manifest
}

fn steps(root: &Path) -> Vec<u64> {
    list_committed(root).unwrap().iter().map(|c| c.manifest.step).collect()
}

#[test]
fn commit_then_read_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let root = run_root(tmp.path(), "job7-1700000000000");
    assert_eq!(root, tmp.path().join("checkpoints").join("job7-1700000000000"));
    let (dir, manifest) = write_shards(&root, "job7-1700000000000", 1_700_000_000_000, 100, 3);
    commit(&dir, &manifest).unwrap();
    assert_eq!(read_manifest(&dir).unwrap(), manifest);
    assert!(dir.join(MANIFEST_FILE).is_file());
    assert!(!dir.join("manifest.json.tmp").exists(), "the temporary file was renamed");
    // Pretty JSON, readable by people and other tools.
    let text = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    assert!(text.contains("\n  \"format\": \"flotilla-checkpoint/1\""), "{text}");

    let listed = list_committed(&root).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].dir, dir);
    assert_eq!(listed[0].manifest, manifest);
    let found = find_committed(tmp.path()).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].manifest, manifest);

    // The same commit again (a coordinator restarting) is a no-op; another one is refused.
    commit(&dir, &manifest).unwrap();
    let mut other = manifest.clone();
    other.layout = "pp=3".into();
    let err = commit(&dir, &other).unwrap_err();
    assert!(matches!(err, CheckpointError::AlreadyCommitted { .. }), "{err}");
    assert_eq!(read_manifest(&dir).unwrap(), manifest);
}

#[test]
fn commit_refuses_a_missing_or_mis_sized_shard_naming_it_and_writes_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = run_root(tmp.path(), "j-1");
    let (dir, manifest) = write_shards(&root, "j-1", 1, 5, 2);

    fs::remove_file(dir.join("shard-00001.safetensors")).unwrap();
    let err = commit(&dir, &manifest).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingShard { rank: 1, .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("shard-00001.safetensors") && text.contains("missing"), "{text}");
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(!dir.join(MANIFEST_FILE).exists());

    fs::write(dir.join("shard-00001.safetensors"), b"short").unwrap();
    let err = commit(&dir, &manifest).unwrap_err();
    assert!(matches!(err, CheckpointError::ShardSize { rank: 1, actual: 5, .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("shard-00001.safetensors") && text.contains("5 bytes"), "{text}");
    assert!(!dir.join(MANIFEST_FILE).exists());
    assert!(!dir.join("manifest.json.tmp").exists());
    assert!(list_committed(&root).unwrap().is_empty());

    // Into a directory whose name is not the manifest's step: never listable, so refused.
    let (dir6, manifest6) = write_shards(&root, "j-1", 1, 6, 1);
    let renamed = root.join("step-00000007");
    fs::rename(&dir6, &renamed).unwrap();
    let err = commit(&renamed, &manifest6).unwrap_err();
    assert!(matches!(&err, CheckpointError::Invalid { field, .. } if field == "step"), "{err}");
    assert!(!renamed.join(MANIFEST_FILE).exists());
}

#[test]
fn list_skips_uncommitted_and_corrupt_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let root = run_root(tmp.path(), "j-1");
    assert!(list_committed(&root).unwrap().is_empty(), "a missing root has no checkpoints");
    assert!(find_committed(tmp.path()).unwrap().is_empty());

    committed(&root, "j-1", 1, 10, 2);
    committed(&root, "j-1", 1, 30, 2);
    write_shards(&root, "j-1", 1, 20, 2); // shards written, never committed
    write_shards(&root, "j-1", 1, 40, 2); // being written
    // A corrupt manifest, one whose step is not its directory's, names that are not steps.
    let (bad, _) = write_shards(&root, "j-1", 1, 50, 1);
    fs::write(bad.join(MANIFEST_FILE), b"{ not json").unwrap();
    let (moved, m) = write_shards(&root, "j-1", 1, 60, 1);
    commit(&moved, &m).unwrap();
    fs::rename(&moved, step_dir(&root, 61)).unwrap();
    fs::create_dir_all(root.join("step-12")).unwrap();
    fs::create_dir_all(root.join("notes")).unwrap();
    fs::write(root.join("step-00000070"), b"a file, not a directory").unwrap();

    assert_eq!(steps(&root), vec![10, 30]);
}

#[test]
fn find_committed_orders_every_run_by_creation_then_step() {
    let tmp = tempfile::tempdir().unwrap();
    let newer = run_root(tmp.path(), "b-2000");
    let older = run_root(tmp.path(), "a-1000");
    committed(&newer, "b-2000", 2000, 5, 1);
    committed(&older, "a-1000", 1000, 300, 2);
    committed(&older, "a-1000", 1000, 100, 2);
    committed(&newer, "b-2000", 2000, 10, 1);
    write_shards(&newer, "b-2000", 2000, 15, 1);
    let found: Vec<(String, u64)> = find_committed(tmp.path())
        .unwrap()
        .into_iter()
        .map(|c| (c.manifest.run_id, c.manifest.step))
        .collect();
    let expected: Vec<(String, u64)> = [("a-1000", 100), ("a-1000", 300), ("b-2000", 5), ("b-2000", 10)]
        .map(|(r, s)| (r.to_string(), s))
        .into();
    assert_eq!(found, expected);
}

#[test]
fn retain_keeps_k_and_removes_uncommitted_leftovers_below_the_newest_commit_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = run_root(tmp.path(), "j-1");
    for step in [100, 200, 300, 400] {
        committed(&root, "j-1", 1, step, 2);
    }
    write_shards(&root, "j-1", 1, 150, 2); // interrupted by a crash: below the newest
    write_shards(&root, "j-1", 1, 500, 2); // being written: above the newest
    fs::create_dir_all(root.join("unrelated")).unwrap();
    fs::write(root.join("README"), b"keep me").unwrap();

    assert!(matches!(retain(&root, 0), Err(CheckpointError::KeepZero { .. })));
    assert_eq!(retain(&root, 2).unwrap(), vec![100, 150, 200]);
    assert_eq!(steps(&root), vec![300, 400]);
    for gone in [100, 150, 200] {
        assert!(!step_dir(&root, gone).exists(), "step {gone} left behind");
    }
    assert!(step_dir(&root, 500).join("shard-00000.safetensors").exists(), "a write in progress was touched");
    assert!(root.join("unrelated").is_dir() && root.join("README").is_file());

    // Nothing more to do; keeping more than there are deletes nothing.
    assert_eq!(retain(&root, 2).unwrap(), Vec::<u64>::new());
    assert_eq!(retain(&root, 10).unwrap(), Vec::<u64>::new());
    assert_eq!(retain(&root, 1).unwrap(), vec![300]);
    assert_eq!(steps(&root), vec![400]);
    assert!(step_dir(&root, 500).exists());
    // An empty or missing root: nothing to do.
    assert_eq!(retain(&tmp.path().join("nowhere"), 1).unwrap(), Vec::<u64>::new());
}

#[test]
fn verify_detects_a_flipped_byte_a_truncated_file_and_a_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let root = run_root(tmp.path(), "j-1");
    let m = committed(&root, "j-1", 1, 8, 3);
    let dir = step_dir(&root, 8);
    let checks = verify(&dir).unwrap();
    assert_eq!(checks.len(), 3);
    assert!(checks.iter().all(|c| c.ok), "{checks:?}");
    assert_eq!(
        checks.iter().map(|c| c.file.as_str()).collect::<Vec<_>>(),
        m.shards.iter().map(|s| s.file.as_str()).collect::<Vec<_>>()
    );

    let flipped = dir.join("shard-00001.safetensors");
    let mut data = fs::read(&flipped).unwrap();
    data[500] ^= 0x10;
    fs::write(&flipped, &data).unwrap();
    let truncated = dir.join("shard-00002.safetensors");
    let data = fs::read(&truncated).unwrap();
    fs::write(&truncated, &data[..data.len() - 1]).unwrap();

    let checks = verify(&dir).unwrap();
    assert!(checks[0].ok, "{checks:?}");
    assert!(!checks[1].ok && checks[1].file == "shard-00001.safetensors");
    let want = format!("{:#010x}", m.shards[1].crc32);
    assert!(
        checks[1].detail.contains("checksum mismatch") && checks[1].detail.contains(&want),
        "{}",
        checks[1].detail
    );
    assert!(!checks[2].ok && checks[2].detail.contains("size mismatch"), "{}", checks[2].detail);

    fs::remove_file(dir.join("shard-00000.safetensors")).unwrap();
    let checks = verify(&dir).unwrap();
    assert!(!checks[0].ok && checks[0].detail.contains("missing"), "{:?}", checks[0]);

    // No manifest: nothing to verify against.
    let (uncommitted, _) = write_shards(&root, "j-1", 1, 9, 1);
    assert!(matches!(verify(&uncommitted), Err(CheckpointError::Io { .. })));
}

#[test]
fn bad_manifests_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let root = run_root(tmp.path(), "j-1");
    let (dir, good) = write_shards(&root, "j-1", 1, 3, 2);
    type Edit = fn(&mut Manifest);
    let cases: Vec<(&str, Edit)> = vec![
        ("format", |m| m.format = "flotilla-checkpoint/0".into()),
        ("shards[1].file", |m| m.shards[1].file = "../x".into()),
        ("shards[0].file", |m| m.shards[0].file = "a/b".into()),
        ("shards[1].file", |m| m.shards[1].file = m.shards[0].file.clone()),
        ("shards[1].file", |m| m.shards[1].file = MANIFEST_FILE.into()),
        ("shards[0].file", |m| m.shards[0].file = String::new()),
        ("shards[1].rank", |m| m.shards[1].rank = 0),
        ("shards[1].rank", |m| m.shards[1].rank = 2),
        ("shards", |m| m.shards.clear()),
        ("shards", |m| m.workers = 3),
        ("workers", |m| m.workers = 0),
        ("bytes", |m| m.bytes += 1),
        ("run_id", |m| m.run_id.clear()),
    ];
    for (field, edit) in cases {
        let mut bad = good.clone();
        edit(&mut bad);
        let err = commit(&dir, &bad).unwrap_err();
        match &err {
            CheckpointError::Invalid { field: f, path, .. } => {
                assert_eq!(f, field, "{err}");
                assert_eq!(path, &dir.join(MANIFEST_FILE));
            }
            other => panic!("{field}: expected Invalid, got {other}"),
        }
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
        assert!(!dir.join(MANIFEST_FILE).exists(), "{field}: a manifest was written");

        // The same manifest written by something else is refused on reading, and listing
        // skips it.
        fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&bad).unwrap()).unwrap();
        let err = read_manifest(&dir).unwrap_err();
        assert!(matches!(&err, CheckpointError::Invalid { field: f, .. } if f == field), "{err}");
        assert!(list_committed(&root).unwrap().is_empty());
        fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    }

    // Missing fields and non-JSON name the path (and serde names the field).
    let mut value = serde_json::to_value(&good).unwrap();
    value.as_object_mut().unwrap().remove("step");
    fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&value).unwrap()).unwrap();
    let err = read_manifest(&dir).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CheckpointError::Parse { .. }) && text.contains("`step`"), "{text}");
    assert!(text.contains(&dir.join(MANIFEST_FILE).display().to_string()), "{text}");
    fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();

    commit(&dir, &good).unwrap();
    assert_eq!(read_manifest(&dir).unwrap(), good);
}
