//! The `hat` binary as a user meets it: help, errors, JSON output, the hub cache.

use std::path::Path;
use std::process::{Command, Output};

use hat::testing::{tiny_model, TinySpec};

fn hat(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hat"));
    c.args(args).env("HAT_NO_PROGRESS", "1").env_remove("HAT_MODEL");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run hat")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_subcommand() {
    let o = hat(&["--help"], &[]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    // The entries of the "Commands:" section, not words anywhere in the text (the about line
    // mentions some of them).
    let commands: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for cmd in ["generate", "split", "train-adapter", "profile", "serve-cloud", "run-edge", "serve-edge", "loadgen", "audit", "download"] {
        assert!(commands.contains(&cmd), "{cmd} is not a command entry of --help: {commands:?}");
        let o = hat(&[cmd, "--help"], &[]);
        let usage = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && usage.contains(&format!("Usage: hat {cmd}")), "{cmd} --help: {usage}");
    }
}

/// A tiny model in `dir/m`, split by `hat split` into `dir/split` with `layers` on each side of
/// the device; returns the model's and the split's folders.
fn tiny_split(dir: &Path, layers: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = tiny_model(&dir.join("m"), TinySpec::default()).unwrap();
    let split = dir.join("split");
    let o = hat(&["split", "--model", model.to_str().unwrap(), "--input-layers", layers, "--output-layers", layers, "--out", split.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    (model, split)
}

#[test]
fn profile_measures_a_tiny_split_and_run_edge_checks_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (_, split) = tiny_split(dir.path(), "1");
    let out = dir.path().join("p.json");
    let plots = dir.path().join("plots");
    let (cloud, device) = (split.join("cloud"), split.join("device"));
    let o = hat(&["--threads", "1", "profile", "--bundle", cloud.to_str().unwrap(), "--quick", "--out", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("middle"), "the table names the stage");
    // The device part is added to the same file; charts drawn.
    let o = hat(&["--threads", "1", "profile", "--bundle", device.to_str().unwrap(), "--quick", "--out", out.to_str().unwrap(), "--plot", plots.to_str().unwrap(), "--adapter", "none"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["version"], hat::profile::PROFILE_VERSION);
    for part in ["device", "cloud"] {
        assert!(v[part].is_object(), "{part} missing: {v}");
    }
    assert!(v["device"]["input"]["residuals"]["points"].as_u64().unwrap() >= 6, "{v}");
    assert!(plots.join("device-stages.svg").exists());

    // run-edge refuses a profile of another split, and a bad --chunk-size, before connecting.
    let mut other = v.clone();
    other["split_id"] = "0123456789abcdef0123456789abcdef".into();
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, other.to_string()).unwrap();
    let fp = format!("sha256:{}", "00".repeat(32));
    let base = ["run-edge", "--bundle", device.to_str().unwrap(), "--cloud", "127.0.0.1:9", "--cloud-fingerprint", &fp, "--prompt", "x"];
    let o = hat(&[&base[..], &["--profile", other_path.to_str().unwrap()]].concat(), &[]);
    assert!(!o.status.success() && stderr(&o).contains("measured on split 0123456789abcdef0123456789abcdef"), "{}", stderr(&o));
    let o = hat(&[&base[..], &["--chunk-size", "lots"]].concat(), &[]);
    assert!(!o.status.success() && stderr(&o).contains("--chunk-size lots"), "{}", stderr(&o));
    let o = hat(&["profile", "--bundle", "/no/such", "--out", out.to_str().unwrap()], &[]);
    assert!(!o.status.success() && stderr(&o).starts_with("error: "), "{}", stderr(&o));

    // serve-cloud without --profile measures a quick one before it listens; run-edge plans the
    // chunks (`auto` is the default) from a quick device profile it measures once and caches.
    let state = dir.path().join("state");
    let (mut server, addr, fingerprint, _) = serve_cloud(&cloud, "127.0.0.1:0", &state);
    let cache = dir.path().join("cache");
    let edge = ["run-edge", "--bundle", device.to_str().unwrap(), "--cloud", &addr, "--cloud-fingerprint", &fingerprint, "--prompt", "hello there, how are you today?", "--max-tokens", "3", "--adapter", "none", "--json"];
    let envs = [("HAT_CACHE_DIR", cache.to_str().unwrap())];
    let runs: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let o = hat(&edge, &envs);
            assert!(o.status.success(), "{}", stderr(&o));
            serde_json::from_slice(&o.stdout).unwrap()
        })
        .collect();
    // The load generator against the same cloud: two sessions for a second.
    let load = ["loadgen", "--bundle", device.to_str().unwrap(), "--cloud", &addr, "--cloud-fingerprint", &fingerprint, "--sessions", "2", "--duration", "1", "--prefill", "8", "--json"];
    let o = hat(&load, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(l["rounds"].as_u64().unwrap() > 0 && l["positions_per_s"].as_f64().unwrap() > 0.0 && l["round_ms_p99"].as_f64().unwrap() >= l["round_ms_p50"].as_f64().unwrap(), "{l}");
    let o = hat(&[&load[..], &["--advance", "9"]].concat(), &[]);
    assert!(!o.status.success() && stderr(&o).contains("cannot accept 9 positions"), "{}", stderr(&o));
    let _ = server.kill();
    let _ = server.wait();
    for v in &runs {
        let plan: Vec<u64> = v["chunk_plan"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(plan.iter().sum::<u64>(), v["prompt_tokens"].as_u64().unwrap(), "{v}");
        assert!(v["predicted_ttft_ms"].as_f64().unwrap() > 0.0 && v["chunk_size"] == 0, "{v}");
        assert_eq!(v["plan_link_source"], "probed in this session");
    }
    assert!(runs[0]["device_profile"].as_str().unwrap().starts_with("quick profile measured now, cached"), "{}", runs[0]);
    assert!(runs[1]["device_profile"].as_str().unwrap().starts_with("cached quick profile"), "{}", runs[1]);
    assert!(state.read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("profile-cloud-")), "the cloud keeps its quick profile");
}

/// Starts `hat serve-cloud` for `cloud` on `listen` with its state in `state`; returns the
/// process, its address, its certificate's fingerprint, and a channel that gets a message each
/// time a session opens.
fn serve_cloud(cloud: &Path, listen: &str, state: &Path) -> (std::process::Child, String, String, std::sync::mpsc::Receiver<()>) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_hat"))
        .args(["serve-cloud", "--bundle", cloud.to_str().unwrap(), "--listen", listen, "--state-dir", state.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(server.stdout.take().unwrap()));
    let addr = lines.next().unwrap().unwrap().trim_start_matches("listening ").to_string();
    let fingerprint = lines.next().unwrap().unwrap().trim_start_matches("fingerprint ").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        // Read to the end: a closed pipe would fail the server's logging.
        for line in std::io::BufRead::lines(std::io::BufReader::new(log)).map_while(Result::ok) {
            if line.contains(": open (") {
                let _ = tx.send(());
            }
        }
    });
    (server, addr, fingerprint, rx)
}

