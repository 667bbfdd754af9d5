//! Window (and session) names: 1–128 characters, ASCII letters, digits, `_` and `-`, after NFKC
//! normalisation (EC-012, EC-013).

use unicode_normalization::UnicodeNormalization;

/// Longest accepted name, in characters (after normalisation).
pub const MAX_NAME_LEN: usize = 128;

/// Normalises `raw` with NFKC and checks it; returns the normalised name or a message a person
/// can act on.
pub fn validate_name(raw: &str) -> Result<String, String> {
    let n: String = raw.nfkc().collect();
    if n.is_empty() {
        return Err("name must not be empty (1 to 128 characters)".into());
    }
    let chars = n.chars().count();
    if chars > MAX_NAME_LEN {
        return Err(format!(
            "name is {chars} characters long; the maximum is {MAX_NAME_LEN}"
        ));
    }
    if let Some(bad) = n
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "name contains {bad:?} (U+{:04X}); only ASCII letters, digits, '_' and '-' are allowed",
            bad as u32
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_012_a_exactly_128_accepted() {
        let n = "a".repeat(128);
        assert_eq!(validate_name(&n), Ok(n));
    }

    #[test]
    fn ec_012_b_129_refused() {
        assert!(validate_name(&"a".repeat(129))
            .unwrap_err()
            .contains("maximum is 128"));
        assert!(validate_name("").is_err());
    }

    #[test]
    fn ec_013_unicode() {
        // a: emoji
        assert!(validate_name("chat-\u{1F600}").is_err());
        // b: homograph (Cyrillic a)
        assert!(validate_name("p\u{0430}ypal").is_err());
        // c: right-to-left text and override characters
        assert!(validate_name("\u{05E9}\u{05DC}\u{05D5}\u{05DD}").is_err());
        assert!(validate_name("abc\u{202E}def").is_err());
        // Full-width ASCII normalises (NFKC) to plain ASCII and is accepted.
        assert_eq!(validate_name("ＡＢＣ-1"), Ok("ABC-1".to_string()));
    }
}
