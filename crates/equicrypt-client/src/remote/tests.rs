//! Unit tests of the stream state machine and the llama-server and vLLM mappings (no network).

use super::*;
use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn chunks_stream(chunks: Vec<Vec<u8>>) -> BoxStream<'static, Result<Vec<u8>>> {
    stream::iter(chunks.into_iter().map(Ok)).boxed()
}

/// Reads a whole stream: the events, then the error if one ended it.
fn drain(
    chunks: Vec<Vec<u8>>,
    backend: Backend,
    stops: &[u32],
) -> (Vec<StreamEvent>, Option<ClientError>) {
    rt().block_on(async {
        let mut ts = TokenStream::from_chunks(chunks_stream(chunks), backend, stops);
        let mut evs = Vec::new();
        loop {
            match ts.next().await {
                Ok(Some(e)) => evs.push(e),
                Ok(None) => return (evs, None),
                Err(e) => {
                    // After an error the stream is over.
                    assert!(matches!(ts.next().await, Ok(None)));
                    return (evs, Some(e));
                }
            }
        }
    })
}

fn protocol_event(tokens: &[u32], stop: bool, n: usize) -> String {
    let r = CompletionResponse {
        content: String::new(),
        tokens: tokens.to_vec(),
        stop,
        stop_type: if stop {
            StopType::Limit
        } else {
            StopType::None
        },
        tokens_predicted: n,
        tokens_evaluated: 5,
        completion_probabilities: vec![],
        timings: stop.then(|| Timings {
            prompt_n: 5,
            predicted_n: n,
            ..Timings::default()
        }),
    };
    format!("data: {}\n\n", serde_json::to_string(&r).unwrap())
}

/// Tokens concatenated and the final event.
fn flatten(evs: &[StreamEvent]) -> (Vec<u32>, Option<StreamEvent>) {
    let mut ids = Vec::new();
    let mut done = None;
    for e in evs {
        match e {
            StreamEvent::Tokens(t) => {
                assert!(!t.is_empty(), "empty Tokens event");
                assert!(done.is_none(), "Tokens after Done");
                ids.extend_from_slice(t);
            }
            d @ StreamEvent::Done { .. } => {
                assert!(done.is_none(), "two Done events");
                done = Some(d.clone());
            }
        }
    }
    (ids, done)
}

#[test]
fn protocol_stream_delivers_tokens_then_done() {
    let s = [
        ": ping\n\n".to_string(),
        protocol_event(&[7], false, 1),
        protocol_event(&[8, 9], false, 3),
        protocol_event(&[], true, 3),
    ]
    .concat();
    let (evs, err) = drain(vec![s.into_bytes()], Backend::Equicrypt, &[1000]);
    assert!(err.is_none(), "{err:?}");
    let (ids, done) = flatten(&evs);
    assert_eq!(ids, vec![7, 8, 9]);
    match done.expect("done") {
        StreamEvent::Done {
            stop_type,
            timings,
            tokens_predicted,
        } => {
            assert_eq!(stop_type, StopType::Limit);
            assert_eq!(tokens_predicted, 3);
            assert_eq!(timings.unwrap().predicted_n, 3);
        }
        _ => unreachable!(),
    }
}

#[test]
fn client_stops_itself_at_a_stop_id_and_ignores_the_rest() {
    // llama-server does not know stop ids: it keeps going after 42.
    let s = [
        "data: {\"content\":\"<ct7>\",\"tokens\":[7],\"stop\":false}\n\n",
        "data: {\"content\":\"<ct42>\",\"tokens\":[8,42,9],\"stop\":false}\n\n",
        "data: {\"content\":\"\",\"tokens\":[10],\"stop\":false}\n\n",
        "data: this is not even json\n\n",
    ]
    .concat();
    let (evs, err) = drain(vec![s.into_bytes()], Backend::LlamaCpp, &[42, 3]);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        evs,
        vec![
            StreamEvent::Tokens(vec![7]),
            StreamEvent::Tokens(vec![8]),
            StreamEvent::Done {
                stop_type: StopType::Eos,
                timings: None,
                tokens_predicted: 2
            }
        ]
    );
}

