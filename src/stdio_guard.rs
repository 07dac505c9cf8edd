//! What a stdio client sends is checked before rmcp reads it. rmcp drops a
//! line it cannot parse without a word, so a client that sent one waits for
//! an answer that never comes; and it would buffer a line of any length.
//! Here every line is checked: at most `max_bytes` long, UTF-8, nested at
//! most [`MAX_DEPTH`] deep, and JSON; a message object carries `"jsonrpc":
//! "2.0"`, and a `tools/call` names its tool and passes its arguments as an
//! object (rmcp answers one it cannot read "method not found"). A line that
//! fails gets a JSON-RPC
//! error (with the request's id when it can be read) and never reaches the
//! server, so nothing is charged and no state changes. Good lines pass
//! through unchanged.
//!
//! The guard sits between the process's stdin/stdout and two in-memory
//! pipes that rmcp serves on: one task forwards checked lines in, another
//! forwards rmcp's output out, and the guard's own error lines are written
//! between rmcp's, never inside one.

use rmcp::{RoleServer, transport::async_rw::AsyncRwTransport};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

/// The deepest nesting of arrays and objects a message may have.
pub const MAX_DEPTH: usize = 64;

/// JSON-RPC's parse error, invalid request and invalid params codes.
const PARSE_ERROR: i64 = -32700;
pub(crate) const INVALID_REQUEST: i64 = -32600;
const INVALID_PARAMS: i64 = -32602;

/// rmcp's transport over [`guard`]'s pipes, and a token cancelled once
/// `input` has ended (the client closed stdin: it may still read the
/// answers). rmcp drops, unanswered, a line longer than its own limit (16
/// MiB by default): here it is told the guard's, so a line the guard lets
/// through always reaches the server.
pub fn transport<R, W>(
    input: R,
    output: W,
    max_bytes: usize,
) -> (
    AsyncRwTransport<RoleServer, tokio::io::DuplexStream, tokio::io::DuplexStream>,
    CancellationToken,
)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let input_ended = CancellationToken::new();
    let (reads, writes) = guard(input, output, max_bytes, input_ended.clone());
    // The newline and a `\r` before it, which the guard does not count.
    let transport = AsyncRwTransport::new_server(reads, writes)
        .with_max_line_length(max_bytes.saturating_add(2));
    (transport, input_ended)
}

/// Serves rmcp on the returned pipe ends, guarding `input` and writing to
/// `output`; cancels `input_ended` when the input ends. The tasks end when
/// the input ends and rmcp has finished.
pub fn guard<R, W>(
    input: R,
    output: W,
    max_bytes: usize,
    input_ended: CancellationToken,
) -> (tokio::io::DuplexStream, tokio::io::DuplexStream)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (server_reads, mut checked_in) = tokio::io::duplex(64 * 1024);
    let (server_writes, server_output) = tokio::io::duplex(64 * 1024);
    // Bounded: while stdout is not read, the refusals wait, and so does
    // reading stdin (a client that only writes cannot fill memory).
    let (errors, mut error_lines) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let _ended = input_ended.drop_guard();
        let mut input = BufReader::new(input);
        loop {
            let line = match read_line(&mut input, max_bytes).await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("stdin: {e}");
                    break;
                }
            };
            match check(&line, max_bytes) {
                Ok(()) => {
                    if checked_in.write_all(&line).await.is_err()
                        || checked_in.write_all(b"\n").await.is_err()
                    {
                        break;
                    }
                }
                Err(reply) => {
                    tracing::info!("refused a message on stdin: {}", reply["error"]["message"]);
                    if errors.send(reply.to_string()).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `checked_in` tells rmcp the input has ended.
    });
    tokio::spawn(async move {
        let mut output = output;
        let mut lines = BufReader::new(server_output).lines();
        let mut errors_open = true;
        loop {
            let line = tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => line,
                    _ => break,
                },
                error = error_lines.recv(), if errors_open => match error {
                    Some(line) => line,
                    None => {
                        errors_open = false;
                        continue;
                    }
                },
            };
            // One write per message: each may be a system call.
            let mut line = line;
            line.push('\n');
            if output.write_all(line.as_bytes()).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
    });
    (server_reads, server_writes)
}

