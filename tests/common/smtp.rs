//! A real SMTP sink for one test: the server side of SMTP (RFC 5321) over tokio on a loopback port.
//! It keeps every accepted message raw with its envelope and decodes what tests need (headers,
//! RFC 2047 subjects, quoted-printable / base64 / 7bit / 8bit bodies, the one-time link). It can
//! answer temporary (421 / 451) or permanent (550) failures, be slow, or stop listening and start
//! again on the same port ("the mail server is down, then back").
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Where in the conversation a configured failure is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Instead of the 220 greeting (then the connection is closed).
    Greeting,
    MailFrom,
    RcptTo,
    /// After the message's final dot.
    Data,
}

/// How the sink answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// Answers `code text` at `stage` (4xx: try again later; 5xx: never).
    Fail {
        stage: Stage,
        code: u16,
        text: String,
    },
}

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Received {
    /// The reverse-path of MAIL FROM (without angle brackets).
    pub mail_from: String,
    /// Every forward-path of RCPT TO (without angle brackets).
    pub rcpt_to: Vec<String>,
    /// The message as transmitted, dot-unstuffed, CRLF line ends.
    pub raw: String,
}

#[derive(Default)]
struct State {
    messages: Vec<Received>,
    /// Connections that reached the greeting (accepted or refused).
    connections: usize,
    /// Transactions refused with a configured failure.
    refused: usize,
}

