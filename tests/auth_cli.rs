//! The binary's security flags end to end: `flotilla run` over TLS with a token file (the
//! launcher an admin, its workers with the file's worker token in their environment), the
//! coordinator refusing to listen beyond loopback unprotected, and files that do not load
//! named in the error.

mod common;
use common::{failure, flotilla, losses, ok, temp_dir};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::Path;

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`server.pem`,
/// `server.key`), in `dir`.
fn make_pki(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "flotilla test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

#[test]
fn run_trains_over_tls_with_tokens_and_the_same_losses_as_plaintext() {
    let dir = temp_dir("auth-run");
    make_pki(&dir);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "admin admin-0123456789abcdef\nworker worker-0123456789abcdef\n").unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    let secured = dir.join("secured");
    let plain = dir.join("plain");
    let run = |out: &Path, extra: &[String]| {
        let mut args: Vec<String> = ["run", "examples/tiny.toml", "--workers", "2", "--steps", "3", "--out"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(out.display().to_string());
        args.extend(extra.iter().cloned());
        flotilla(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let tls =
        ["--tls-cert", &path("server.pem"), "--tls-key", &path("server.key"), "--tls-ca", &path("ca.pem")]
            .map(String::from);
    let mut extra = tls.to_vec();
    extra.extend(["--token-file".to_string(), tokens.display().to_string()]);
    ok(&run(&secured, &extra));
    ok(&run(&plain, &[]));
    let (a, b) = (losses(&secured.join("metrics.jsonl")), losses(&plain.join("metrics.jsonl")));
    assert_eq!(a.len(), 3);
    assert_eq!(
        a.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );

    // A token file without a worker token: refused before anything starts.
    std::fs::write(&tokens, "admin admin-0123456789abcdef\n").unwrap();
    let mut extra = tls.to_vec();
    extra.extend(["--token-file".to_string(), tokens.display().to_string()]);
    let stderr = failure(&run(&dir.join("none"), &extra));
    assert!(stderr.contains("worker token") && stderr.contains("tokens"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_coordinator_refuses_to_listen_beyond_loopback_unprotected_and_names_bad_files() {
    let dir = temp_dir("auth-coordinator");
    let state = dir.join("state").display().to_string();
    let stderr = failure(&flotilla(&["coordinator", "--listen", "0.0.0.0:0", "--state-dir", &state]));
    assert!(stderr.contains("0.0.0.0:0") && stderr.contains("--insecure"), "{stderr}");

    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# tokens\nviewer short\n").unwrap();
    let file = tokens.display().to_string();
    let stderr = failure(&flotilla(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--token-file",
        &file,
    ]));
    assert!(stderr.contains(&format!("{file}:2:")) && stderr.contains("at least 16"), "{stderr}");

    let absent = dir.join("absent.pem").display().to_string();
    let stderr = failure(&flotilla(&["jobs", "--coordinator", "127.0.0.1:1", "--tls-ca", &absent]));
    assert!(stderr.contains("absent.pem"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_refuses_a_data_plane_beyond_loopback_over_a_plaintext_coordinator() {
    // Refused before it dials anything (nothing listens on port 1), naming the flag.
    let out =
        flotilla(&["worker", "--coordinator", "http://127.0.0.1:1", "--data-plane-listen", "0.0.0.0:0"]);
    let stderr = failure(&out);
    assert!(stderr.contains("--data-plane-listen") && stderr.contains("0.0.0.0:"), "{stderr}");
    assert!(stderr.contains("plaintext") && stderr.contains("--insecure"), "{stderr}");
}
