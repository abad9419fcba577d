//! The model store against real local servers (no internet): a file server in this test
//! (Range, an access log, a connection dropped at 50 %, a corrupted byte, a size over the
//! quota, and a Hugging Face Hub), Debian's docker-registry as an Ollama-style registry, real
//! llama-server modules activated by reference, modvisorctl's progress bar in a
//! pseudo-terminal, and the fetch user swapping its download for a link or a FIFO.

mod common;
mod store_http;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;
use futures_util::StreamExt;
use modvisor::dbus::models::proxy::{JobProxy, ModelsProxy};
use sha2::{Digest, Sha256};
use store_http::FileServer;
use zbus::Variant;
use zbus::proxy::CacheProperties;

fn tiny() -> PathBuf {
    let d = PathBuf::from(
        std::env::var("MODVISOR_TEST_LLAMA")
            .unwrap_or_else(|_| "/var/cache/modvisor-test/llama".into()),
    );
    let t = d.join("tiny.gguf");
    assert!(
        t.exists() && d.join("bin/llama-server").exists(),
        "tiny.gguf and llama-server must be built (engines/build-llama-server.sh) in {}",
        d.display()
    );
    t
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A store directory the unprivileged fetcher can reach (tempdirs are 0700).
fn store_dir() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    t
}

fn models_config(store: &Path, extra: &str) -> String {
    format!("[models]\nstore = \"{}\"\n{extra}", store.display())
}

async fn models(d: &Daemon) -> ModelsProxy<'static> {
    ModelsProxy::new(&d.conn).await.expect("models proxy")
}

/// Starts a pull; returns its job path.
async fn start_pull(d: &Daemon, source: &str) -> zbus::OwnedObjectPath {
    let mut o = std::collections::HashMap::new();
    o.insert("yes", Variant::from(true));
    models(d).await.pull(source, o).await.expect("Pull")
}