struct Inner {
    port: u16,
    state: Mutex<State>,
    behaviour: Mutex<Behaviour>,
    /// Delay before answering the end of DATA (to make concurrent deliveries overlap).
    delay: Mutex<Duration>,
    arrived: tokio::sync::Notify,
    /// The accept loop and its connections, while listening.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The sink; dropping it stops it.
pub struct SmtpSink {
    inner: Arc<Inner>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.abort_tasks();
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(64)
}

impl SmtpSink {
    /// Listens on 127.0.0.1:0 and accepts every message.
    pub async fn start() -> SmtpSink {
        let listener = bind(0).expect("the SMTP sink binds a loopback port");
        let port = listener.local_addr().unwrap().port();
        let sink = SmtpSink {
            inner: Arc::new(Inner {
                port,
                state: Mutex::new(State::default()),
                behaviour: Mutex::new(Behaviour::Accept),
                delay: Mutex::new(Duration::ZERO),
                arrived: tokio::sync::Notify::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        sink.serve(listener);
        sink
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The `[mail]` table that points a test server at this sink (merge it into the config).
    pub fn mail_config(&self) -> Value {
        json!({
            "mail": {
                "transport": "smtp",
                "from": "noreply@example.ac.jp",
                "host": "127.0.0.1",
                "port": self.port(),
                "tls": "none",
            }
        })
    }

    fn serve(&self, listener: TcpListener) {
        let inner = self.inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let connection = tokio::spawn(converse(inner.clone(), stream));
                let mut tasks = inner.tasks.lock().unwrap();
                tasks.retain(|t| !t.is_finished());
                tasks.push(connection);
            }
        });
        self.inner.tasks.lock().unwrap().push(accept);
    }

    fn abort_tasks(&self) {
        for task in self.inner.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Stops listening and drops every open connection: connections are refused from now on.
    pub async fn stop(&self) {
        let tasks: Vec<JoinHandle<()>> = self.inner.tasks.lock().unwrap().drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        let mut attempts = 0;
        let listener = loop {
            match bind(self.port()) {
                Ok(listener) => break listener,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the SMTP sink cannot listen on {} again: {e}", self.port()),
            }
        };
        self.serve(listener);
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.inner.behaviour.lock().unwrap() = behaviour;
    }

    /// Accepts every message again.
    pub fn accept(&self) {
        self.set_behaviour(Behaviour::Accept);
    }

    /// Answers `code` (421 or 451, say) to RCPT TO: the client should try again later.
    pub fn fail_temporarily(&self, code: u16) {
        self.set_behaviour(Behaviour::Fail {
            stage: Stage::RcptTo,
            code,
            text: "4.3.0 Try again later (test sink)".into(),
        });
    }

    /// Answers 421 instead of the greeting, as a server that is shutting down does.
    pub fn refuse_greeting(&self) {
        self.set_behaviour(Behaviour::Fail {
            stage: Stage::Greeting,
            code: 421,
            text: "4.3.2 Service not available, closing channel (test sink)".into(),
        });
    }

    /// Answers 550 to RCPT TO: the mailbox does not exist; never worth retrying.
    pub fn fail_permanently(&self) {
        self.set_behaviour(Behaviour::Fail {
            stage: Stage::RcptTo,
            code: 550,
            text: "5.1.1 Mailbox unavailable (test sink)".into(),
        });
    }

    /// Waits this long before answering the end of DATA.
    pub fn set_delay(&self, delay: Duration) {
        *self.inner.delay.lock().unwrap() = delay;
    }

    /// Every message accepted so far, in order of arrival.
    pub fn messages(&self) -> Vec<Received> {
        self.inner.state.lock().unwrap().messages.clone()
    }

    pub fn count(&self) -> usize {
        self.inner.state.lock().unwrap().messages.len()
    }

    /// Connections that reached the greeting (including refused ones).
    pub fn connections(&self) -> usize {
        self.inner.state.lock().unwrap().connections
    }

    /// Transactions answered with the configured failure.
    pub fn refused(&self) -> usize {
        self.inner.state.lock().unwrap().refused
    }

    /// Messages whose envelope recipients include `address`.
    pub fn messages_to(&self, address: &str) -> Vec<Received> {
        self.messages()
            .into_iter()
            .filter(|m| m.is_to(address))
            .collect()
    }

    /// Waits (up to `timeout`) until `count` messages satisfy `filter`; returns them.
    pub async fn wait_for_n(
        &self,
        count: usize,
        timeout: Duration,
        filter: impl Fn(&Received) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.arrived.notified();
            let found: Vec<Received> = self.messages().into_iter().filter(&filter).collect();
            if found.len() >= count {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let found: Vec<Received> = self.messages().into_iter().filter(&filter).collect();
                if found.len() >= count {
                    return found;
                }
                panic!(
                    "waited {timeout:?} for {count} mails, got {}; everything received: {:#?}",
                    found.len(),
                    self.messages()
                        .iter()
                        .map(|m| (m.rcpt_to.clone(), m.subject()))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    /// The `n`-th (1-based) message to `address`, waiting up to 10 s for it.
    pub async fn nth_mail_to(&self, address: &str, n: usize) -> Received {
        let mails = self
            .wait_for_n(n, Duration::from_secs(10), |m| m.is_to(address))
            .await;
        mails[n - 1].clone()
    }

    /// The first message to `address`, waiting up to 10 s for it.
    pub async fn mail_to(&self, address: &str) -> Received {
        self.nth_mail_to(address, 1).await
    }

    /// Waits up to 10 s for a message to `address` with `subject`; the newest one.
    pub async fn mail_with_subject(&self, address: &str, subject: &str) -> Received {
        let mails = self
            .wait_for_n(1, Duration::from_secs(10), |m| {
                m.is_to(address) && m.subject() == subject
            })
            .await;
        mails.last().unwrap().clone()
    }

    /// Waits `quiet` and asserts that nothing arrived for `address` meanwhile beyond `expected`.
    pub async fn assert_no_more_mail_to(&self, address: &str, expected: usize, quiet: Duration) {
        tokio::time::sleep(quiet).await;
        let mails = self.messages_to(address);
        assert_eq!(
            mails.len(),
            expected,
            "mails to {address}: {:#?}",
            mails.iter().map(Received::subject).collect::<Vec<_>>()
        );
    }
}

async fn reply(writer: &mut tokio::net::tcp::OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    writer.write_all(format!("{line}\r\n").as_bytes()).await?;
    writer.flush().await
}

fn failure_at(inner: &Inner, stage: Stage) -> Option<String> {
    match &*inner.behaviour.lock().unwrap() {
        Behaviour::Fail {
            stage: s,
            code,
            text,
        } if *s == stage => Some(format!("{code} {text}")),
        _ => None,
    }
}

fn angle_address(argument: &str) -> String {
    let argument = argument.trim();
    let inner = match (argument.find('<'), argument.find('>')) {
        (Some(start), Some(end)) if end > start => &argument[start + 1..end],
        _ => argument.split_whitespace().next().unwrap_or(""),
    };
    inner.to_string()
}

/// One SMTP conversation.
async fn converse(inner: Arc<Inner>, stream: TcpStream) {
    let _ = converse_inner(&inner, stream).await;
}

async fn converse_inner(inner: &Arc<Inner>, stream: TcpStream) -> std::io::Result<()> {
    let (read, mut writer) = stream.into_split();
    let mut reader = BufReader::new(read);
    inner.state.lock().unwrap().connections += 1;
    if let Some(failure) = failure_at(inner, Stage::Greeting) {
        inner.state.lock().unwrap().refused += 1;
        reply(&mut writer, &failure).await?;
        return Ok(());
    }
    reply(&mut writer, "220 sink.test ESMTP nidan test sink").await?;
    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, argument) = match text.split_once(' ') {
            Some((verb, argument)) => (verb.to_ascii_uppercase(), argument.to_string()),
            None => (text.to_ascii_uppercase(), String::new()),
        };
        match verb.as_str() {
            "EHLO" => {
                mail_from = None;
                rcpt_to.clear();
                writer
                    .write_all(
                        b"250-sink.test greets you\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n",
                    )
                    .await?;
                writer.flush().await?;
            }
            "HELO" => {
                mail_from = None;
                rcpt_to.clear();
                reply(&mut writer, "250 sink.test").await?;
            }
            "MAIL" => {
                if let Some(failure) = failure_at(inner, Stage::MailFrom) {
                    inner.state.lock().unwrap().refused += 1;
                    reply(&mut writer, &failure).await?;
                    continue;
                }
                let Some(path) = argument
                    .get(..5)
                    .filter(|p| p.eq_ignore_ascii_case("FROM:"))
                    .map(|_| angle_address(&argument[5..]))
                else {
                    reply(&mut writer, "501 5.5.4 Syntax: MAIL FROM:<address>").await?;
                    continue;
                };
                mail_from = Some(path);
                rcpt_to.clear();
                reply(&mut writer, "250 2.1.0 Ok").await?;
            }
            "RCPT" => {
                if mail_from.is_none() {
                    reply(&mut writer, "503 5.5.1 Error: need MAIL command").await?;
                    continue;
                }
                if let Some(failure) = failure_at(inner, Stage::RcptTo) {
                    inner.state.lock().unwrap().refused += 1;
                    reply(&mut writer, &failure).await?;
                    continue;
                }
                let Some(path) = argument
                    .get(..3)
                    .filter(|p| p.eq_ignore_ascii_case("TO:"))
                    .map(|_| angle_address(&argument[3..]))
                else {
                    reply(&mut writer, "501 5.5.4 Syntax: RCPT TO:<address>").await?;
                    continue;
                };
                rcpt_to.push(path);
                reply(&mut writer, "250 2.1.5 Ok").await?;
            }
            "DATA" => {
                if mail_from.is_none() || rcpt_to.is_empty() {
                    reply(&mut writer, "503 5.5.1 Error: need RCPT command").await?;
                    continue;
                }
                reply(&mut writer, "354 End data with <CR><LF>.<CR><LF>").await?;
                let mut raw: Vec<u8> = Vec::new();
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    // Dot-unstuffing (RFC 5321 §4.5.2).
                    let content = if line.first() == Some(&b'.') {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    raw.extend_from_slice(content);
                }
                let delay = *inner.delay.lock().unwrap();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if let Some(failure) = failure_at(inner, Stage::Data) {
                    inner.state.lock().unwrap().refused += 1;
                    reply(&mut writer, &failure).await?;
                } else {
                    let message = Received {
                        mail_from: mail_from.clone().unwrap_or_default(),
                        rcpt_to: rcpt_to.clone(),
                        raw: String::from_utf8_lossy(&raw).into_owned(),
                    };
                    let number = {
                        let mut state = inner.state.lock().unwrap();
                        state.messages.push(message);
                        state.messages.len()
                    };
                    inner.arrived.notify_waiters();
                    reply(
                        &mut writer,
                        &format!("250 2.0.0 Ok: queued as SINK{number}"),
                    )
                    .await?;
                }
                mail_from = None;
                rcpt_to.clear();
            }
            "RSET" => {
                mail_from = None;
                rcpt_to.clear();
                reply(&mut writer, "250 2.0.0 Ok").await?;
            }
            "NOOP" => reply(&mut writer, "250 2.0.0 Ok").await?,
            "QUIT" => {
                reply(&mut writer, "221 2.0.0 Bye").await?;
                return Ok(());
            }
            _ => reply(&mut writer, "502 5.5.2 Error: command not recognized").await?,
        }
    }
}

impl Received {
    pub fn is_to(&self, address: &str) -> bool {
        self.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(address))
    }

    /// The header block and the body, split at the first empty line.
    fn parts(&self) -> (&str, &str) {
        self.raw
            .split_once("\r\n\r\n")
            .or_else(|| self.raw.split_once("\n\n"))
            .unwrap_or((&self.raw, ""))
    }

    /// Every header as (name, unfolded value), in order.
    pub fn headers(&self) -> Vec<(String, String)> {
        let (head, _) = self.parts();
        let mut out: Vec<(String, String)> = Vec::new();
        for line in head.split('\n') {
            let line = line.trim_end_matches('\r');
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = out.last_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
            } else if let Some((name, value)) = line.split_once(':') {
                out.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        out
    }

    /// The raw (still encoded) value of header `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The subject with RFC 2047 encoded words decoded.
    pub fn subject(&self) -> String {
        decode_words(&self.header("Subject").unwrap_or_default())
    }

    pub fn message_id(&self) -> String {
        self.header("Message-ID").unwrap_or_default()
    }

    /// The `To:` header, decoded.
    pub fn to_header(&self) -> String {
        decode_words(&self.header("To").unwrap_or_default())
    }

    /// The body decoded from its Content-Transfer-Encoding, as UTF-8 with `\n` line ends.
    pub fn text(&self) -> String {
        let (_, body) = self.parts();
        let encoding = self
            .header("Content-Transfer-Encoding")
            .unwrap_or_else(|| "7bit".into())
            .to_ascii_lowercase();
        let bytes = match encoding.as_str() {
            "base64" => STANDARD
                .decode(
                    body.chars()
                        .filter(|c| !c.is_whitespace())
                        .collect::<String>(),
                )
                .unwrap_or_else(|e| panic!("a base64 body ({e}): {body}")),
            "quoted-printable" => decode_quoted_printable(body),
            _ => body.as_bytes().to_vec(),
        };
        String::from_utf8(bytes)
            .expect("a UTF-8 body")
            .replace("\r\n", "\n")
    }

    /// The one-time link in the body (`…/link/<token>`), if any.
    pub fn link(&self) -> Option<String> {
        let text = self.text();
        text.split_whitespace()
            .find(|word| word.starts_with("http") && word.contains("/link/"))
            .map(str::to_string)
    }

    /// The one-time link, or a panic that shows the mail.
    pub fn expect_link(&self) -> String {
        self.link()
            .unwrap_or_else(|| panic!("no one-time link in the mail:\n{}", self.text()))
    }
}

/// Decodes quoted-printable (RFC 2045 §6.7): `=XX` octets and `=` soft line breaks.
pub fn decode_quoted_printable(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' if bytes[i + 1..].starts_with(b"\r\n") => i += 3,
            b'=' if bytes[i + 1..].starts_with(b"\n") => i += 2,
            b'=' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(octet) => {
                        out.push(octet);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'=');
                        i += 1;
                    }
                }
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Decodes RFC 2047 encoded words (`=?charset?B?…?=`, `=?charset?Q?…?=`); whitespace between
/// adjacent encoded words is dropped, as the RFC says.
pub fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut pending_space = String::new();
    let mut previous_encoded = false;
    for (index, word) in value.split([' ', '\t']).enumerate() {
        let decoded = decode_word(word);
        if index > 0 {
            pending_space.push(' ');
        }
        match decoded {
            Some(text) => {
                if !previous_encoded {
                    out.push_str(&pending_space);
                }
                out.push_str(&text);
                previous_encoded = true;
            }
            None => {
                out.push_str(&pending_space);
                out.push_str(word);
                previous_encoded = false;
            }
        }
        pending_space.clear();
    }
    out
}

fn decode_word(word: &str) -> Option<String> {
    let inner = word.strip_prefix("=?")?.strip_suffix("?=")?;
    let mut parts = inner.splitn(3, '?');
    let (_charset, encoding, text) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = match encoding {
        "B" | "b" => STANDARD.decode(text).ok()?,
        "Q" | "q" => decode_quoted_printable(&text.replace('_', " ")),
        _ => return None,
    };
    String::from_utf8(bytes).ok()
}
