//! The wire's error codes exist once, in `cwm::error::ErrorCode`: docs/PROTOCOL.md and the
//! Python client's exception table must list exactly the same codes, in the same order.

use cwm::error::ErrorCode;

fn root(p: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Upper-case identifiers between backticks in `text`.
fn backticked_codes(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.len() > 3 && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

fn all() -> Vec<String> {
    ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect()
}

#[test]
fn protocol_document_lists_every_code_in_order() {
    let doc = root("docs/PROTOCOL.md");
    let from = doc.find("## Error codes").expect("an Error codes section");
    let section = &doc[from..];
    let to = section
        .find("Clients add one code")
        .expect("the client-only code paragraph");
    assert_eq!(backticked_codes(&section[..to]), all());
}

#[test]
fn python_client_has_one_exception_per_code() {
    let py = root("python/cwm_vllm/client.py");
    let from = py.find("ERRORS: dict").expect("the ERRORS table");
    let rest = &py[from..];
    let open = rest.find("for c in (").expect("its code tuple") + "for c in (".len();
    let close = open + rest[open..].find(')').expect("end of the tuple");
    let codes: Vec<String> = rest[open..close]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(codes, all());
}