#[test]
fn llamacpp_eos_is_drained_to_the_final_event() {
    // llama-server streams its EOS (42), then its final event with the timings.
    let s = [
        "data: {\"tokens\":[7],\"stop\":false}\n\n",
        "data: {\"tokens\":[42],\"stop\":false}\n\n",
        "data: {\"tokens\":[],\"stop\":true,\"stop_type\":\"eos\",\"tokens_predicted\":2,",
        "\"timings\":{\"predicted_n\":2,\"predicted_per_second\":50.0}}\n\n",
    ]
    .concat();
    let evs = rt().block_on(async {
        let body = chunks_stream(vec![s.into_bytes()]);
        let mut ts = TokenStream::from_chunks(body, Backend::LlamaCpp, &[42, 3]);
        ts.server_eos = Some(42);
        let mut evs = Vec::new();
        while let Some(e) = ts.next().await.unwrap() {
            evs.push(e);
        }
        evs
    });
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0], StreamEvent::Tokens(vec![7]));
    match &evs[1] {
        StreamEvent::Done {
            stop_type: StopType::Eos,
            timings: Some(t),
            tokens_predicted: 1,
        } => assert_eq!(t.predicted_n, 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn llamacpp_final_event_is_normalized() {
    let s = concat!(
        "data: {\"index\":0,\"content\":\"<ct5>\",\"tokens\":[5],\"stop\":false,\"id_slot\":0,",
        "\"tokens_predicted\":1,\"tokens_evaluated\":4}\n\n",
        "data: {\"index\":0,\"content\":\"\",\"tokens\":[],\"id_slot\":0,\"stop\":true,",
        "\"model\":\"m\",\"tokens_predicted\":2,\"tokens_evaluated\":4,\"stop_type\":\"eos\",",
        "\"stopping_word\":\"\",\"tokens_cached\":5,\"timings\":{\"cache_n\":0,\"prompt_n\":4,",
        "\"prompt_ms\":1.5,\"prompt_per_token_ms\":0.3,\"prompt_per_second\":null,",
        "\"predicted_n\":2,\"predicted_ms\":3.0,\"predicted_per_token_ms\":1.5,",
        "\"predicted_per_second\":666.6}}\n\n"
    );
    let (evs, err) = drain(vec![s.as_bytes().to_vec()], Backend::LlamaCpp, &[]);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(evs[0], StreamEvent::Tokens(vec![5]));
    match &evs[1] {
        StreamEvent::Done {
            stop_type,
            timings: Some(t),
            tokens_predicted,
        } => {
            assert_eq!(*stop_type, StopType::Eos);
            assert_eq!(*tokens_predicted, 2);
            assert_eq!((t.prompt_n, t.predicted_n), (4, 2));
            assert!((t.predicted_per_second - 666.6).abs() < 1e-9);
        }
        other => panic!("{other:?}"),
    }
    // The same stream is not valid protocol JSON for our server (strict parsing).
    let (_, err) = drain(vec![s.as_bytes().to_vec()], Backend::Equicrypt, &[]);
    assert!(
        matches!(err, Some(ClientError::MalformedResponse(_))),
        "{err:?}"
    );
}

/// A stream body and a predicate its error must satisfy.
type ErrorCase = (&'static str, fn(&ClientError) -> bool);

#[test]
fn stream_errors_are_errors_not_panics() {
    let cases: Vec<ErrorCase> = vec![
        // cut before the final event
        (
            "data: {\"tokens\":[1],\"stop\":false}\n\n",
            |e| matches!(e, ClientError::MalformedResponse(_)),
        ),
        // cut inside an event
        (
            "data: {\"tokens\":[1],\"st",
            |e| matches!(e, ClientError::MalformedResponse(m) if m.contains("unterminated")),
        ),
        ("data: {not json\n\n", |e| {
            matches!(e, ClientError::MalformedResponse(_))
        }),
        ("data: [DONE]\n\n", |e| matches!(e, ClientError::MalformedResponse(_))),
        // llama-server's in-stream error
        (
            "data: {\"error\":{\"code\":400,\"message\":\"the request exceeds the context\",\"type\":\"exceed_context_size_error\"}}\n\n",
            |e| matches!(e, ClientError::Server { status: 400, message } if message.contains("exceeds")),
        ),
        // an `event: error`
        (
            "event: error\ndata: {\"message\":\"boom\"}\n\n",
            |e| matches!(e, ClientError::Server { status: 500, message } if message == "boom"),
        ),
        // ids must be u32
        ("data: {\"tokens\":[-1],\"stop\":false}\n\n", |e| {
            matches!(e, ClientError::MalformedResponse(_))
        }),
    ];
    for (s, ok) in cases {
        let (_, err) = drain(vec![s.as_bytes().to_vec()], Backend::LlamaCpp, &[]);
        let err = err.unwrap_or_else(|| panic!("no error for {s:?}"));
        assert!(ok(&err), "{s:?} gave {err:?}");
    }
    // Transport errors surface as they are.
    let body = stream::iter(vec![
        Ok(b"data: {\"tokens\":[1],\"stop\":false}\n\n".to_vec()),
        Err(ClientError::Transport {
            url: "u".into(),
            reason: "reset".into(),
        }),
    ])
    .boxed();
    let (evs, err) = rt().block_on(async {
        let mut ts = TokenStream::from_chunks(body, Backend::LlamaCpp, &[]);
        let a = ts.next().await;
        let b = ts.next().await;
        (a, b)
    });
    assert_eq!(evs.unwrap(), Some(StreamEvent::Tokens(vec![1])));
    assert!(matches!(err, Err(ClientError::Transport { .. })));
}

fn arb_session() -> impl Strategy<Value = (Vec<Vec<u32>>, Vec<u32>)> {
    (
        proptest::collection::vec(proptest::collection::vec(0u32..60, 0..4), 0..12),
        proptest::collection::vec(0u32..60, 0..3),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the chunking of the byte stream, the client sees the same ids, cut exactly before
    /// the first stop id, and exactly one `Done`.
    #[test]
    fn token_stream_is_chunking_independent(
        (events, stops) in arb_session(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        crlf in any::<bool>(),
    ) {
        let mut body = String::new();
        let mut total = 0;
        for t in &events {
            total += t.len();
            body.push_str(&protocol_event(t, false, total));
        }
        body.push_str(&protocol_event(&[], true, total));
        if crlf {
            body = body.replace('\n', "\r\n");
        }
        let bytes = body.into_bytes();
        let mut pos: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        pos.extend([0, bytes.len()]);
        pos.sort_unstable();
        let chunks: Vec<Vec<u8>> = pos.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect();

        let (evs, err) = drain(chunks, Backend::Equicrypt, &stops);
        prop_assert!(err.is_none(), "{:?}", err);
        let (ids, done) = flatten(&evs);
        let all: Vec<u32> = events.concat();
        let cut = all.iter().position(|t| stops.contains(t));
        let expected = &all[..cut.unwrap_or(all.len())];
        prop_assert_eq!(&ids[..], expected);
        match done {
            Some(StreamEvent::Done { stop_type, tokens_predicted, .. }) => {
                if cut.is_some() {
                    prop_assert_eq!(stop_type, StopType::Eos);
                    prop_assert_eq!(tokens_predicted, expected.len());
                } else {
                    prop_assert_eq!(stop_type, StopType::Limit);
                    prop_assert_eq!(tokens_predicted, total);
                }
            }
            other => prop_assert!(false, "no Done: {:?}", other),
        }
    }
}

#[test]
fn fingerprint_search() {
    let fp = "0123456789abcdef0123456789ABCDEF";
    assert_eq!(
        find_fingerprint(&format!("equicrypt-{fp}")),
        Some(fp.to_ascii_lowercase())
    );
    assert_eq!(
        find_fingerprint(&format!("/m/smollm2.{fp}.gguf")),
        Some(fp.to_ascii_lowercase())
    );
    // 31 or 33 hex digits are not a fingerprint; a run is taken whole.
    assert_eq!(find_fingerprint(&fp[1..]), None);
    assert_eq!(find_fingerprint(&format!("a{fp}")), None);
    assert_eq!(find_fingerprint("SmolLM2 135M Instruct"), None);
    assert_eq!(find_fingerprint(""), None);
}

#[test]
fn llamacpp_models_are_synthesized() {
    let fp = "00112233445566778899aabbccddeeff";
    let v: Value = serde_json::from_str(&format!(
        r#"{{"models":[],"object":"list","data":[{{"id":"enc.gguf","aliases":["equicrypt-{fp}"],
        "object":"model","owned_by":"llamacpp","meta":{{"vocab_type":1,"n_vocab":49152,
        "n_ctx":4096,"n_ctx_train":8192,"n_embd":576}}}}]}}"#
    ))
    .unwrap();
    let info = llamacpp_model_info(&v).unwrap();
    assert_eq!(info.key_fingerprint.as_deref(), Some(fp));
    assert_eq!((info.vocab_size, info.context_length), (49152, 4096));
    assert_eq!(info.id, "enc.gguf");
    assert!(matches!(
        llamacpp_model_info(&serde_json::json!({"data": []})),
        Err(ClientError::MalformedResponse(_))
    ));
    assert!(matches!(
        llamacpp_model_info(&serde_json::json!({"data": [{"id": "x"}]})),
        Err(ClientError::MalformedResponse(_))
    ));
}

