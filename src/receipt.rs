//! Signed receipts: HMAC-SHA256 over what was paid, for which call, by whom.
//! A receipt is `base64url(payload JSON) "." base64url(signature)`, so it can
//! be pasted into `tollgate receipt verify` as one token.

use std::path::{Path, PathBuf};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("receipt key file {0} is not 64 hex characters")]
    BadKey(PathBuf),
    #[error(
        "no receipt key at {0}: a receipt is checked with the key that signed it (set \
         TOLLGATE_RECEIPT_KEY or [receipts] key_file to the server's)"
    )]
    NoKey(PathBuf),
    #[error(
        "no place for the receipt key: neither XDG_DATA_HOME nor HOME is set (set \
         [receipts] key_file or TOLLGATE_RECEIPT_KEY)"
    )]
    NoKeyPlace,
    #[error("malformed receipt: {0}")]
    Malformed(&'static str),
    #[error("receipt signature does not match: it was altered or signed with another key")]
    BadSignature,
}

/// The call binding a receipt attests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptClaims {
    pub payment_id: String,
    pub tool: String,
    pub args_hash: String,
    pub amount: String,
    pub currency: String,
    pub payer: Option<String>,
    pub ledger_txn: String,
    /// RFC 3339 time of capture.
    pub paid_at: String,
    /// The agent that made the call, and the caller's metadata (absent
    /// from receipts that had none, and from older receipts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Clone)]
pub struct ReceiptSigner {
    key: [u8; 32],
}

impl ReceiptSigner {
    pub fn from_key(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Loads an existing key; checking a receipt with a key made up for the
    /// occasion could only ever say "does not match".
    pub fn load(path: &Path) -> Result<Self, ReceiptError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                warn_if_others_can_read(path);
                Self::from_hex(&text, path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ReceiptError::NoKey(path.to_owned()))
            }
            Err(source) => Err(ReceiptError::KeyFile {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Loads the key, creating it (mode 0600) on first run.
    pub fn load_or_create(path: &Path) -> Result<Self, ReceiptError> {
        let io = |source| ReceiptError::KeyFile {
            path: path.to_owned(),
            source,
        };
        match Self::load(path) {
            Err(ReceiptError::NoKey(_)) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut key = [0u8; 32];
                key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                write_private(path, &hex::encode(key)).map_err(io)?;
                // Another process may have raced us: whoever wrote first wins,
                // so read back what is on disk.
                Self::from_hex(&std::fs::read_to_string(path).map_err(io)?, path)
            }
            loaded => loaded,
        }
    }

    fn from_hex(text: &str, path: &Path) -> Result<Self, ReceiptError> {
        let bytes = hex::decode(text.trim()).map_err(|_| ReceiptError::BadKey(path.to_owned()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ReceiptError::BadKey(path.to_owned()))?;
        Ok(Self { key })
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!())
    }

    /// An HMAC tag of `data` for some other `purpose` (for example the
    /// checkout page's CSRF token), so one secret serves both without one
    /// kind of tag passing for the other.
    pub fn tag(&self, purpose: &str, data: &str) -> String {
        let mut mac = self.mac();
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `tag` is [`ReceiptSigner::tag`] of `data`, in constant time.
    pub fn check_tag(&self, purpose: &str, data: &str, tag: &str) -> bool {
        let Ok(tag) = hex::decode(tag) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data.as_bytes());
        mac.verify_slice(&tag).is_ok()
    }

    pub fn sign(&self, claims: &ReceiptClaims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(&payload);
        let sig = mac.finalize().into_bytes();
        format!("{}.{}", B64.encode(&payload), B64.encode(sig))
    }

    pub fn verify(&self, receipt: &str) -> Result<ReceiptClaims, ReceiptError> {
        let (payload_b64, sig_b64) = receipt
            .trim()
            .split_once('.')
            .ok_or(ReceiptError::Malformed("expected PAYLOAD.SIGNATURE"))?;
        let payload = B64
            .decode(payload_b64)
            .map_err(|_| ReceiptError::Malformed("payload is not base64url"))?;
        let sig = B64
            .decode(sig_b64)
            .map_err(|_| ReceiptError::Malformed("signature is not base64url"))?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&sig)
            .map_err(|_| ReceiptError::BadSignature)?;
        serde_json::from_slice(&payload)
            .map_err(|_| ReceiptError::Malformed("payload is not a receipt"))
    }
}

/// The key signs receipts and checkout forms: a copy others can read lets
/// them forge both. Said, not refused: a key shared between instances may
/// be kept on purpose with other permissions.
fn warn_if_others_can_read(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the receipt key file can be read by others than its owner (chmod 600 it)"
            );
        }
    }
}

/// Where the key lives unless configured: outside any repository, in the
/// user's data directory. With neither `XDG_DATA_HOME` nor `HOME` (a bare
/// service unit) there is none: not a shared directory such as `/tmp`,
/// where another user could plant a key, nor the working directory, which
/// would give another key wherever the server is started.
pub fn default_key_path() -> Result<PathBuf, ReceiptError> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .ok_or(ReceiptError::NoKeyPlace)?;
    Ok(base.join("tollgate").join("receipt.key"))
}

/// Creates `path` with `contents`, readable by the owner only, unless it
/// already exists. The key is written to a private temporary file and then
/// hard-linked into place, so a concurrent reader never sees a half-written
/// key and a concurrent writer never clobbers one.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(contents.as_bytes())?;
        f.sync_all()
    });
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    let _ = std::fs::remove_file(&tmp);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> ReceiptClaims {
        ReceiptClaims {
            payment_id: "pay_1".into(),
            tool: "echo".into(),
            args_hash: "ab".into(),
            amount: "0.01".into(),
            currency: "USD".into(),
            payer: Some("alice".into()),
            ledger_txn: "txn_1".into(),
            paid_at: "2026-01-01T00:00:00Z".into(),
            agent: None,
            metadata: None,
        }
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let s = ReceiptSigner::from_key([7; 32]);
        let r = s.sign(&claims());
        assert_eq!(s.verify(&r).unwrap(), claims());
    }

    #[test]
    fn tampering_and_other_keys_fail() {
        let s = ReceiptSigner::from_key([7; 32]);
        let r = s.sign(&claims());
        let mut other = claims();
        other.amount = "0.00".into();
        let forged = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&other).unwrap()),
            r.split_once('.').unwrap().1
        );
        assert!(matches!(s.verify(&forged), Err(ReceiptError::BadSignature)));
        assert!(matches!(
            ReceiptSigner::from_key([8; 32]).verify(&r),
            Err(ReceiptError::BadSignature)
        ));
        assert!(matches!(
            s.verify("nonsense"),
            Err(ReceiptError::Malformed(_))
        ));
    }

    #[test]
    fn concurrent_first_runs_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receipt.key");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ReceiptSigner::load_or_create(&path).unwrap().key))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temporary files are cleaned up");
    }

    #[test]
    fn tags_are_bound_to_purpose_and_data() {
        let s = ReceiptSigner::from_key([7; 32]);
        let t = s.tag("csrf", "pay_1");
        assert!(s.check_tag("csrf", "pay_1", &t));
        assert!(!s.check_tag("csrf", "pay_2", &t));
        assert!(!s.check_tag("other", "pay_1", &t));
        assert!(!s.check_tag("csrf", "pay_1", "zz"));
    }

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/receipt.key");
        let a = ReceiptSigner::load_or_create(&path).unwrap();
        let b = ReceiptSigner::load_or_create(&path).unwrap();
        assert_eq!(a.key, b.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
