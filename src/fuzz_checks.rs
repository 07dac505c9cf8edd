//! The properties the fuzz targets (`fuzz/`, run by `scripts/fuzz`) check,
//! here so that every input kept under `fuzz/seeds/` and `fuzz/regressions/`
//! is checked again by a plain `cargo test`. Each panics when its property
//! fails.

use serde_json::Value;

use crate::{
    canonical::{args_hash, canonical_json},
    config::Config,
    receipt::{ReceiptClaims, ReceiptSigner},
};

/// `pricing.toml` parsing: any text either loads or is refused with a
/// message; it never panics.
pub fn pricing(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, "pricing.toml") {
        assert!(!e.to_string().is_empty(), "an error without a message");
    }
}

/// Canonical argument hashing: for any JSON a client could send, the
/// canonical form is valid JSON and a fixed point, and spacing never
/// changes the hash.
pub fn canonical_args(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let canonical = canonical_json(&value);
    let reparsed: Value = match serde_json::from_str(&canonical) {
        Ok(v) => v,
        Err(e) => panic!("canonical JSON does not parse ({e}): {canonical}"),
    };
    assert_eq!(canonical_json(&reparsed), canonical, "not a fixed point");
    assert_eq!(args_hash(&reparsed), args_hash(&value));
    let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
    if let Ok(respaced) = serde_json::from_str::<Value>(&pretty) {
        assert_eq!(
            args_hash(&respaced),
            args_hash(&value),
            "spacing changed the hash"
        );
    }
}

/// Receipt verification: nothing verifies unless it was signed with the
/// key, a signed receipt verifies to its claims, and one changed character
/// anywhere makes it fail.
pub fn receipt(data: &[u8]) {
    let signer = ReceiptSigner::from_key([7; 32]);
    let text = String::from_utf8_lossy(data);
    assert!(
        signer.verify(&text).is_err(),
        "an input nobody signed verified: {text:?}"
    );
    let mut fields = text.split('\u{0}').map(str::to_owned);
    let mut next = || fields.next().unwrap_or_default();
    let claims = ReceiptClaims {
        payment_id: next(),
        tool: next(),
        args_hash: next(),
        amount: next(),
        currency: next(),
        payer: Some(next()).filter(|p| !p.is_empty()),
        ledger_txn: next(),
        paid_at: next(),
        agent: Some(next()).filter(|a| !a.is_empty()),
        metadata: None,
    };
    let receipt = signer.sign(&claims);
    match signer.verify(&receipt) {
        Ok(verified) => assert_eq!(verified, claims),
        Err(e) => panic!("a receipt we signed does not verify: {e}"),
    }
    let at = data.first().map_or(0, |b| *b as usize) % receipt.len();
    let mut altered: Vec<char> = receipt.chars().collect();
    altered[at] = if altered[at] == 'A' { 'B' } else { 'A' };
    let altered: String = altered.into_iter().collect();
    assert!(
        signer.verify(&altered).is_err(),
        "altered at {at}: {altered}"
    );
}

/// The inputs kept for a target: its seeds and the crashes fuzzing found.
#[cfg(test)]
fn kept_inputs(target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in dir.flatten() {
            if let Ok(data) = std::fs::read(entry.path()) {
                inputs.push((entry.path(), data));
            }
        }
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kept_fuzz_input_still_passes() {
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 3] = [
            ("pricing", pricing),
            ("canonical_args", canonical_args),
            ("receipt", receipt),
        ];
        for (target, check) in targets {
            let inputs = kept_inputs(target);
            assert!(!inputs.is_empty(), "no seeds for {target}");
            for (path, data) in inputs {
                eprintln!("{target}: {}", path.display());
                check(&data);
            }
        }
    }
}