/// Waits (bounded) for a job to finish: (state, error).
async fn finish(d: &Daemon, job: &zbus::OwnedObjectPath) -> (String, String) {
    let p = JobProxy::builder(&d.conn)
        .path(job.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("job proxy");
    let mut fin = p.receive_finished().await.expect("subscribe Finished");
    let deadline = Instant::now() + T;
    loop {
        let st = p.state().await.expect("State");
        if matches!(st.as_str(), "completed" | "failed" | "cancelled") {
            return (st, p.error().await.expect("Error"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, fin.next()).await.is_err() {
            panic!("job {job} did not finish within {T:?}; log:\n{}", d.log());
        }
    }
}

async fn pull(d: &Daemon, source: &str) -> (String, String) {
    let job = start_pull(d, source).await;
    finish(d, &job).await
}

fn ls_r(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            out.extend(ls_r(&e.path()));
        }
    }
    out
}

#[tokio::test]
async fn https_source_resumes_verifies_refuses_over_quota_and_shares_one_download() {
    let data = std::fs::read(tiny()).expect("tiny");
    let sum = sha256(&data);
    let srv = FileServer::start(data.clone()).await;
    let store = store_dir();
    let o = Options {
        extra_config: models_config(
            store.path(),
            "max_disk = \"64M\"\nconfirm_above = \"100K\"\n",
        ),
        ..Options::default()
    };
    let d = Daemon::start_with(&[], o).await;

    // Dropped at 50 %: the pull fails; the retry asks only for the rest, and the sum holds.
    let src = format!("{}#sha256={sum}", srv.url("drop", "tiny.gguf"));
    let (st, err) = pull(&d, &src).await;
    assert_eq!(st, "failed", "the first try is cut off: {err}");
    let (st, err) = pull(&d, &src).await;
    assert_eq!(st, "completed", "{err}\n{}", d.log());
    let gets: Vec<_> = srv
        .hits("/drop/")
        .into_iter()
        .filter(|h| h.method == "GET")
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={}-", data.len() / 2).as_str()),
        "the retry resumes"
    );
    let file = store.path().join("url").join(&sum).join("tiny.gguf");
    assert_eq!(sha256(&std::fs::read(&file).expect("stored")), sum);
    let rows = models(&d).await.list().await.expect("List");
    let row = rows
        .iter()
        .find(|r| r.0 == format!("sha256:{sum}"))
        .expect("listed");
    assert_eq!(
        (row.3.as_str(), row.4),
        (file.to_str().unwrap_or(""), data.len() as u64)
    );
    assert_eq!(row.6, "llama", "architecture from the GGUF header");

    // One corrupted byte: caught, and the file never becomes visible.
    models(&d)
        .await
        .remove(&format!("sha256:{sum}"), false)
        .await
        .expect("Remove");
    assert!(!file.exists());
    let (st, err) = pull(
        &d,
        &format!("{}#sha256={sum}", srv.url("corrupt", "tiny.gguf")),
    )
    .await;
    assert_eq!(st, "failed");
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert!(!file.exists(), "{:?}", ls_r(store.path()));
    assert!(models(&d).await.list().await.expect("List").is_empty());

    // Over max_disk: refused before any GET.
    let big = format!("{}#sha256={sum}", srv.url("huge", "big.gguf"));
    let (st, err) = pull(&d, &big).await;
    assert_eq!(st, "failed");
    assert!(err.contains("max_disk"), "{err}");
    assert!(
        srv.hits("/huge/").iter().all(|h| h.method == "HEAD"),
        "{:?}",
        srv.hits("/huge/")
    );

    // Without confirmation above confirm_above: refused before any GET.
    let slow = format!("{}#sha256={sum}", srv.url("slow", "tiny.gguf"));
    let job = models(&d)
        .await
        .pull(&slow, Default::default())
        .await
        .expect("Pull");
    let (st, err) = finish(&d, &job).await;
    assert!(st == "failed" && err.contains("--yes"), "{st}: {err}");
    assert!(srv.hits("/slow/").iter().all(|h| h.method == "HEAD"));

    // Cancelled halfway: the partial file stays, and the next pull resumes it.
    let job = start_pull(&d, &slow).await;
    let jp = JobProxy::builder(&d.conn)
        .path(job.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("job");
    let deadline = Instant::now() + T;
    while jp.bytes_done().await.expect("BytesDone") == 0 {
        assert!(Instant::now() < deadline, "the download starts");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    jp.cancel().await.expect("Cancel");
    assert_eq!(finish(&d, &job).await.0, "cancelled");
    let partial: u64 = ls_r(&store.path().join(".partial"))
        .iter()
        .filter(|p| p.ends_with(".part"))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    assert!(partial > 0, "a cancel keeps what was downloaded");
    let gets_before = srv
        .hits("/slow/")
        .iter()
        .filter(|h| h.method == "GET")
        .count();

    // Two concurrent pulls of one model: one job, one download.
    let (a, b) = tokio::join!(start_pull(&d, &slow), start_pull(&d, &slow));
    assert_eq!(a, b, "the second pull joins the first");
    // The download runs as the unprivileged fetch user, into a directory it owns.
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("nobody");
    let deadline = Instant::now() + T;
    let owner = loop {
        let found = std::fs::read_dir(store.path().join(".partial"))
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| std::os::unix::fs::MetadataExt::uid(&e.metadata().ok()?).into());
        if let Some(uid) = found {
            break uid;
        }
        assert!(Instant::now() < deadline, "no partial directory appeared");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    // modvisor-engine when it exists (the package creates it), else nobody.
    let engine = nix::unistd::User::from_name("modvisor-engine")
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    let expected = engine.unwrap_or(nobody.uid.as_raw());
    assert_eq!(owner, expected, "the fetcher's directory");
    assert_eq!(finish(&d, &a).await.0, "completed");
    let gets: Vec<_> = srv
        .hits("/slow/")
        .into_iter()
        .filter(|h| h.method == "GET")
        .collect();
    assert_eq!(gets.len(), gets_before + 1, "one download: {gets:?}");
    assert!(
        gets[gets_before].range.is_some(),
        "it resumed the cancelled one"
    );
    let slow_file = store.path().join("url").join(&sum).join("tiny.gguf");
    assert_eq!(sha256(&std::fs::read(slow_file).expect("stored")), sum);

    // Path traversal and plain http to a non-loopback host are refused up front.
    let m = models(&d).await;
    for bad in ["ollama:../../etc/x", "http://example.com/m.gguf#sha256=00"] {
        let e = m.pull(bad, Default::default()).await.expect_err(bad);
        assert!(e.to_string().contains("InvalidArgument"), "{bad}: {e}");
    }
    // The fetcher ran unprivileged: the store's files are root's, partial dirs are gone.
    assert!(!ls_r(store.path()).iter().any(|p| p.ends_with(".part")));
}

/// The fetch user modvisord picks without `fetch_user`: modvisor-engine when it exists (the
/// package creates it; direct-backend engines run as it too), else nobody.
fn fetch_user() -> nix::unistd::User {
    ["modvisor-engine", "nobody"]
        .iter()
        .find_map(|n| nix::unistd::User::from_name(n).ok().flatten())
        .expect("modvisor-engine or nobody")
}

/// Runs a shell command as the fetch user (what a compromised fetcher or engine can do).
fn as_fetch_user(sh: &str) {
    let o = Command::new("runuser")
        .args(["-u", &fetch_user().name, "--", "sh", "-c", sh])
        .output()
        .expect("runuser");
    assert!(
        o.status.success(),
        "{sh}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Starts a (slow) pull and waits until the fetcher has its `.part` file open and is writing
/// into it; returns the job and that file's path.
async fn pull_under_way(d: &Daemon, src: &str, store: &Path) -> (zbus::OwnedObjectPath, PathBuf) {
    let job = start_pull(d, src).await;
    let jp = JobProxy::builder(&d.conn)
        .path(job.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("job");
    let deadline = Instant::now() + T;
    while jp.bytes_done().await.expect("BytesDone") == 0 {
        assert!(Instant::now() < deadline, "the download starts");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let part = ls_r(&store.join(".partial"))
        .into_iter()
        .find(|p| p.ends_with("tiny.gguf.part"))
        .expect("the .part file");
    (job, PathBuf::from(part))
}

#[tokio::test]
async fn a_part_file_swapped_by_the_fetch_user_is_refused_and_root_touches_nothing_else() {
    use std::os::unix::fs::MetadataExt;
    let data = std::fs::read(tiny()).expect("tiny");
    let sum = sha256(&data);
    let srv = FileServer::start(data).await;
    let store = store_dir();
    let o = Options {
        extra_config: models_config(store.path(), ""),
        ..Options::default()
    };
    let d = Daemon::start_with(&[], o).await;
    let src = format!("{}#sha256={sum}", srv.url("slow", "tiny.gguf"));
    let stored = store.path().join("url").join(&sum).join("tiny.gguf");

    // A root-only file the fetch user would like to read.
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "root only\n").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let before = std::fs::metadata(&secret).expect("stat");
    assert_eq!(
        (before.uid(), before.gid()),
        (0, 0),
        "the test runs as root"
    );

    // While the fetcher writes (into the inode it opened), the fetch user swaps its .part
    // for a symbolic link to the secret: when the download is done, modvisord takes over
    // what the path names.
    let (job, part) = pull_under_way(&d, &src, store.path()).await;
    as_fetch_user(&format!(
        "ln -sfn '{}' '{}'",
        secret.display(),
        part.display()
    ));
    assert!(part.is_symlink());
    let (st, err) = finish(&d, &job).await;
    assert_eq!(st, "failed", "{err}\n{}", d.log());
    assert!(
        err.contains("tiny.gguf") && err.contains("symbolic link"),
        "a clear error: {err}"
    );
    let after = std::fs::metadata(&secret).expect("stat");
    assert_eq!(
        (after.mode() & 0o7777, after.uid(), after.gid()),
        (0o600, 0, 0),
        "root neither chmodded nor chowned the link's target"
    );
    assert_eq!(
        std::fs::read_to_string(&secret).expect("read"),
        "root only\n"
    );
    assert!(
        !stored.exists() && !stored.is_symlink(),
        "nothing placed: {:?}",
        ls_r(store.path())
    );
    assert!(models(&d).await.list().await.expect("List").is_empty());
    assert!(!part.is_symlink(), "the swapped entry was discarded");

    // A FIFO in its place: refused at once (an open for reading would block forever).
    let (job, part) = pull_under_way(&d, &src, store.path()).await;
    as_fetch_user(&format!("rm -f '{0}' && mkfifo '{0}'", part.display()));
    let (st, err) = finish(&d, &job).await;
    assert_eq!(st, "failed", "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    assert!(!stored.exists());

    // Left alone, the same pull completes: the stored copy is root's, 0644, and sound.
    let (st, err) = pull(&d, &src).await;
    assert_eq!(st, "completed", "{err}\n{}", d.log());
    let m = std::fs::symlink_metadata(&stored).expect("stored");
    assert!(m.file_type().is_file());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o644, 0, 0));
    assert_eq!(sha256(&std::fs::read(&stored).expect("read")), sum);
    assert!(
        !ls_r(store.path())
            .iter()
            .any(|p| p.contains(".modvisor-") || p.ends_with(".part")),
        "no temporary file is left: {:?}",
        ls_r(store.path())
    );
}

const OUTSIDER: &str = "mvtest-outsider";

fn outsider() {
    let exists = Command::new("id")
        .arg(OUTSIDER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let o = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                OUTSIDER,
            ])
            .output()
            .expect("useradd");
        assert!(o.status.success() || String::from_utf8_lossy(&o.stderr).contains("exists"));
    }
    let _ = Command::new("gpasswd")
        .args(["-d", OUTSIDER, "modvisor"])
        .output();
}

#[tokio::test]
async fn non_members_may_list_but_not_pull_or_remove_and_the_progress_bar_reaches_100() {
    outsider();
    let data = std::fs::read(tiny()).expect("tiny");
    let sum = sha256(&data);
    let srv = FileServer::start(data).await;
    let store = store_dir();
    let o = Options {
        extra_config: models_config(store.path(), ""),
        ..Options::default()
    };
    let d = Daemon::start_with(&[], o).await;
    let src = format!("{}#sha256={sum}", srv.url("slow", "tiny.gguf"));
    let ctl = env!("CARGO_BIN_EXE_modvisorctl");
    let as_outsider = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", OUTSIDER, "--", ctl, "--bus-address", &d.bus.address])
            .args(args)
            .output()
            .expect("runuser")
    };
    let o = as_outsider(&["pull", &src]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        srv.hits("/slow/").is_empty(),
        "nothing fetched for a non-member"
    );
    let o = as_outsider(&["rm", "--force", &format!("sha256:{sum}")]);
    assert_eq!(o.status.code(), Some(4));
    let o = as_outsider(&["models"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // In a pseudo-terminal: the bar renders and reaches 100 %.
    let cmd = format!("{ctl} --bus-address '{}' pull '{src}'", d.bus.address);
    let out = tokio::time::timeout(
        T,
        tokio::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .output(),
    )
    .await
    .expect("pull finishes in time")
    .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[####################] 100%"), "{text}");
    assert!(text.contains('\r') && text.contains("ETA"), "{text}");
    // Not a terminal: plain lines.
    let o = Command::new(ctl)
        .args(["--bus-address", &d.bus.address, "--json", "models"])
        .output()
        .expect("models");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v[0]["id"], format!("sha256:{sum}"));
}

/// The example llama.cpp manifest with the store as its model directory.
fn llama_manifest(name: &str, store: &Path, port: u16) -> String {
    let bin = tiny().with_file_name("bin/llama-server");
    format!(
        "name = \"{name}\"\ntrusted = true\n[runtime]\nmodes = [\"native\"]\nstop_timeout = \"3s\"\n\
         [native]\ncommand = [\"{}\", \"-m\", \"${{model}}\", \"--host\", \"127.0.0.1\", \"--port\", \"{port}\"]\n\
         [model]\ndefault = \"{}\"\ndirectory = \"{}\"\n\
         [health]\nhttp = \"http://127.0.0.1:{port}/health\"\ninterval = \"500ms\"\ntimeout = \"2s\"\nstart_timeout = \"1m\"\n\
         [restart]\npolicy = \"no\"\n",
        bin.display(),
        store.join("seed/tiny.gguf").display(),
        store.display()
    )
}

/// The registry process and its storage (removed after it).
struct Registry(u32, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

fn registry(port: u16) -> Registry {
    assert!(
        Command::new("sh")
            .args(["-c", "command -v docker-registry"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "docker-registry must be installed (testbed/install.sh)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/ollama-registry.sh");
    let o = Command::new("bash")
        .arg(script)
        .arg(dir.path())
        .arg(port.to_string())
        .arg(tiny())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("ollama-registry.sh");
    assert!(o.status.success(), "ollama-registry.sh failed");
    let pid = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("pid");
    Registry(pid, dir)
}

#[tokio::test]
async fn ollama_source_pull_list_activate_into_llama_server_and_remove() {
    let rport = free_port();
    let _reg = registry(rport);
    let store = store_dir();
    std::fs::create_dir_all(store.path().join("seed")).expect("mkdir");
    std::fs::copy(tiny(), store.path().join("seed/tiny.gguf")).expect("copy");
    let port = free_port();
    let o = Options {
        extra_config: models_config(
            store.path(),
            &format!("ollama_registry = \"http://127.0.0.1:{rport}\"\n"),
        ),
        ..Options::default()
    };
    let d = Daemon::start_with(&[("chat", &llama_manifest("chat", store.path(), port))], o).await;
    d.wait_module("chat", T, |s, h, _| s == "running" && h == "online")
        .await;
    let (st, err) = pull(&d, "ollama:tiny").await;
    assert_eq!(st, "completed", "{err}\n{}", d.log());
    let file = store.path().join("ollama/library/tiny/latest/model.gguf");
    assert_eq!(
        std::fs::read(&file).expect("pulled"),
        std::fs::read(tiny()).expect("tiny")
    );
    let rows = models(&d).await.list().await.expect("List");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].6.as_str()),
        ("ollama:tiny:latest", "llama")
    );

    d.manager()
        .await
        .activate_model("chat", "ollama:tiny:latest")
        .await
        .expect("ActivateModel by reference");
    d.wait_module("chat", T, |s, h, _| s == "running" && h == "online")
        .await;
    let active = d
        .module("chat")
        .await
        .active_model()
        .await
        .expect("ActiveModel");
    assert_eq!(Path::new(&active), file.canonicalize().expect("canon"));
    let rows = models(&d).await.list().await.expect("List");
    assert_eq!(rows[0].10, vec!["chat".to_string()], "used by the module");
    let e = models(&d)
        .await
        .remove("ollama:tiny", false)
        .await
        .expect_err("in use");
    assert!(e.to_string().contains("chat"), "{e}");
    let e = d
        .manager()
        .await
        .activate_model("chat", "ollama:nope")
        .await
        .expect_err("absent");
    assert!(e.to_string().contains("not in the model store"), "{e}");

    d.manager()
        .await
        .stop_module("chat")
        .await
        .expect("StopModule");
    models(&d)
        .await
        .remove("ollama:tiny", false)
        .await
        .expect("Remove");
    assert!(!file.exists());
    assert!(models(&d).await.list().await.expect("List").is_empty());
}

#[tokio::test]
async fn hf_source_lays_out_the_hub_cache_activates_into_llama_server_resumes_and_refuses_traversal()
 {
    let data = std::fs::read(tiny()).expect("tiny");
    let sum = sha256(&data);
    let srv = FileServer::start(data.clone()).await;
    let store = store_dir();
    std::fs::create_dir_all(store.path().join("seed")).expect("mkdir");
    std::fs::copy(tiny(), store.path().join("seed/tiny.gguf")).expect("copy");
    let port = free_port();
    let o = Options {
        extra_config: models_config(
            store.path(),
            &format!("hf_endpoint = \"http://127.0.0.1:{}\"\n", srv.port),
        ),
        ..Options::default()
    };
    let d = Daemon::start_with(&[("chat", &llama_manifest("chat", store.path(), port))], o).await;
    d.wait_module("chat", T, |s, h, _| s == "running" && h == "online")
        .await;
    let mut opts = std::collections::HashMap::new();
    opts.insert(
        "include",
        Variant::from(vec!["*.gguf".to_string(), "config.json".to_string()]),
    );
    let job = models(&d)
        .await
        .pull("hf:org/tiny", opts)
        .await
        .expect("Pull");
    let (st, err) = finish(&d, &job).await;
    assert_eq!(st, "completed", "{err}\n{}", d.log());
    let repo = store.path().join("models--org--tiny");
    let commit = store_http::COMMIT;
    let link = repo.join("snapshots").join(commit).join("tiny.gguf");
    assert_eq!(
        std::fs::read_link(&link).expect("symlink"),
        PathBuf::from(format!("../../blobs/{sum}"))
    );
    assert_eq!(sha256(&std::fs::read(&link).expect("read")), sum);
    let cfg = repo.join("snapshots").join(commit).join("config.json");
    assert_eq!(
        std::fs::read_to_string(cfg).expect("config"),
        store_http::CONFIG
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).expect("ref"),
        commit
    );
    assert!(
        srv.hits("README").is_empty(),
        "--include leaves other files alone"
    );
    assert!(
        srv.hits("/cdn/tiny.gguf").iter().any(|h| h.method == "GET"),
        "the LFS redirect is followed"
    );
    // Pulled again: the hub is asked, nothing is downloaded a second time.
    let cdn_gets = || {
        srv.hits("/cdn/")
            .iter()
            .filter(|h| h.method == "GET")
            .count()
    };
    let n = cdn_gets();
    let mut opts = std::collections::HashMap::new();
    opts.insert(
        "include",
        Variant::from(vec!["*.gguf".to_string(), "config.json".to_string()]),
    );
    let job = models(&d)
        .await
        .pull("hf:org/tiny", opts)
        .await
        .expect("Pull");
    assert_eq!(finish(&d, &job).await.0, "completed");
    assert_eq!(
        cdn_gets(),
        n,
        "an unchanged snapshot is not downloaded again"
    );
    let resolved = modvisor::store::Store::at(store.path())
        .resolve("hf:org/tiny@main:tiny.gguf")
        .expect("resolve");
    assert_eq!(resolved, link);
    let rows = models(&d).await.list().await.expect("List");
    assert!(
        rows.iter()
            .any(|r| r.0 == "hf:org/tiny@main" && r.2 == commit && r.6 == "llama"),
        "{rows:?}"
    );

    // Activated by reference into a real llama-server, which loads it and comes online.
    d.manager()
        .await
        .activate_model("chat", "hf:org/tiny@main:tiny.gguf")
        .await
        .expect("ActivateModel by reference");
    d.wait_module("chat", T, |s, h, _| s == "running" && h == "online")
        .await;
    let active = d
        .module("chat")
        .await
        .active_model()
        .await
        .expect("ActiveModel");
    assert_eq!(
        Path::new(&active).canonicalize().expect("canon"),
        repo.join("blobs").join(&sum).canonicalize().expect("canon"),
        "the snapshot's file (its blob)"
    );
    let rows = models(&d).await.list().await.expect("List");
    let row = rows
        .iter()
        .find(|r| r.0 == "hf:org/tiny@main")
        .expect("listed");
    assert_eq!(row.10, vec!["chat".to_string()], "used by the module");
    let e = models(&d)
        .await
        .remove("hf:org/tiny@main", false)
        .await
        .expect_err("in use");
    assert!(e.to_string().contains("chat"), "{e}");
    d.manager()
        .await
        .stop_module("chat")
        .await
        .expect("StopModule");

    // Cut off at 50 % (behind the hub's redirect): the retry resumes with a Range request.
    let (st, err) = pull(&d, "hf:org/resume").await;
    assert_eq!(st, "failed", "the first try is cut off: {err}");
    let (st, err) = pull(&d, "hf:org/resume").await;
    assert_eq!(st, "completed", "{err}\n{}", d.log());
    let gets: Vec<_> = srv
        .hits("/drop/")
        .into_iter()
        .filter(|h| h.method == "GET")
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={}-", data.len() / 2).as_str()),
        "the retry resumes"
    );
    let resumed = store
        .path()
        .join("models--org--resume/snapshots")
        .join(commit)
        .join("tiny.gguf");
    assert_eq!(sha256(&std::fs::read(&resumed).expect("read")), sum);

    let before = ls_r(store.path());
    let (st, err) = pull(&d, "hf:org/evil").await;
    assert_eq!(st, "failed");
    assert!(err.contains("unsafe file name"), "{err}");
    assert!(!Path::new("/etc/x").exists());
    let after: Vec<_> = ls_r(store.path())
        .into_iter()
        .filter(|p| !p.contains("/.partial"))
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|p| !p.contains("/.partial"))
        .collect();
    assert_eq!(before, after, "nothing written");

    models(&d)
        .await
        .remove("hf:org/tiny@main", false)
        .await
        .expect("Remove");
    assert!(
        !repo.join("blobs").join(&sum).exists(),
        "its blobs go with it"
    );
    assert_eq!(
        sha256(&std::fs::read(&resumed).expect("read")),
        sum,
        "another repository's blob of the same content stays"
    );
}
