//! Content hashes (SHA-256, lowercase hex) of files and byte strings.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a byte string, hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 over several files, each prefixed by its length so that boundaries count, hex.
pub fn sha256_files(paths: &[impl AsRef<Path>]) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in paths {
        let path = path.as_ref();
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        hasher.update(len.to_le_bytes());
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex(&hasher.finalize()))
}

/// Whether a secret sent (a token, an API key) matches the one required, in time that does not
/// depend on where they differ (both are hashed first, so neither does it depend on their
/// lengths).
pub fn secrets_match(sent: &str, want: &str) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(sent.as_bytes()), sha2::Sha256::digest(want.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod secret_tests {
    #[test]
    fn secrets_match_only_when_equal() {
        assert!(super::secrets_match("s3cret", "s3cret"));
        for wrong in ["", "s3cre", "s3cret!", "S3cret", "x3cret"] {
            assert!(!super::secrets_match(wrong, "s3cret"), "{wrong}");
        }
    }
}