#[test]
fn llamacpp_request_shape_and_seed() {
    let req: CompletionRequest =
        serde_json::from_str(r#"{"prompt":[3,4],"seed":4294967295,"stop_ids":[9]}"#).unwrap();
    let v = serde_json::to_value(LlamaCppRequest::new(&req, true)).unwrap();
    assert_eq!(v["prompt"], serde_json::json!([3, 4]));
    assert_eq!(v["return_tokens"], true);
    assert_eq!(v["stream"], true);
    assert_eq!(v["seed"], 4294967294u64);
    assert!(v.get("stop_ids").is_none());
    assert!(v.get("cache_prompt").is_none());
    assert!(v.get("ignore_eos").is_none());
    let hidden: CompletionRequest =
        serde_json::from_str(r#"{"prompt":[3],"ignore_eos":true}"#).unwrap();
    let v = serde_json::to_value(LlamaCppRequest::new(&hidden, true)).unwrap();
    assert_eq!(v["ignore_eos"], true);
    assert_eq!(llamacpp_seed(1 << 32 | 5), 5);
    assert_eq!(llamacpp_seed(7), 7);
}

#[test]
fn base_urls_are_validated() {
    let c = RemoteClient::new("http://127.0.0.1:8090/", Backend::Equicrypt).unwrap();
    assert_eq!(c.base_url(), "http://127.0.0.1:8090");
    assert_eq!(c.url("/health"), "http://127.0.0.1:8090/health");
    let c = RemoteClient::new("http://h:1/prefix/", Backend::LlamaCpp).unwrap();
    assert_eq!(c.url("/completion"), "http://h:1/prefix/completion");
    for bad in [
        "",
        "127.0.0.1:8090",
        "ftp://h/",
        "http://h/?q=1",
        "unix:/tmp/s",
    ] {
        assert!(
            matches!(
                RemoteClient::new(bad, Backend::Equicrypt),
                Err(ClientError::InvalidUrl { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn server_error_values() {
    let e = server_error_from_value(
        500,
        &serde_json::json!({"code": 503, "message": "loading", "type": "unavailable_error"}),
    );
    assert!(matches!(e, ClientError::Server { status: 503, ref message } if message == "loading"));
    let e = server_error_from_value(502, &serde_json::json!("plain"));
    assert!(matches!(e, ClientError::Server { status: 502, ref message } if message == "plain"));
}

/// A streamed chunk as vLLM 0.32 sends it (recorded from `/v1/completions` with
/// `return_token_ids`).
fn vllm_chunk(ids: &[u32], finish: Option<&str>, stop_reason: Option<u32>) -> String {
    let v = serde_json::json!({
        "id": "cmpl-869f80cf9d1db32c", "object": "text_completion", "created": 1796139933,
        "model": "d0c92c1b98cf5acf928e47089e1fd162",
        "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": finish,
                     "stop_reason": stop_reason, "prompt_token_ids": null, "token_ids": ids}]
    });
    format!("data: {v}\n\n")
}

#[test]
fn vllm_stream_cuts_the_stop_id_and_ignores_the_usage_chunk() {
    // vLLM returns the stop id it stopped at as the last id, then a usage chunk and [DONE].
    let s = [
        vllm_chunk(&[43526], None, None),
        vllm_chunk(&[38700], None, None),
        vllm_chunk(&[15967, 7], Some("stop"), Some(7)),
        "data: {\"id\":\"c\",\"object\":\"text_completion\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"total_tokens\":7,\"completion_tokens\":4}}\n\n".to_string(),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let (evs, err) = drain(vec![s.into_bytes()], Backend::Vllm, &[7]);
    assert!(err.is_none(), "{err:?}");
    let (ids, done) = flatten(&evs);
    assert_eq!(ids, vec![43526, 38700, 15967]);
    assert_eq!(
        done,
        Some(StreamEvent::Done {
            stop_type: StopType::Eos,
            timings: None,
            tokens_predicted: 3
        })
    );
    // A length stop counts every delivered id (vLLM's chunks carry no counts).
    let s = [
        vllm_chunk(&[1, 2], None, None),
        vllm_chunk(&[3], Some("length"), None),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let (evs, err) = drain(vec![s.into_bytes()], Backend::Vllm, &[7]);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        flatten(&evs).1,
        Some(StreamEvent::Done {
            stop_type: StopType::Limit,
            timings: None,
            tokens_predicted: 3
        })
    );
    // [DONE] before any finish_reason, a chunk without token_ids, an error chunk: errors.
    for bad in [
        [vllm_chunk(&[1], None, None), "data: [DONE]\n\n".to_string()].concat(),
        "data: {\"choices\":[{\"text\":\"<ct1>\",\"finish_reason\":null}]}\n\n".to_string(),
        "data: {\"error\":{\"message\":\"boom\",\"type\":\"InternalServerError\",\"code\":500}}\n\n"
            .to_string(),
    ] {
        let (_, err) = drain(vec![bad.clone().into_bytes()], Backend::Vllm, &[]);
        assert!(err.is_some(), "no error for {bad:?}");
    }
}

#[test]
fn vllm_models_and_request_shape() {
    let fp = "d0c92c1b98cf5acf928e47089e1fd162";
    let v = serde_json::json!({"object": "list", "data": [{"id": fp, "object": "model",
        "owned_by": "vllm", "root": "/tmp/enc-hf", "parent": null, "max_model_len": 2048}]});
    let info = vllm_model_info(&v).unwrap();
    assert_eq!(info.key_fingerprint.as_deref(), Some(fp));
    assert_eq!((info.id.as_str(), info.context_length), (fp, 2048));
    // The fingerprint may also be in the checkpoint path (`root`).
    let v = serde_json::json!({"data": [{"id": "m", "root": format!("/srv/enc-{fp}")}]});
    assert_eq!(
        vllm_model_info(&v).unwrap().key_fingerprint.as_deref(),
        Some(fp)
    );
    for bad in [
        serde_json::json!({"data": []}),
        serde_json::json!({"data": [{}]}),
    ] {
        assert!(matches!(
            vllm_model_info(&bad),
            Err(ClientError::MalformedResponse(_))
        ));
    }

    let req: CompletionRequest = serde_json::from_str(
        r#"{"prompt":[3,4],"n_predict":5,"seed":18446744073709551615,"stop_ids":[9],"top_k":0}"#,
    )
    .unwrap();
    let v = serde_json::to_value(VllmRequest::new(fp, &req, true)).unwrap();
    assert_eq!(v["model"], fp);
    assert_eq!(v["prompt"], serde_json::json!([3, 4]));
    assert_eq!(v["max_tokens"], 5);
    assert_eq!(v["stop_token_ids"], serde_json::json!([9]));
    assert_eq!(v["return_token_ids"], true);
    assert_eq!(v["seed"], i64::MAX);
    assert!(v.get("ignore_eos").is_none());
    let open: CompletionRequest =
        serde_json::from_str(r#"{"prompt":[3],"n_predict":-1,"ignore_eos":true}"#).unwrap();
    let v = serde_json::to_value(VllmRequest::new(fp, &open, false)).unwrap();
    assert!(v.get("max_tokens").is_none(), "{v}");
    assert!(v.get("stop_token_ids").is_none(), "{v}");
    assert_eq!(v["ignore_eos"], true);
    assert_eq!(vllm_seed(5), 5);
    let probs: CompletionRequest = serde_json::from_str(r#"{"prompt":[3],"n_probs":2}"#).unwrap();
    assert!(matches!(
        VllmRequest::check(&probs),
        Err(ClientError::Unsupported(_))
    ));
    assert!(VllmRequest::check(&req).is_ok());
}