/// One line without its newline (and a `\r` before it). A line longer than
/// `max_bytes` is read to its end but kept only up to `max_bytes + 1`
/// bytes, so that [`check`] refuses it without holding it all.
async fn read_line<R: AsyncRead + Unpin>(
    input: &mut BufReader<R>,
    max_bytes: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut seen_any = false;
    // Bytes past `max_bytes + 1` were dropped: the line stays too long.
    let mut cut = false;
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(seen_any.then_some(line));
        }
        seen_any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = (max_bytes + 1).saturating_sub(line.len());
        cut |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        input.consume(used);
        // An oversized line is read on to its end, keeping none of the rest.
        if done.is_some() {
            // Only a `\r` right before the newline ends the line; one kept
            // from the middle of a cut line would bring it under the limit.
            if !cut && line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

/// `Err` is the JSON-RPC error to answer a bad line with.
pub fn check(line: &[u8], max_bytes: usize) -> Result<(), Value> {
    if line.len() > max_bytes {
        // The id is near the start of a request: answer it if it is there.
        return Err(too_large(id_of(&String::from_utf8_lossy(line)), max_bytes));
    }
    // A byte-order mark, which rmcp skips too.
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(error_reply(
            Value::Null,
            PARSE_ERROR,
            "message is not valid UTF-8".into(),
        ));
    };
    if text.trim().is_empty() {
        return Ok(());
    }
    if depth(text) > MAX_DEPTH {
        return Err(error_reply(
            id_of(text),
            INVALID_REQUEST,
            format!("message nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(message)) => well_formed(&message),
        // MCP dropped JSON-RPC batches (2025-06-18), and rmcp answers one
        // without an id.
        Ok(Value::Array(_)) => Err(error_reply(
            Value::Null,
            INVALID_REQUEST,
            "a batch is not taken: send one JSON-RPC message at a time".into(),
        )),
        Ok(_) => Err(error_reply(
            Value::Null,
            INVALID_REQUEST,
            "a JSON-RPC message is an object".into(),
        )),
        Err(e) => Err(error_reply(
            id_of(text),
            PARSE_ERROR,
            format!("message is not JSON: {e}"),
        )),
    }
}

/// The answer to a message over the size limit (`id` `null` when unread).
pub fn too_large(id: Value, max_bytes: usize) -> Value {
    error_reply(
        id,
        INVALID_REQUEST,
        format!("message larger than {max_bytes} bytes; it was not read"),
    )
}

/// JSON-RPC 2.0's envelope, and the params of a `tools/call`, of a request
/// or a notification. A client's answer to one of ours passes as it is: an
/// error naming its id would read as the answer to the client's own request
/// of that number.
fn well_formed(message: &Map<String, Value>) -> Result<(), Value> {
    if !message.contains_key("method") {
        return Ok(());
    }
    let id = || message.get("id").cloned().unwrap_or(Value::Null);
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(error_reply(
            id(),
            INVALID_REQUEST,
            r#"a JSON-RPC message carries "jsonrpc": "2.0""#.into(),
        ));
    }
    if message.get("method").and_then(Value::as_str) != Some("tools/call") {
        return Ok(());
    }
    let why = match message.get("params") {
        Some(Value::Object(params)) => match (params.get("name"), params.get("arguments")) {
            (Some(Value::String(_)), None | Some(Value::Object(_) | Value::Null)) => return Ok(()),
            (Some(Value::String(_)), Some(_)) => "params.arguments must be an object",
            _ => "params.name must be a string, the tool to call",
        },
        _ => "params must be an object naming the tool to call",
    };
    Err(error_reply(
        id(),
        INVALID_PARAMS,
        format!("tools/call: {why}"),
    ))
}

pub(crate) fn error_reply(id: Value, code: i64, message: String) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// The bytes of `text` outside strings (and each string's opening quote),
/// with their offset and how deep in `[` and `{` they are.
fn outside_strings(text: &str) -> impl Iterator<Item = (usize, u8, usize)> + '_ {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    text.bytes().enumerate().filter_map(move |(at, b)| {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            return None;
        }
        let here = depth;
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        Some((at, b, here))
    })
}

