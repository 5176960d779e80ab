//! Prints the greedy margins of candidate prompts on the real model (`cargo test -p
//! equicrypt-test-support --test margins -- --ignored --nocapture`), to pick prompts for tests
//! that check a particular answer.

use equicrypt_client::ChatMessage;
use equicrypt_test_support::{chat_margin, completion_margin, smollm2};

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn print_candidate_margins() {
    let Some(model) = smollm2("print_candidate_margins") else {
        return;
    };
    let chats: &[(Option<&str>, &str)] = &[
        (
            None,
            "What is the capital of France? Answer in one sentence.",
        ),
        (
            Some("You are a helpful assistant."),
            "What is the capital of France? Answer in one sentence.",
        ),
        (None, "Count from 1 to 5."),
        (None, "Count from 1 to 10, separated by commas."),
        (None, "Continue the sequence: 1, 2, 3, 4, 5,"),
        (None, "Repeat exactly: hello world"),
        (None, "Write the alphabet from A to J."),
        (None, "Hello!"),
        (None, "List the numbers from one to five."),
    ];
    for (sys, user) in chats {
        let mut msgs = Vec::new();
        if let Some(s) = sys {
            msgs.push(ChatMessage::new("system", *s));
        }
        msgs.push(ChatMessage::new("user", *user));
        let m = chat_margin(&model, &msgs, 48);
        println!(
            "CHAT sys={sys:?} user={user:?}: min {:.3} at {:?}, {} tokens, stopped {}: {:?}",
            m.min(),
            m.argmin(),
            m.tokens.len(),
            m.stopped,
            m.text
        );
    }
    for p in [
        "The capital of France is",
        "1, 2, 3, 4, 5,",
        "Monday, Tuesday, Wednesday,",
        "January, February, March,",
        "A, B, C, D, E,",
    ] {
        let m = completion_margin(&model, p, 8);
        println!(
            "COMPLETION {p:?}: min {:.3} at {:?}: {:?} gaps {:?}",
            m.min(),
            m.argmin(),
            m.text,
            m.gaps
        );
    }
}
