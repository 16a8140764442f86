//! The official `openai` Python SDK against a real gateway on 127.0.0.1:
//! `tests/sdk/openai_client.py` is run with `python3`, configured only by
//! `OPENAI_BASE_URL` and `OPENAI_API_KEY` as a user's client would be, and
//! what the SDK returned is checked here, with the ledger rows the requests
//! left.
//!
//! The SDK is a Python package: `.ci/run` installs it. Elsewhere the test is
//! skipped, saying so, when `python3 -c "import openai"` fails — except under
//! `CI=true`, where a skip would hide that the test never ran.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use support::{mock_cost, run_script, skip_unless_ci, tokens, TestServer};
use tollgate::store::LedgerRow;
use uuid::Uuid;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
const SKIP: &str = "the openai Python package is not installed (pip install openai)";

/// Generous: the script starts Python, imports the SDK and makes 7 requests.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);

const PROMPT: &str =
    "Please tell me a short story about a toll gate that counts every token passing through it";
/// The mock's reply: the first 12 words of the last message.
const REPLY: &str = "Mock reply to: Please tell me a short story about a toll gate that counts";

/// Variables that would change how the SDK behaves (proxy variables are
/// removed by `run_script` too).
const CLEARED_ENV: &[&str] = &["OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG"];

async fn openai_is_importable() -> bool {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import openai"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    matches!(
        tokio::time::timeout(SCRIPT_DEADLINE, probe).await,
        Ok(Ok(status)) if status.success()
    )
}

/// Runs the SDK script against `server` with `key`; returns its JSON.
async fn run_sdk_script(server: &TestServer, key: &str) -> Value {
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(SCRIPT)
        .env("OPENAI_BASE_URL", server.url("/v1"))
        .env("OPENAI_API_KEY", key)
        .env("MODEL", "mock-1")
        .env("PROMPT", PROMPT)
        .env("FAIL_MODEL", "mock-fail")
        .env("NO_PROXY", "127.0.0.1,localhost");
    for name in CLEARED_ENV {
        command.env_remove(name);
    }
    let stdout = run_script(command, SCRIPT, SCRIPT_DEADLINE).await;
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the script's output is not JSON ({e}):\n{stdout}"))
}

fn check_row(row: &LedgerRow, key_id: Uuid, streamed: bool, usage: (i64, i64)) {
    assert_eq!(row.key_id, key_id, "{row:?}");
    assert_eq!(row.model, "mock-1", "{row:?}");
    assert_eq!(row.provider, "mock", "{row:?}");
    assert_eq!(row.status, 200, "{row:?}");
    assert_eq!(row.streamed, streamed, "{row:?}");
    assert!(!row.estimated, "the mock reports usage: {row:?}");
    assert_eq!((row.input_tokens, row.output_tokens), usage, "{row:?}");
    assert_eq!(row.cost_micros, mock_cost(usage.0, usage.1), "{row:?}");
}