/// The deepest nesting of `[` and `{` outside strings.
fn depth(text: &str) -> usize {
    outside_strings(text)
        .filter(|(_, b, _)| matches!(b, b'[' | b'{'))
        .map(|(_, _, depth)| depth + 1)
        .max()
        .unwrap_or(0)
}

/// A request's id, read leniently from a message that is not valid as a
/// whole (`"id": 7` or `"id": "abc"` as a key of the top-level object, not
/// one inside its params or a string), so that its sender gets its answer;
/// else null.
fn id_of(text: &str) -> Value {
    // (A quote is one byte: `at` is a char boundary there, and only there.)
    let key = outside_strings(text)
        .filter(|&(_, b, depth)| b == b'"' && depth == 1)
        .find_map(|(at, _, _)| {
            text[at..]
                .strip_prefix("\"id\"")?
                .trim_start()
                .strip_prefix(':')
        });
    let Some(value) = key else {
        return Value::Null;
    };
    match serde_json::Deserializer::from_str(value.trim_start())
        .into_iter::<Value>()
        .next()
    {
        Some(Ok(id @ (Value::Number(_) | Value::String(_)))) => id,
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &[u8]) -> Option<(i64, Value)> {
        check(line, 100)
            .err()
            .map(|e| (e["error"]["code"].as_i64().unwrap(), e["id"].clone()))
    }

    #[test]
    fn bad_lines_get_an_error_with_their_id_where_it_can_be_read() {
        assert_eq!(code(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#), None);
        assert_eq!(
            code(b"\xEF\xBB\xBF{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}"),
            None
        );
        assert_eq!(code(b"not json"), Some((PARSE_ERROR, Value::Null)));
        assert_eq!(code(b"\xff\xfe"), Some((PARSE_ERROR, Value::Null)));
        assert_eq!(
            code(br#"{"id": 7, "method": "x", "#),
            Some((PARSE_ERROR, json!(7)))
        );
        assert_eq!(
            code(br#"{"id":"a","x":[[["#),
            Some((PARSE_ERROR, json!("a")))
        );
        // Not UTF-8 boundaries outside strings: no panic, no id.
        assert_eq!(
            code("{é\"id\":".as_bytes()),
            Some((PARSE_ERROR, Value::Null))
        );
        assert_eq!(
            code("{\"é\":1,\"id\":3,".as_bytes()),
            Some((PARSE_ERROR, json!(3)))
        );
        // The request's own id, not one in its arguments or in a string.
        assert_eq!(
            code(br#"{"params":{"id":"theirs","x":"\"id\": 9"},"id":5,"#),
            Some((PARSE_ERROR, json!(5)))
        );
        assert_eq!(
            code(br#"{"params":{"id":"theirs"},"#),
            Some((PARSE_ERROR, Value::Null))
        );
        assert_eq!(code(b"42"), Some((INVALID_REQUEST, Value::Null)));
        assert_eq!(
            code(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#),
            Some((INVALID_REQUEST, Value::Null))
        );
        assert_eq!(code(&[b' '; 101]), Some((INVALID_REQUEST, Value::Null)));
        let long = format!(r#"{{"id":12,"text":"{}"}}"#, "x".repeat(200));
        assert_eq!(code(long.as_bytes()), Some((INVALID_REQUEST, json!(12))));
        let deep = format!(r#"{{"id":3,"a":{}{}}}"#, "[".repeat(70), "]".repeat(70));
        assert_eq!(check(deep.as_bytes(), 10_000).unwrap_err()["id"], json!(3));
        // Brackets inside strings are not nesting.
        let quoted = format!(r#"{{"jsonrpc":"2.0","id":4,"a":"{}"}}"#, "[".repeat(70));
        assert!(check(quoted.as_bytes(), 10_000).is_ok());
    }

    #[test]
    fn a_message_without_its_envelope_or_a_call_without_a_tool_is_refused() {
        assert_eq!(
            code(br#"{"id":1,"method":"ping"}"#),
            Some((INVALID_REQUEST, json!(1)))
        );
        assert_eq!(
            code(br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#),
            Some((INVALID_REQUEST, json!(1)))
        );
        for params in [
            "",
            r#","params":"x""#,
            r#","params":{}"#,
            r#","params":{"name":5}"#,
            r#","params":{"name":"echo","arguments":"x"}"#,
            r#","params":{"name":"echo","arguments":[1]}"#,
        ] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call"{params}}}"#);
            let refused = check(line.as_bytes(), 1_000).expect_err(&line);
            assert_eq!(refused["error"]["code"], INVALID_PARAMS, "{line}");
            assert_eq!(refused["id"], 2, "{line}");
            assert!(
                refused["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("params")),
                "{refused}"
            );
        }
        for good in [
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo"}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":null}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":4,"result":{}}"#,
            r#"{"id":4,"result":{}}"#,
        ] {
            assert!(check(good.as_bytes(), 1_000).is_ok(), "{good}");
        }
    }

    #[tokio::test]
    async fn an_oversized_line_is_refused_without_being_kept_and_the_next_is_read() {
        let mut input = b"x".repeat(300_000);
        input.extend_from_slice(b"\n{\"id\":1}\r\n");
        let mut reader = BufReader::new(&input[..]);
        let first = read_line(&mut reader, 1000).await.unwrap().unwrap();
        assert_eq!(first.len(), 1001);
        let second = read_line(&mut reader, 1000).await.unwrap().unwrap();
        assert_eq!(second, b"{\"id\":1}");
        assert_eq!(read_line(&mut reader, 1000).await.unwrap(), None);
    }

    /// A line cut at the limit right after a `\r` from its middle is still
    /// too long, while one whose `\r\n` ends it right at the limit is not.
    #[tokio::test]
    async fn a_carriage_return_inside_a_cut_line_does_not_bring_it_under_the_limit() {
        let request = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        let max = request.len();
        let mut input = request.to_vec();
        input.extend_from_slice(b"\r and what follows\n");
        input.extend_from_slice(request);
        input.extend_from_slice(b"\r\n");
        let mut reader = BufReader::new(&input[..]);
        let cut = read_line(&mut reader, max).await.unwrap().unwrap();
        assert_eq!(
            check(&cut, max).unwrap_err()["id"],
            json!(1),
            "refused as too large"
        );
        let whole = read_line(&mut reader, max).await.unwrap().unwrap();
        assert_eq!(whole, request);
        assert!(check(&whole, max).is_ok());
    }

    /// A client that writes bad lines and never reads: the refusals wait
    /// for stdout, and stdin is read no further meanwhile.
    #[tokio::test]
    async fn refusals_nobody_reads_stop_the_reading_of_stdin() {
        let (mut client_writes, input) = tokio::io::duplex(1024);
        let (output, _client_never_reads) = tokio::io::duplex(1024);
        let (_server_reads, _server_writes) = guard(input, output, 1000, CancellationToken::new());
        let mut written = 0usize;
        let writing = async {
            loop {
                client_writes.write_all(b"x\n").await.unwrap();
                written += 2;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), writing).await;
        // The refusals' channel, the two pipes' buffers: a few KiB at most.
        assert!(written < 16 * 1024, "{written} bytes taken in");
    }
}
