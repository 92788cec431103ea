//! Mail transports: SMTP (none / STARTTLS / TLS, optional authentication) with lettre, and a
//! development transport that writes one UTF-8 `.eml` file per message.
use std::time::Duration;

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::MailBody;
use crate::config::MailConfig;

/// How a delivery attempt ended.
#[derive(Debug)]
pub enum Delivery {
    /// Accepted; the server's reply.
    Sent(String),
    /// Try again later (server down, 4xx).
    Retry(String),
    /// Will never work (5xx, bad address).
    Permanent(String),
}

pub enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    File(std::path::PathBuf),
}

impl Transport {
    pub fn from_config(config: &MailConfig) -> anyhow::Result<Transport> {
        if config.transport == "file" {
            std::fs::create_dir_all(&config.path)?;
            return Ok(Transport::File(config.path.clone()));
        }
        let builder = match config.tls.as_str() {
            "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host)?,
            "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host)?,
            _ => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host),
        };
        let mut builder = builder
            .port(config.port)
            .timeout(Some(Duration::from_secs(10)));
        if !config.username.is_empty() {
            builder = builder.credentials(Credentials::new(
                config.username.clone(),
                config.password.expose().to_string(),
            ));
        }
        Ok(Transport::Smtp(builder.build()))
    }

    pub async fn deliver(
        &self,
        from: &str,
        body: &MailBody,
        message_id: &str,
        now: i64,
    ) -> Delivery {
        let eight_bit = matches!(self, Transport::File(_));
        let message = match build(from, body, message_id, now, eight_bit) {
            Ok(message) => message,
            Err(e) => return Delivery::Permanent(format!("cannot build the message: {e}")),
        };
        match self {
            Transport::Smtp(smtp) => match smtp.send(message).await {
                Ok(response) => Delivery::Sent(format!(
                    "{} {}",
                    response.code(),
                    response.message().collect::<Vec<_>>().join(" ")
                )),
                Err(e) if e.is_permanent() => Delivery::Permanent(e.to_string()),
                Err(e) => Delivery::Retry(e.to_string()),
            },
            Transport::File(dir) => {
                let name = format!(
                    "{now}-{}.eml",
                    message_id.trim_matches(['<', '>']).replace(['@', '/'], "_")
                );
                let tmp = dir.join(format!(".{name}.tmp"));
                let result = tokio::fs::write(&tmp, message.formatted()).await;
                match result.and(tokio::fs::rename(&tmp, dir.join(&name)).await) {
                    Ok(()) => Delivery::Sent(format!("written to {name}")),
                    Err(e) => Delivery::Retry(format!("cannot write the mail file: {e}")),
                }
            }
        }
    }
}

fn build(
    from: &str,
    body: &MailBody,
    message_id: &str,
    now: i64,
    eight_bit: bool,
) -> anyhow::Result<Message> {
    let from: Mailbox = from.parse()?;
    let to: Mailbox = body.to.parse()?;
    // Mail lines end in CRLF; the file transport keeps the text readable as 8-bit UTF-8.
    let text = body.text.replace("\r\n", "\n").replace('\n', "\r\n");
    let encoded = if eight_bit {
        // lettre picks base64 for long UTF-8 lines; 8bit allows them up to 998 bytes.
        if text.lines().all(|line| line.len() <= 998) && !text.contains('\0') {
            Body::dangerous_pre_encoded(text.into_bytes(), ContentTransferEncoding::EightBit)
        } else {
            Body::new(text)
        }
    } else {
        Body::new(text)
    };
    let part = SinglePart::builder().header(ContentType::TEXT_PLAIN);
    let date = std::time::UNIX_EPOCH + Duration::from_secs(now.max(0) as u64);
    Ok(Message::builder()
        .from(from)
        .to(to)
        .subject(body.subject.clone())
        .message_id(Some(message_id.to_string()))
        .date(date)
        .singlepart(part.body(encoded))?)
}
