//! Token counts: read from the upstream's `usage` where it reports one,
//! otherwise counted by the gateway with a real tokenizer (tiktoken's
//! `cl100k_base`) and marked `estimated`.
//!
//! An estimate counts the text of every message (string contents and the
//! `text` parts of multi-part contents) plus 4 tokens of framing per message
//! and 3 for the reply's priming, as OpenAI documents for its chat format;
//! for embeddings, the text of `input` (or the length of token arrays).

use serde_json::Value;

use super::provider::Endpoint;

/// A request's token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Counted by the gateway because the upstream reported none.
    pub estimated: bool,
}

const TOKENS_PER_MESSAGE: i64 = 4;
const REPLY_PRIMING: i64 = 3;

/// Tokens of `text` in `cl100k_base`.
pub fn count_tokens(text: &str) -> i64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::cl100k_base_singleton()
        .encode_with_special_tokens(text)
        .len() as i64
}

/// The upstream's own counts from a `usage` object, if it has them.
pub fn reported(usage: &Value) -> Option<(i64, i64)> {
    let prompt = usage.get("prompt_tokens")?.as_i64()?;
    let completion = usage
        .get("completion_tokens")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    Some((prompt, completion))
}

/// The gateway's count of a request's input.
pub fn estimate_input(endpoint: Endpoint, body: &Value) -> i64 {
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = body.get("messages").and_then(Value::as_array);
            messages.map_or(0, |messages| {
                messages
                    .iter()
                    .map(|m| TOKENS_PER_MESSAGE + count_tokens(&content_text(m.get("content"))))
                    .sum::<i64>()
                    + REPLY_PRIMING
            })
        }
        Endpoint::Embeddings => match body.get("input") {
            Some(Value::String(text)) => count_tokens(text),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => count_tokens(text),
                    Value::Number(_) => 1,
                    Value::Array(tokens) => tokens.len() as i64,
                    _ => 0,
                })
                .sum(),
            _ => 0,
        },
    }
}

/// The text of a message's `content`: a string, or the `text` of its parts.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The text of a non-streamed chat completion's choices.
pub fn completion_text(response: &Value) -> String {
    response
        .get("choices")
        .and_then(Value::as_array)
        .map(|choices| {
            choices
                .iter()
                .map(|c| content_text(c.get("message").and_then(|m| m.get("content"))))
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// Usage of a complete response: reported, or estimated from the texts.
pub fn of_response(endpoint: Endpoint, request: &Value, response: &Value) -> Usage {
    match response.get("usage").and_then(reported) {
        Some((input_tokens, output_tokens)) => Usage {
            input_tokens,
            output_tokens,
            estimated: false,
        },
        None => Usage {
            input_tokens: estimate_input(endpoint, request),
            output_tokens: match endpoint {
                Endpoint::ChatCompletions => count_tokens(&completion_text(response)),
                Endpoint::Embeddings => 0,
            },
            estimated: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_real_tokenizer_counts() {
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens(""), 0);
    }

    #[test]
    fn reported_usage_wins_over_an_estimate() {
        let request = json!({"messages": [{"role": "user", "content": "hello world"}]});
        let response =
            json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 22}});
        assert_eq!(
            of_response(Endpoint::ChatCompletions, &request, &response),
            Usage {
                input_tokens: 11,
                output_tokens: 22,
                estimated: false
            }
        );
    }

    #[test]
    fn without_usage_the_texts_are_counted_and_marked_estimated() {
        let request = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}]}
        ]});
        let response =
            json!({"choices": [{"message": {"role": "assistant", "content": "hello world"}}]});
        // 2 messages × 4 + "be brief" (2) + "hello world" (2) + 3 priming.
        assert_eq!(
            of_response(Endpoint::ChatCompletions, &request, &response),
            Usage {
                input_tokens: 15,
                output_tokens: 2,
                estimated: true
            }
        );
        let embeddings = json!({"input": ["hello world", "hello"]});
        assert_eq!(estimate_input(Endpoint::Embeddings, &embeddings), 3);
    }
}