/// `hat run-edge --json` started against the cloud at `addr` for 40 greedy tokens, f32 on the
/// wire, slowed down (chunks of 4 positions, 100 ms round trips) so that a test can kill the cloud
/// at chosen points of the answer; `extra` flags added.
fn slow_edge(split: &Path, addr: &str, fingerprint: &str, prompt: &str, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_hat"))
        .args(["run-edge", "--bundle", split.join("device").to_str().unwrap(), "--cloud", addr, "--cloud-fingerprint", fingerprint, "--prompt", prompt])
        .args(["--max-tokens", "40", "--adapter", "none", "--wire-dtype", "f32", "--chunk-size", "4", "--link-rtt-ms", "100", "--json"])
        .args(extra)
        .env("HAT_NO_PROGRESS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The cloud process is killed (SIGKILL: no close reaches the edge) at two points of an answer
/// and another one started on the same address; `run-edge` notices the overdue reply, replays
/// its session to the new process and prints the same tokens as `hat generate`.
#[test]
fn run_edge_outlives_a_killed_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let (model, split) = tiny_split(dir.path(), "2");
    let prompt = "tell me a story about the sea and the wind";
    let o = hat(&["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-tokens", "40", "--json"], &[]);
    let want: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let state = dir.path().join("state");
    // Slow enough to kill mid-prefill (16 chunks of 4 positions) and mid-decoding: 100 ms a
    // round trip, about a dozen rounds. The times count from the session's opening.
    for kill_after_ms in [20, 600] {
        let (mut cloud, addr, fingerprint, opened) = serve_cloud(&split.join("cloud"), "127.0.0.1:0", &state);
        let edge = slow_edge(&split, &addr, &fingerprint, prompt, &["--cloud-timeout", "30"]);
        opened.recv_timeout(std::time::Duration::from_secs(30)).expect("the edge opens a session");
        std::thread::sleep(std::time::Duration::from_millis(kill_after_ms));
        cloud.kill().unwrap();
        cloud.wait().unwrap();
        // The same address and certificate (the state folder keeps it).
        let (mut again, _, _, _) = serve_cloud(&split.join("cloud"), &addr, &state);
        let o = edge.wait_with_output().unwrap();
        let _ = again.kill();
        let _ = again.wait();
        assert!(o.status.success(), "killed after {kill_after_ms} ms: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["token_ids"], want["token_ids"], "killed after {kill_after_ms} ms");
        assert_eq!(v["cloud_reconnects"], 1, "killed after {kill_after_ms} ms: {v}");
        assert!(v["recovery_ms"].as_f64().unwrap() > 0.0);
    }
    // Killed for good: after --cloud-timeout the run fails, and --json still reports the
    // verified tokens it had (with --fallback slm it would finish on the device).
    let (mut cloud, addr, fingerprint, opened) = serve_cloud(&split.join("cloud"), "127.0.0.1:0", &state);
    let edge = slow_edge(&split, &addr, &fingerprint, prompt, &["--cloud-timeout", "1", "--connect-timeout", "0.3"]);
    opened.recv_timeout(std::time::Duration::from_secs(30)).expect("the edge opens a session");
    std::thread::sleep(std::time::Duration::from_millis(600));
    cloud.kill().unwrap();
    cloud.wait().unwrap();
    let o = edge.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the generation failed after") && stderr(&o).contains("reached none within 1.0 s"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got = v["token_ids"].as_array().unwrap();
    assert!(!got.is_empty() && got.len() < 40 && got[..] == want["token_ids"].as_array().unwrap()[..got.len()], "{v}");
    assert!(v["error"].as_str().unwrap().contains("lost the cloud"), "{v}");
}

#[test]
fn generate_json_and_split_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), TinySpec::default()).unwrap();
    let m = model.to_str().unwrap();
    let o = hat(&["generate", "--model", m, "--prompt", "hi", "--max-tokens", "5", "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for key in ["text", "token_ids", "prompt_tokens", "generated_tokens", "ttft_ms", "tbt_ms", "tokens_per_s"] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    let n = v["generated_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&n));
    assert_eq!(v["token_ids"].as_array().unwrap().len() as u64, n);

    let out = dir.path().join("split");
    let o = hat(&["split", "--model", m, "--input-layers", "1", "--output-layers", "1", "--out", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("split id"));
    // Again without --force: refused, with a non-zero exit.
    let o = hat(&["split", "--model", m, "--out", out.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    // Train a tiny conditioned adapter from the command line, self-distilled, then evaluate the
    // file alone (its conditioning comes from the file).
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sharegpt-sample.json");
    let adapter = dir.path().join("a.safetensors");
    let common = ["--model", m, "--split", out.to_str().unwrap(), "--dataset", data.to_str().unwrap(), "--held-out", "1", "--seq-len", "48", "--eval-tokens", "6"];
    let train: Vec<&str> = [&["train-adapter"][..], &common, &["--out", adapter.to_str().unwrap(), "--steps", "2", "--self-distill", "8", "--conditioning", "features"]].concat();
    let o = hat(&train, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(adapter.with_extension("selfdistill.safetensors").exists() && adapter.with_extension("report.json").exists());
    let eval: Vec<&str> = [&["train-adapter"][..], &common, &["--evaluate", adapter.to_str().unwrap()]].concat();
    let o = hat(&eval, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert!(v["mean_accepted"].as_f64().unwrap() >= 1.0 && v["top1_agreement"].as_f64().is_some(), "{v}");
    let o = hat(&[&["train-adapter"][..], &common].concat(), &[]);
    assert!(!o.status.success() && stderr(&o).contains("--out"), "{}", stderr(&o));

    for (k1, k2) in [("0", "1"), ("1", "0"), ("3", "3")] {
        let o = hat(&["split", "--model", m, "--input-layers", k1, "--output-layers", k2, "--out", dir.path().join("x").to_str().unwrap()], &[]);
        assert!(!o.status.success() && stderr(&o).contains("error: "), "{k1}/{k2}: {}", stderr(&o));
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let cases: &[&[&str]] = &[
        &["generate", "--model", "/no/such/model.gguf", "--prompt", "x"],
        &["generate", "--model", "not a hub id", "--prompt", "x"],
        &["generate", "--model", "x/y", "--prompt", "x", "--temperature", "-1"],
        &["generate", "--model", "x/y", "--prompt-file", "/no/such/prompt.txt"],
        &["--threads", "0", "generate", "--model", "x/y", "--prompt", "x"],
        // Refused before any connection is tried (no cloud listens on this port).
        &["run-edge", "--bundle", "/no/such", "--cloud", "127.0.0.1:9", "--cloud-fingerprint", "sha256:00", "--prompt", "x", "--draft-threshold", "1.5"],
        &["run-edge", "--bundle", "/no/such", "--cloud", "127.0.0.1:9", "--cloud-fingerprint", "sha256:00", "--prompt", "x", "--draft-vocab", "many"],
        &["run-edge", "--bundle", "/no/such", "--cloud", "127.0.0.1:9", "--cloud-fingerprint", "sha256:00", "--prompt", "x", "--uplink-noise", "-1"],
    ];
    for args in cases {
        let o = hat(args, &[("HF_HUB_OFFLINE", "1")]);
        assert!(!o.status.success(), "{args:?}");
        let e = stderr(&o);
        assert!(e.starts_with("error: ") && !e.contains("panicked"), "{args:?}: {e}");
    }
}

/// `hat audit` against a model or data set that does not fit it: each a clear error naming the
/// problem, before any attack runs.
#[test]
fn audit_refuses_a_mismatched_model_or_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), TinySpec::default()).unwrap();
    let model = model.to_str().unwrap();
    let not_chats = dir.path().join("numbers.json");
    std::fs::write(&not_chats, "[1, 2, 3]").unwrap();
    let one = dir.path().join("one.jsonl");
    std::fs::write(&one, r#"{"id": "a", "conversations": [{"from": "human", "value": "hello there"}]}"#).unwrap();
    let (not_chats, one) = (not_chats.to_str().unwrap(), one.to_str().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (&["--dataset", not_chats], "cannot read --dataset"),
        (&["--dataset", one], "no conversation with a user turn after the first 2000"),
        // The tiny model has 6 layers: 5 on the device and 2 after leave no middle.
        (&["--dataset", one, "--skip", "0", "--input-layers", "5"], "do not split a model of 6 layers"),
        (&["--dataset", one, "--skip", "0", "--defences", "shuffle"], "unknown defence"),
    ];
    for (args, want) in cases {
        let mut all = vec!["audit", "--model", model];
        all.extend_from_slice(args);
        let o = hat(&all, &[]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains(want) && !e.contains("panicked"), "{args:?}: {e}");
    }
}

/// Lays out a hub cache entry the way hf-hub does: blobs, a snapshot and a ref.
fn fake_hub_cache(home: &Path, repo: &str, model: &Path) {
    let folder = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in std::fs::read_dir(model).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snapshot.join(f.file_name())).unwrap();
    }
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), "0123abcd").unwrap();
}

#[test]
fn hub_ids_resolve_from_the_cache_when_offline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), TinySpec::default()).unwrap();
    let home = dir.path().join("hf");
    fake_hub_cache(&home, "acme/tiny", &model);
    let env = [("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let o = hat(&["generate", "--model", "acme/tiny", "--prompt", "hi", "--max-tokens", "3", "--json"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("loaded acme/tiny"));
    // Not cached, offline: a clear error naming the cache and the variable.
    let o = hat(&["generate", "--model", "acme/missing", "--prompt", "hi"], &env);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("acme/missing"), "{e}");
    // `hat download --out` copies the cached files into a model folder.
    let out = dir.path().join("copy");
    let o = hat(&["download", "--model", "acme/tiny", "--out", out.to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").exists() && out.join("tokenizer.json").exists());
}
