//! The GGUF header: architecture, quantization (file_type), parameter count and context
//! length, read with bounds on every length so a hostile file cannot make us allocate much.
//! [`read`] runs in the unprivileged fetcher (the file is remote data); modvisord only takes
//! what it reports through [`checked`].

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GgufInfo {
    pub version: u32,
    pub architecture: String,
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`), as a name when known.
    pub file_type: String,
    /// `general.parameter_count`, else the sum of the tensor sizes.
    pub parameters: u64,
    pub context_length: u64,
}

const MAX_STRING: u64 = 1 << 20;
const MAX_COUNT: u64 = 1 << 20;

fn bad(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

struct R<T: Read>(T);

impl<T: Read> R<T> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn count(&mut self) -> io::Result<u64> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(bad("a GGUF count is implausibly large"));
        }
        Ok(n)
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(bad("a GGUF string is longer than 1 MiB"));
        }
        let mut v = vec![0u8; n as usize];
        self.0.read_exact(&mut v)?;
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let got = io::copy(&mut (&mut self.0).take(n), &mut io::sink())?;
        if got != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// A scalar value (an integer, when it is one), or nothing for strings/arrays/floats.
enum Val {
    Int(u64),
    Str(String),
    Other,
}

fn value<T: Read>(r: &mut R<T>, ty: u32, depth: u8) -> io::Result<Val> {
    let fixed = |ty| match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    Ok(match ty {
        0 | 7 => Val::Int(r.bytes::<1>()?[0] as u64),
        2 => Val::Int(u16::from_le_bytes(r.bytes()?) as u64),
        4 => Val::Int(r.u32()? as u64),
        10 => Val::Int(r.u64()?),
        8 => Val::Str(r.string()?),
        9 if depth < 4 => {
            let ety = r.u32()?;
            let n = r.count()?;
            match fixed(ety) {
                Some(sz) => r.skip(n * sz)?,
                None => {
                    for _ in 0..n {
                        value(r, ety, depth + 1)?;
                    }
                }
            }
            Val::Other
        }
        t => match fixed(t) {
            Some(sz) => {
                r.skip(sz)?;
                Val::Other
            }
            None => return Err(bad("unknown GGUF value type")),
        },
    })
}

/// llama.cpp's names of `general.file_type`.
fn file_type_name(t: u64) -> String {
    let n = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("type {t}"),
    };
    n.to_string()
}

/// Reads the header and, when the metadata has no parameter count, the tensor infos.
pub fn read(src: impl Read) -> io::Result<GgufInfo> {
    let mut r = R(io::BufReader::new(src));
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(bad("not a GGUF file (no GGUF magic bytes)"));
    }
    let mut info = GgufInfo {
        version: r.u32()?,
        ..Default::default()
    };
    if !(2..=3).contains(&info.version) {
        return Err(bad("unsupported GGUF version"));
    }
    let tensors = r.count()?;
    let kvs = r.count()?;
    let mut ctx = Vec::new();
    for _ in 0..kvs {
        let key = r.string()?;
        let ty = r.u32()?;
        match (key.as_str(), value(&mut r, ty, 0)?) {
            ("general.architecture", Val::Str(s)) => info.architecture = s,
            ("general.file_type", Val::Int(n)) => info.file_type = file_type_name(n),
            ("general.parameter_count", Val::Int(n)) => info.parameters = n,
            (k, Val::Int(n)) if k.ends_with(".context_length") => ctx.push((k.to_string(), n)),
            _ => {}
        }
    }
    let want = format!("{}.context_length", info.architecture);
    info.context_length = ctx.iter().find(|(k, _)| *k == want).map_or(0, |(_, n)| *n);
    if info.parameters == 0 {
        info.parameters = tensor_parameters(&mut r, tensors).unwrap_or(0);
    }
    Ok(info)
}

/// Bounds a header the fetcher reported: a GGUF version we read, short names of
/// `[A-Za-z0-9._-]` (and spaces in the file type, "type 33"), plausible numbers.
pub fn checked(i: GgufInfo) -> Result<GgufInfo, String> {
    let name = |s: &str, max: usize, space: bool| {
        s.len() <= max
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') || (space && b == b' ')
            })
    };
    if !(2..=3).contains(&i.version) {
        return Err(format!("version {}", i.version));
    }
    if !name(&i.architecture, 64, false) {
        return Err("an odd architecture name".into());
    }
    if !name(&i.file_type, 32, true) {
        return Err("an odd file type".into());
    }
    // 10^15 parameters, 2^32 tokens of context: far above any model there is.
    if i.parameters > 1_000_000_000_000_000 || i.context_length > 1 << 32 {
        return Err("implausible numbers".into());
    }
    Ok(i)
}

fn tensor_parameters<T: Read>(r: &mut R<T>, tensors: u64) -> io::Result<u64> {
    let mut total: u64 = 0;
    for _ in 0..tensors {
        r.string()?;
        let dims = r.u32()?;
        if dims > 8 {
            return Err(bad("a GGUF tensor has more than 8 dimensions"));
        }
        let mut n: u64 = 1;
        for _ in 0..dims {
            n = n.saturating_mul(r.u64()?);
        }
        r.u32()?;
        r.u64()?;
        total = total.saturating_add(n);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_str(out: &mut Vec<u8>, k: &str, v: &str) {
        out.extend((k.len() as u64).to_le_bytes());
        out.extend(k.as_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }

    fn kv_u32(out: &mut Vec<u8>, k: &str, v: u32) {
        out.extend((k.len() as u64).to_le_bytes());
        out.extend(k.as_bytes());
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }

    #[test]
    fn header() {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        kv_str(&mut f, "general.architecture", "llama");
        kv_u32(&mut f, "general.file_type", 15);
        kv_u32(&mut f, "llama.context_length", 2048);
        f.extend(1u64.to_le_bytes());
        f.extend(b"w");
        f.extend(2u32.to_le_bytes());
        f.extend(4u64.to_le_bytes());
        f.extend(8u64.to_le_bytes());
        f.extend(0u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        let i = read(&f[..]).expect("gguf");
        assert_eq!(i.architecture, "llama");
        assert_eq!(i.file_type, "Q4_K_M");
        assert_eq!(i.context_length, 2048);
        assert_eq!(i.parameters, 32);
        let mut huge = b"GGUF".to_vec();
        huge.extend(3u32.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        assert!(read(&huge[..]).is_err(), "bounded counts");
        assert!(read(&b"NOPE"[..]).is_err());
        assert_eq!(checked(i.clone()), Ok(i.clone()));
        for bad in [
            GgufInfo {
                architecture: "llama\u{1b}[2J".into(),
                ..i.clone()
            },
            GgufInfo {
                file_type: "x".repeat(33),
                ..i.clone()
            },
            GgufInfo {
                context_length: u64::MAX,
                ..i.clone()
            },
            GgufInfo {
                version: 7,
                ..i.clone()
            },
        ] {
            assert!(checked(bad).is_err());
        }
    }
}
