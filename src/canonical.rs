//! Canonical form of a call's arguments, so that an intent can be bound to
//! exactly the arguments it was priced for, whatever key order or spacing a
//! client sends.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// JSON with object keys sorted at every depth and no insignificant spaces.
///
/// ```
/// let args = serde_json::json!({"b": 1, "a": [true, {"d": null, "c": "x"}]});
/// assert_eq!(tollgate::canonical::canonical_json(&args), r#"{"a":[true,{"c":"x","d":null}],"b":1}"#);
/// ```
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, Numbers::AsRead, &mut out);
    out
}

/// How numbers are written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numbers {
    /// As read: the canonical JSON is the arguments a paid call runs with.
    AsRead,
    /// A whole number written as a float (`1.0`, `-0.0`) as the integer,
    /// for the hash: a client (or a model) that writes `1` one time and
    /// `1.0` the next is making the same call. Only within 2^53, where
    /// every whole float is exact.
    WholeAsIntegers,
}

fn write_canonical(value: &Value, numbers: Numbers, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], numbers, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, numbers, out);
            }
            out.push(']');
        }
        Value::Number(n) if numbers == Numbers::WholeAsIntegers => {
            match n.as_f64().filter(|_| n.is_f64()) {
                Some(x) if x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0 => {
                    out.push_str(&(x as i64).to_string());
                }
                _ => out.push_str(&n.to_string()),
            }
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Hex SHA-256 of the canonical JSON, with whole numbers written as
/// integers (so `{"n": 1.0}` and `{"n": 1}` are bound to the same payment).
pub fn args_hash(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, Numbers::WholeAsIntegers, &mut out);
    hex::encode(Sha256::digest(out.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Without serde_json's `preserve_order` (not enabled in this build) a
    /// parsed object's keys are already sorted, so key order and spacing are
    /// gone before `write_canonical` sees them: what is checked here is the
    /// written form (sorted at every depth, no spaces) and that texts
    /// differing only in order and spacing hash alike. Were `preserve_order`
    /// ever turned on (by another crate, say), the sort in `write_canonical`
    /// is what would keep this passing.
    #[test]
    fn texts_differing_in_key_order_and_spacing_hash_alike() {
        let a: Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 1}], "x": "s"}}"#)
                .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[1,{"p":1,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":"s","y":[1,{"p":1,"q":2}]},"b":1}"#
        );
        assert_eq!(args_hash(&a), args_hash(&b));
    }

    #[test]
    fn a_whole_number_is_the_same_argument_written_as_a_float() {
        assert_eq!(args_hash(&json!({"a": 1.0})), args_hash(&json!({"a": 1})));
        assert_eq!(args_hash(&json!({"a": -0.0})), args_hash(&json!({"a": 0})));
        assert_eq!(args_hash(&json!([-3.0])), args_hash(&json!([-3])));
        assert_ne!(args_hash(&json!({"a": 1.5})), args_hash(&json!({"a": 1})));
        // The arguments a paid call runs with are still as the client sent them.
        assert_eq!(canonical_json(&json!({"a": 1.0})), r#"{"a":1.0}"#);
    }

    #[test]
    fn different_values_differ() {
        assert_ne!(args_hash(&json!({"a": 1})), args_hash(&json!({"a": 2})));
        assert_ne!(args_hash(&json!({"a": "1"})), args_hash(&json!({"a": 1})));
        assert_ne!(args_hash(&json!([1, 2])), args_hash(&json!([2, 1])));
    }

    /// Found by fuzzing (fuzz/regressions/canonical_args): without exact
    /// float parsing, `59e286` read as one ulp off, and its canonical form
    /// read back as yet another number, so a stored intent's arguments were
    /// not quite the ones the client sent.
    #[test]
    fn numbers_read_back_as_themselves() {
        for text in ["59e286", "0.1", "1e-7", "123456789.123456789", "-0.0"] {
            let value: Value = serde_json::from_str(text).unwrap();
            let canonical = canonical_json(&value);
            let again: Value = serde_json::from_str(&canonical).unwrap();
            assert_eq!(again, value, "{text}");
            assert_eq!(canonical_json(&again), canonical, "{text}");
        }
    }
}
