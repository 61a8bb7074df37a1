//! The shared vectors (tests/vectors/relay.json), checked on the Rust side; pytest checks the
//! same file against the Python engine (tests/unit/test_vectors.py).

use serde_json::Value;

use crate::http::{parse_request, parse_response, refusal, Request};
use crate::state::parse_session;

const VECTORS: &str = include_str!("../../tests/vectors/relay.json");

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("relay.json is JSON")
}

#[test]
fn session_ids() {
    let v = vectors();
    let key = v["key"].as_str().unwrap().as_bytes();
    for case in v["sessions"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let parsed = parse_session(key, id.as_bytes());
        if case["valid"].as_bool().unwrap() {
            let (index, instance) = parsed.unwrap_or_else(|| panic!("valid id refused: {id}"));
            assert_eq!(u64::from(index), case["index"].as_u64().unwrap(), "{id}");
            assert_eq!(instance, case["instance"].as_str().unwrap(), "{id}");
        } else {
            assert!(parsed.is_none(), "{} accepted: {id:?}", case["why"]);
        }
    }
}

#[test]
fn replica_answers_are_reported_not_judged() {
    for case in vectors()["answers"].as_array().unwrap() {
        let raw = case["response"].as_str().unwrap().as_bytes();
        let head = parse_response(raw).unwrap().expect("a complete head");
        assert_eq!(refusal(&head).as_deref(), case["report"].as_str(), "{case}");
    }
}

#[test]
fn requests_the_relay_takes_or_hands_over() {
    for case in vectors()["requests"].as_array().unwrap() {
        let raw = case["request"].as_str().unwrap().as_bytes();
        let got = match parse_request(raw, 1 << 20) {
            Request::Head(_) => "relay",
            Request::HandOver => "handover",
            Request::Partial => "partial",
        };
        assert_eq!(got, case["relay"].as_str().unwrap(), "{case}");
    }
}