fn request_id(result: &Value) -> String {
    result["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the SDK's response has x-request-id: {result}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works_streamed_and_not() {
    if !openai_is_importable().await {
        return skip_unless_ci(SKIP);
    }
    let server = TestServer::start(|_| {}).await;
    let (record, secret) =
        tollgate::auth::issue_api_key(&server.state.store, "python-sdk", false, None)
            .await
            .expect("create a key");
    let results = run_sdk_script(&server, secret.expose()).await;
    println!("openai SDK {}", results["sdk_version"]);
    assert_eq!(results["base_url"], format!("{}/", server.url("/v1")));

    // Non-streamed.
    let chat = &results["chat"];
    assert_eq!(chat["content"], REPLY, "{chat}");
    assert_eq!(chat["role"], "assistant", "{chat}");
    assert_eq!(chat["finish_reason"], "stop", "{chat}");
    assert_eq!(chat["object"], "chat.completion", "{chat}");
    assert_eq!(chat["model"], "mock-1", "{chat}");
    assert_eq!(chat["provider"], "mock", "{chat}");
    // One message: 4 tokens of framing, the text, 3 for the reply.
    let input = 4 + tokens(PROMPT) + 3;
    let output = tokens(REPLY);
    assert!(input > 7 && output > 0);
    assert_eq!(
        chat["usage"],
        json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}),
        "{chat}"
    );

    // Streamed without asking for usage: the same text, no usage chunk.
    let stream = &results["stream"];
    assert_eq!(stream["content"], REPLY, "{stream}");
    assert_eq!(stream["content_type"], "text/event-stream", "{stream}");
    assert_eq!(stream["provider"], "mock", "{stream}");
    assert_eq!(stream["finish_reason"], "stop", "{stream}");
    assert_eq!(stream["usage_chunks"], 0, "{stream}");
    assert!(stream["usage"].is_null(), "{stream}");
    // Role, one chunk per word of the reply, finish.
    let words = REPLY.split(' ').count();
    assert_eq!(stream["chunks"], words + 2, "{stream}");
    assert_eq!(
        stream["pieces"].as_array().unwrap().len(),
        words,
        "{stream}"
    );

    // Streamed with `stream_options.include_usage`: one usage chunk.
    let with_usage = &results["stream_with_usage"];
    assert_eq!(with_usage["content"], REPLY, "{with_usage}");
    assert_eq!(with_usage["usage_chunks"], 1, "{with_usage}");
    assert_eq!(with_usage["usage_chunk_choices"], 0, "{with_usage}");
    assert_eq!(with_usage["usage"], chat["usage"], "{with_usage}");
    assert_eq!(with_usage["chunks"], words + 3, "{with_usage}");

    // Embeddings: 8 dimensions per input, in order, the gateway's own.
    let embeddings = &results["embeddings"];
    assert_eq!(embeddings["lengths"], json!([8, 8]), "{embeddings}");
    assert_eq!(embeddings["indexes"], json!([0, 1]), "{embeddings}");
    let embedded = tokens("hello world") + tokens("goodbye world");
    assert_eq!(
        embeddings["usage"],
        json!({"prompt_tokens": embedded, "total_tokens": embedded}),
        "{embeddings}"
    );
    let direct: Value = reqwest::Client::new()
        .post(server.url("/v1/embeddings"))
        .bearer_auth(secret.expose())
        .json(&json!({"model": "mock-1", "input": ["hello world", "goodbye world"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for index in 0..2 {
        assert_eq!(
            embeddings["vectors"][index], direct["data"][index]["embedding"],
            "the SDK reads the gateway's vectors unchanged"
        );
    }
    assert_ne!(embeddings["vectors"][0], embeddings["vectors"][1]);

    // Errors reach the SDK as its typed exceptions with our codes.
    let unknown = &results["unknown_model"];
    assert_eq!(unknown["exception"], "NotFoundError", "{unknown}");
    assert_eq!(unknown["status"], 404, "{unknown}");
    assert_eq!(unknown["code"], "model_not_found", "{unknown}");
    assert_eq!(unknown["type"], "invalid_request_error", "{unknown}");
    let failing = &results["failing_model"];
    assert_eq!(failing["exception"], "InternalServerError", "{failing}");
    assert_eq!(failing["status"], 502, "{failing}");
    assert_eq!(failing["code"], "upstream_error", "{failing}");
    assert_eq!(failing["type"], "upstream_error", "{failing}");

    // Every request is in the ledger with the usage the SDK saw.
    let ids: Vec<String> = [chat, stream, with_usage, embeddings, unknown, failing]
        .iter()
        .map(|r| request_id(r))
        .collect();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "request ids are distinct: {ids:?}"
    );
    check_row(
        &server.ledger_row(&ids[0]).await,
        record.id,
        false,
        (input, output),
    );
    check_row(
        &server.ledger_row(&ids[1]).await,
        record.id,
        true,
        (input, output),
    );
    check_row(
        &server.ledger_row(&ids[2]).await,
        record.id,
        true,
        (input, output),
    );
    check_row(
        &server.ledger_row(&ids[3]).await,
        record.id,
        false,
        (embedded, 0),
    );
    // The unknown model reached no provider: audited, no ledger row.
    let audit = server.audit_record(&ids[4]).await["payload"].clone();
    assert_eq!(audit["status"], 404, "{audit}");
    assert_eq!(audit["error"], "model_not_found", "{audit}");
    assert_eq!(audit["key_id"], record.id.to_string(), "{audit}");
    assert!(server
        .state
        .store
        .ledger_rows_for_request(&ids[4])
        .await
        .unwrap()
        .is_empty());
    // The failure reached the provider: a row with no tokens and status 502.
    let failed = server.ledger_row(&ids[5]).await;
    assert_eq!(failed.status, 502, "{failed:?}");
    assert_eq!(
        (
            failed.input_tokens,
            failed.output_tokens,
            failed.cost_micros
        ),
        (0, 0, 0)
    );
    let audit = server.audit_record(&ids[5]).await["payload"].clone();
    assert_eq!(audit["error"], "upstream_error", "{audit}");
    server.shutdown().await;
}
