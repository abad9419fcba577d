//! A small HTTP/1.1 file server for the store tests, on loopback: GET and HEAD, `Range:
//! bytes=N-` (206), and an access log. The path's first element picks the behaviour:
//! `/ok/F` serves the file, `/drop/F` closes the first full GET at 50 %, `/corrupt/F`
//! serves it with one byte changed, `/slow/F` sends it in small, paced chunks, `/huge/F`
//! announces 1 GiB (HEAD) and sends nothing useful. It is also a Hugging Face Hub for the
//! endpoints the store calls: `/api/models/org/{tiny,resume,evil}/revision/main` (repository
//! info with siblings), `/org/tiny/resolve/COMMIT/FILE` (an LFS file answers 302 to
//! `/cdn/FILE` with `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`; a small file answers
//! itself); `org/resume` has only `tiny.gguf`, redirected to `/drop/tiny.gguf` (cut at 50 %
//! the first time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
}

pub struct FileServer {
    pub port: u16,
    pub log: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileServer {
    pub async fn start(data: Vec<u8>) -> FileServer {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (data, lg) = (Arc::new(data), log.clone());
        let dropped = Arc::new(Mutex::new(false));
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (data, lg, dropped) = (data.clone(), lg.clone(), dropped.clone());
                tokio::spawn(async move {
                    let _ = handle(s, &data, &lg, &dropped).await;
                });
            }
        });
        FileServer { port, log, task }
    }

    pub fn url(&self, kind: &str, file: &str) -> String {
        format!("http://127.0.0.1:{}/{kind}/{file}", self.port)
    }

    pub fn hits(&self, path_part: &str) -> Vec<Hit> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|h| h.path.contains(path_part))
            .cloned()
            .collect()
    }
}

async fn read_head(s: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await?;
        if n == 0 || buf.len() > 16384 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&b[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn handle(
    mut s: TcpStream,
    data: &[u8],
    log: &Mutex<Vec<Hit>>,
    dropped: &Mutex<bool>,
) -> std::io::Result<()> {
    let head = read_head(&mut s).await?;
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let range = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("range:"))
        .map(|l| l[6..].trim().to_string());
    log.lock().expect("log").push(Hit {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
    });
    if path.starts_with("/api/") || path.contains("/resolve/") {
        return hub(s, &method, &path, data).await;
    }
    let kind = path.split('/').nth(1).unwrap_or_default().to_string();
    let mut body = data.to_vec();
    if kind == "corrupt" {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let total = if kind == "huge" {
        1u64 << 30
    } else {
        body.len() as u64
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0)
        .min(body.len());
    let (status, extra) = if range.is_some() {
        (
            "206 Partial Content",
            format!("Content-Range: bytes {start}-{}/{total}\r\n", total - 1),
        )
    } else {
        ("200 OK", String::new())
    };
    let len = total - start as u64;
    let hdr = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n"
    );
    s.write_all(hdr.as_bytes()).await?;
    if method == "HEAD" || kind == "huge" {
        return Ok(());
    }
    let body = &body[start..];
    match kind.as_str() {
        "drop"
            if range.is_none() && !std::mem::replace(&mut *dropped.lock().expect("flag"), true) =>
        {
            s.write_all(&body[..body.len() / 2]).await?;
            s.flush().await?;
            // Dropped mid-body: the client sees a short read.
            return Ok(());
        }
        "slow" => {
            for c in body.chunks(16 * 1024) {
                s.write_all(c).await?;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
        _ => s.write_all(body).await?,
    }
    s.shutdown().await
}

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const CONFIG: &str = "{\"architectures\":[\"LlamaForCausalLM\"]}";

async fn hub(mut s: TcpStream, method: &str, path: &str, data: &[u8]) -> std::io::Result<()> {
    let sum: String = <sha2::Sha256 as sha2::Digest>::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (status, headers, body) = match path {
        "/api/models/org/tiny/revision/main" => (
            "200 OK",
            String::new(),
            format!(
                "{{\"id\":\"org/tiny\",\"sha\":\"{COMMIT}\",\"siblings\":[{{\"rfilename\":\"tiny.gguf\"}},{{\"rfilename\":\"config.json\"}},{{\"rfilename\":\"README.md\"}}]}}"
            ),
        ),
        "/api/models/org/resume/revision/main" => (
            "200 OK",
            String::new(),
            format!(
                "{{\"id\":\"org/resume\",\"sha\":\"{COMMIT}\",\"siblings\":[{{\"rfilename\":\"tiny.gguf\"}}]}}"
            ),
        ),
        "/api/models/org/evil/revision/main" => (
            "200 OK",
            String::new(),
            format!("{{\"sha\":\"{COMMIT}\",\"siblings\":[{{\"rfilename\":\"../../etc/x\"}}]}}"),
        ),
        p if p == format!("/org/tiny/resolve/{COMMIT}/tiny.gguf")
            || p == format!("/org/resume/resolve/{COMMIT}/tiny.gguf") =>
        {
            let to = if p.starts_with("/org/resume/") {
                "/drop/tiny.gguf"
            } else {
                "/cdn/tiny.gguf"
            };
            (
                "302 Found",
                format!(
                    "Location: {to}\r\nX-Repo-Commit: {COMMIT}\r\nX-Linked-Etag: \"{sum}\"\r\nX-Linked-Size: {}\r\nETag: W/\"1234\"\r\n",
                    data.len()
                ),
                String::new(),
            )
        }
        p if p == format!("/org/tiny/resolve/{COMMIT}/config.json") => (
            "200 OK",
            format!("X-Repo-Commit: {COMMIT}\r\nETag: \"9f2b0c1d\"\r\n"),
            CONFIG.to_string(),
        ),
        _ => ("404 Not Found", String::new(), String::new()),
    };
    let hdr = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(hdr.as_bytes()).await?;
    if method != "HEAD" {
        s.write_all(body.as_bytes()).await?;
    }
    s.shutdown().await
}
