//! Just enough HTML reading for the tests: forms, their action and their inputs.

/// A `<form>` with its `action`, `method` and the `name`/`value` of its inputs.
#[derive(Debug, Clone)]
pub struct Form {
    pub action: String,
    pub method: String,
    pub inputs: Vec<(String, String)>,
}

impl Form {
    pub fn has(&self, name: &str) -> bool {
        self.inputs.iter().any(|(n, _)| n == name)
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The value of attribute `name` in one start tag.
pub fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut rest = tag;
    loop {
        let at = rest.find(&format!("{name}="))?;
        let before = rest[..at].chars().last();
        let after = &rest[at + name.len() + 1..];
        if before.is_some_and(|c| c.is_whitespace()) {
            let value = match after.chars().next() {
                Some(q @ ('"' | '\'')) => after[1..].split(q).next().unwrap_or(""),
                _ => after
                    .split(|c: char| c.is_whitespace() || c == '>')
                    .next()
                    .unwrap_or(""),
            };
            return Some(unescape(value));
        }
        rest = after;
    }
}

pub fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&#x2f;", "/")
        .replace("&#x2F;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Every start tag `<name …>` in `html`.
pub fn tags<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name}");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(&open) {
        let tail = &rest[at..];
        let next = tail[open.len()..].chars().next();
        let end = tail.find('>').map_or(tail.len(), |e| e + 1);
        if next.is_some_and(|c| c.is_whitespace() || c == '>') {
            out.push(&tail[..end]);
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// Every form of the page with its inputs (input, select and textarea names are enough here).
pub fn forms(html: &str) -> Vec<Form> {
    let mut out = Vec::new();
    for (i, chunk) in html.split("<form").enumerate() {
        if i == 0 {
            continue;
        }
        let start_end = chunk.find('>').unwrap_or(chunk.len());
        let start = format!("<form{}", &chunk[..start_end]);
        let body = chunk.split("</form>").next().unwrap_or("");
        let inputs = tags(body, "input")
            .into_iter()
            .chain(tags(body, "textarea"))
            .chain(tags(body, "select"))
            .filter_map(|tag| {
                let name = attribute(tag, "name")?;
                Some((name, attribute(tag, "value").unwrap_or_default()))
            })
            .collect();
        out.push(Form {
            action: attribute(&start, "action").unwrap_or_default(),
            method: attribute(&start, "method")
                .unwrap_or_else(|| "get".into())
                .to_ascii_lowercase(),
            inputs,
        });
    }
    out
}
