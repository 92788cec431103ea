//! Student-facing pages: the page language, the ja/en message catalogs, the minijinja templates
//! (embedded in the binary, rendered strictly) and the stylesheet.

use std::collections::BTreeMap;

use anyhow::Context as _;
use minijinja::value::{merge_maps, Kwargs};
use minijinja::{context, AutoEscape, Environment, Error, UndefinedBehavior, Value};

/// The stylesheet served at `/static/nidan.css` (after the accent prefix, see [`Ui::stylesheet`]).
pub const CSS: &str = include_str!("../templates/static/nidan.css");

/// Every template, embedded so that the binary needs no files next to it.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../templates/base.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("step_up.html", include_str!("../templates/step_up.html")),
    ("error.html", include_str!("../templates/error.html")),
    (
        "logout_confirm.html",
        include_str!("../templates/logout_confirm.html"),
    ),
    (
        "logged_out.html",
        include_str!("../templates/logged_out.html"),
    ),
    ("account.html", include_str!("../templates/account.html")),
    ("demo.html", include_str!("../templates/demo.html")),
    (
        "registration_needed.html",
        include_str!("../templates/registration_needed.html"),
    ),
    // Partials (names start with "_"), included by the pages below.
    (
        "_form_errors.html",
        include_str!("../templates/_form_errors.html"),
    ),
    (
        "_email_notes.html",
        include_str!("../templates/_email_notes.html"),
    ),
    (
        "_second_password_rules.html",
        include_str!("../templates/_second_password_rules.html"),
    ),
    // Enrollment, changes, recovery, manual, development mailbox.
    (
        "enroll_email.html",
        include_str!("../templates/enroll_email.html"),
    ),
    (
        "email_sent.html",
        include_str!("../templates/email_sent.html"),
    ),
    (
        "link_confirm.html",
        include_str!("../templates/link_confirm.html"),
    ),
    (
        "link_invalid.html",
        include_str!("../templates/link_invalid.html"),
    ),
    (
        "email_registered.html",
        include_str!("../templates/email_registered.html"),
    ),
    (
        "enroll_second_password.html",
        include_str!("../templates/enroll_second_password.html"),
    ),
    (
        "second_password_set.html",
        include_str!("../templates/second_password_set.html"),
    ),
    (
        "account_email.html",
        include_str!("../templates/account_email.html"),
    ),
    (
        "email_changed.html",
        include_str!("../templates/email_changed.html"),
    ),
    (
        "account_second_password.html",
        include_str!("../templates/account_second_password.html"),
    ),
    (
        "second_password_changed.html",
        include_str!("../templates/second_password_changed.html"),
    ),
    ("forgot.html", include_str!("../templates/forgot.html")),
    ("reset.html", include_str!("../templates/reset.html")),
    (
        "reset_done.html",
        include_str!("../templates/reset_done.html"),
    ),
    ("manual.html", include_str!("../templates/manual.html")),
    ("dev_mail.html", include_str!("../templates/dev_mail.html")),
    // Mails: plain text, rendered without escaping (see Ui::render_mail).
    (
        "mail/verify_email.txt",
        include_str!("../templates/mail/verify_email.txt"),
    ),
    (
        "mail/change_email.txt",
        include_str!("../templates/mail/change_email.txt"),
    ),
    (
        "mail/email_changed_notice.txt",
        include_str!("../templates/mail/email_changed_notice.txt"),
    ),
    (
        "mail/reset.txt",
        include_str!("../templates/mail/reset.txt"),
    ),
    (
        "mail/second_password_changed_notice.txt",
        include_str!("../templates/mail/second_password_changed_notice.txt"),
    ),
];

/// Every mail: its template and the catalog key of its subject line (see [`Ui::render_mail`]).
/// Each template's context is documented at its top; all get the base context of [`Ui::render`].
pub const MAILS: &[(&str, &str)] = &[
    ("mail/verify_email.txt", "mail_subject_verify_email"),
    ("mail/change_email.txt", "mail_subject_change_email"),
    (
        "mail/email_changed_notice.txt",
        "mail_subject_email_changed",
    ),
    ("mail/reset.txt", "mail_subject_reset"),
    (
        "mail/second_password_changed_notice.txt",
        "mail_subject_second_password_changed",
    ),
];

/// A rendered plain-text mail (UTF-8): the subject line and the body, which ends with a newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedMail {
    pub subject: String,
    pub body: String,
}

const CATALOG_JA: &str = include_str!("../templates/locales/ja.toml");
const CATALOG_EN: &str = include_str!("../templates/locales/en.toml");

/// The language of a page. Japanese is the product's default.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Locale {
    Ja,
    En,
}

impl Locale {
    pub const ALL: [Locale; 2] = [Locale::Ja, Locale::En];

    pub fn as_str(self) -> &'static str {
        match self {
            Locale::Ja => "ja",
            Locale::En => "en",
        }
    }

    /// Accepts a language tag ("ja", "ja-JP", "en", "en_US", …), case-insensitively.
    pub fn parse(s: &str) -> Option<Locale> {
        let primary = s.trim().split(['-', '_']).next()?;
        if primary.eq_ignore_ascii_case("ja") {
            Some(Locale::Ja)
        } else if primary.eq_ignore_ascii_case("en") {
            Some(Locale::En)
        } else {
            None
        }
    }

    /// First match wins: explicit `lang` query/form value, then OIDC `ui_locales` (space-separated),
    /// then Accept-Language (q-values honoured), else default.
    pub fn negotiate(
        lang: Option<&str>,
        ui_locales: Option<&str>,
        accept_language: Option<&str>,
        default: Locale,
    ) -> Locale {
        lang.and_then(Locale::parse)
            .or_else(|| ui_locales.and_then(|list| list.split_whitespace().find_map(Locale::parse)))
            .or_else(|| accept_language.and_then(|header| from_accept_language(header, default)))
            .unwrap_or(default)
    }

    pub fn other(self) -> Locale {
        match self {
            Locale::Ja => Locale::En,
            Locale::En => Locale::Ja,
        }
    }

    fn index(self) -> usize {
        match self {
            Locale::Ja => 0,
            Locale::En => 1,
        }
    }
}

/// The supported language the browser prefers most (highest q; the earlier entry on a tie).
fn from_accept_language(header: &str, default: Locale) -> Option<Locale> {
    let mut best: Option<(f32, Locale)> = None;
    for entry in header.split(',') {
        let mut parts = entry.split(';');
        let tag = parts.next().unwrap_or("").trim();
        if tag.is_empty() {
            continue;
        }
        let mut quality = 1.0_f32;
        for param in parts {
            let param = param.trim();
            if let Some(value) = param
                .strip_prefix("q=")
                .or_else(|| param.strip_prefix("Q="))
            {
                // A malformed weight makes the entry unusable rather than preferred.
                quality = value.trim().parse().unwrap_or(0.0);
            }
        }
        if !(quality > 0.0 && quality <= 1.0) {
            continue;
        }
        let locale = if tag == "*" {
            Some(default)
        } else {
            Locale::parse(tag)
        };
        if let Some(locale) = locale {
            if best.is_none_or(|(best_quality, _)| quality > best_quality) {
                best = Some((quality, locale));
            }
        }
    }
    best.map(|(_, locale)| locale)
}

/// What the operator configures about the look of the pages.
#[derive(Clone, Debug)]
pub struct Branding {
    pub university_name: String,
    pub accent_color: String,
    pub logo_url: String,
    pub support_contact: String,
}

/// One locale's messages, as a map for Rust and as a template value for `t`.
struct Catalog {
    messages: BTreeMap<String, String>,
    value: Value,
}

impl Catalog {
    fn load(locale: Locale, source: &str) -> anyhow::Result<Catalog> {
        let messages: BTreeMap<String, String> = toml::from_str(source).with_context(|| {
            format!("message catalog templates/locales/{}.toml", locale.as_str())
        })?;
        let value = Value::from_serialize(&messages);
        Ok(Catalog { messages, value })
    }
}

/// The page renderer: templates, catalogs and branding, built once at start-up and shared.
pub struct Ui {
    env: Environment<'static>,
    catalogs: [Catalog; 2],
    brand: Value,
    brand_en: Value,
    stylesheet: String,
}

impl Ui {
    /// The stylesheet without the accent prefix.
    pub const CSS: &'static str = CSS;

    pub fn new(branding: Branding) -> anyhow::Result<Ui> {
        let accent = branding.accent_color.trim();
        if !is_safe_css_color(accent) {
            anyhow::bail!(
                "accent_color {:?} is not a CSS colour such as \"#1f4e8c\"",
                branding.accent_color
            );
        }

        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".txt") {
                AutoEscape::None
            } else {
                AutoEscape::Html
            }
        });
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_formatter(html_formatter);
        env.add_filter("fill", fill);
        env.add_filter("linkify", linkify);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .with_context(|| format!("template templates/{name}"))?;
        }

        let catalogs = [
            Catalog::load(Locale::Ja, CATALOG_JA)?,
            Catalog::load(Locale::En, CATALOG_EN)?,
        ];
        // English pages carry no Japanese: a Japanese-only contact is left off them.
        let contact_en = if branding.support_contact.is_ascii() {
            branding.support_contact.clone()
        } else {
            String::new()
        };
        let brand_en = context! {
            university_name => branding.university_name.clone(),
            accent_color => accent.to_string(),
            logo_url => branding.logo_url.clone(),
            support_contact => contact_en,
        };
        let brand = context! {
            university_name => branding.university_name,
            accent_color => accent,
            logo_url => branding.logo_url,
            support_contact => branding.support_contact,
        };
        let stylesheet = format!(":root{{--accent:{accent}}}\n{CSS}");
        Ok(Ui {
            env,
            catalogs,
            brand,
            brand_en,
            stylesheet,
        })
    }

    /// Renders `name` (e.g. "login.html") with `ctx` merged over the base context:
    /// `lang` ("ja"/"en"), `lang_other`, `t` (the locale's message catalog as a map), `brand`
    /// (university_name, accent_color, logo_url, support_contact).
    pub fn render(&self, name: &str, locale: Locale, ctx: Value) -> Result<String, Error> {
        let template = self.env.get_template(name)?;
        let base = context! {
            lang => locale.as_str(),
            lang_other => locale.other().as_str(),
            t => self.catalog(locale).value.clone(),
            brand => if locale == Locale::En { self.brand_en.clone() } else { self.brand.clone() },
        };
        template.render(merge_maps([base, ctx]))
    }

    /// Renders a mail of [`MAILS`] (e.g. "mail/verify_email.txt") with `ctx` merged over the base
    /// context of [`Ui::render`]; the subject is the mail's catalog message. Plain text, no escaping.
    pub fn render_mail(
        &self,
        template: &str,
        locale: Locale,
        ctx: Value,
    ) -> Result<RenderedMail, Error> {
        let Some((_, subject_key)) = MAILS.iter().find(|(name, _)| *name == template) else {
            return Err(Error::new(
                minijinja::ErrorKind::TemplateNotFound,
                format!("{template} is not a mail template"),
            ));
        };
        let mut body = self.render(template, locale, ctx)?;
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Ok(RenderedMail {
            subject: self.message(locale, subject_key),
            body,
        })
    }

    /// A catalog message for Rust-side use; falls back to the key itself if missing.
    pub fn message(&self, locale: Locale, key: &str) -> String {
        match self.catalog(locale).messages.get(key) {
            Some(message) => message.clone(),
            None => {
                debug_assert!(
                    false,
                    "message {key:?} missing from the {} catalog",
                    locale.as_str()
                );
                key.to_owned()
            }
        }
    }

    /// A catalog message with its `{name}` placeholders filled, e.g. `("until", "12:30")` for "locked".
    pub fn message_with(&self, locale: Locale, key: &str, args: &[(&str, &str)]) -> String {
        args.iter()
            .fold(self.message(locale, key), |message, (name, value)| {
                message.replace(&format!("{{{name}}}"), value)
            })
    }

    /// Whether `key` is in the catalogs (both have the same keys).
    pub fn has_message(&self, key: &str) -> bool {
        self.catalog(Locale::Ja).messages.contains_key(key)
    }

    /// The body of `/static/nidan.css`: `:root{--accent:…}` from the branding, then [`CSS`].
    pub fn stylesheet(&self) -> &str {
        &self.stylesheet
    }

    fn catalog(&self, locale: Locale) -> &Catalog {
        &self.catalogs[locale.index()]
    }
}

/// Like minijinja's escaping, but leaves `/` alone: "学内ID/学内パスワード" and "/login?…" stay
/// readable in the HTML source (and in tests that look for them); `& < > " '` are still escaped.
fn html_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    if value.is_undefined() && state.undefined_behavior() == UndefinedBehavior::Strict {
        return Err(Error::from(minijinja::ErrorKind::UndefinedError));
    }
    if state.auto_escape() != AutoEscape::Html || value.is_safe() {
        return minijinja::escape_formatter(out, state, value);
    }
    escape_html(out, &value.to_string())?;
    Ok(())
}

/// Template filter: `{{ t.locked | fill(until=until) }}` replaces `{until}`; none prints as nothing.
fn fill(message: String, args: Kwargs) -> Result<String, Error> {
    let names: Vec<String> = args.args().map(str::to_owned).collect();
    let mut message = message;
    for name in names {
        let value: Value = args.get(&name)?;
        let text = if value.is_none() || value.is_undefined() {
            String::new()
        } else {
            value.to_string()
        };
        message = message.replace(&format!("{{{name}}}"), &text);
    }
    Ok(message)
}

/// `& < > " '` escaped for HTML text and attribute values.
fn escape_html(out: &mut impl std::fmt::Write, text: &str) -> std::fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
        out.write_str(&rest[..at])?;
        out.write_str(match rest.as_bytes()[at] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => "&#x27;",
        })?;
        rest = &rest[at + 1..];
    }
    out.write_str(rest)
}

fn escape_html_into(out: &mut String, text: &str) {
    escape_html(out, text).expect("writing to a String cannot fail");
}

/// Template filter for plain text shown in HTML (the development mailbox): escapes everything and
/// turns `http://` and `https://` URLs into links. Only those two schemes ever become a link; a URL
/// ends at whitespace, a quote, `<`, `>` or a non-ASCII character, and trailing punctuation
/// (`.,;:!?)`) stays outside it.
fn linkify(text: String) -> Value {
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text.as_str();
    loop {
        let next = ["https://", "http://"]
            .iter()
            .filter_map(|scheme| rest.find(scheme).map(|at| (at, scheme.len())))
            .min();
        let Some((at, scheme_len)) = next else {
            escape_html_into(&mut out, rest);
            break;
        };
        escape_html_into(&mut out, &rest[..at]);
        let candidate = &rest[at..];
        let end = candidate
            .find(|c: char| {
                c.is_whitespace() || !c.is_ascii() || matches!(c, '<' | '>' | '"' | '\'' | '`')
            })
            .unwrap_or(candidate.len());
        let url = candidate[..end].trim_end_matches(['.', ',', ';', ':', '!', '?', ')']);
        if url.len() <= scheme_len {
            escape_html_into(&mut out, &candidate[..scheme_len]);
            rest = &candidate[scheme_len..];
            continue;
        }
        out.push_str("<a href=\"");
        escape_html_into(&mut out, url);
        out.push_str("\">");
        escape_html_into(&mut out, url);
        out.push_str("</a>");
        rest = &candidate[url.len()..];
    }
    Value::from_safe_string(out)
}

/// The accent goes into a stylesheet, so only colour syntax may pass: no `;`, braces or quotes.
fn is_safe_css_color(color: &str) -> bool {
    !color.is_empty()
        && color.len() <= 64
        && color
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "#.,%() -/".contains(c))
}

/// WCAG contrast ratio of a `#rgb`/`#rrggbb` colour against white (the text colour on the accent);
/// `None` for other colour syntaxes. Below 4.5 the pages fail WCAG AA: `check-config` can warn.
pub fn contrast_with_white(color: &str) -> Option<f64> {
    let hex = color.trim().strip_prefix('#')?;
    let expanded: String = match hex.len() {
        3 => hex.chars().flat_map(|c| [c, c]).collect(),
        6 => hex.to_owned(),
        _ => return None,
    };
    let channel = |i: usize| -> Option<f64> {
        let value = f64::from(u8::from_str_radix(expanded.get(i..i + 2)?, 16).ok()?) / 255.0;
        Some(if value <= 0.03928 {
            value / 12.92
        } else {
            ((value + 0.055) / 1.055).powf(2.4)
        })
    };
    let luminance = 0.2126 * channel(0)? + 0.7152 * channel(2)? + 0.0722 * channel(4)?;
    Some(1.05 / (luminance + 0.05))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ui() -> Ui {
        Ui::new(Branding {
            university_name: "The University".into(),
            accent_color: "#1f4e8c".into(),
            logo_url: "/static/logo.png".into(),
            support_contact: "Student Affairs 06-0000-0000".into(),
        })
        .expect("Ui::new")
    }

    fn common(menu: bool) -> Value {
        context! {
            lang_switch_url => "/login?tx=abc&lang=other",
            menu => menu,
            csrf => "csrf-token-123",
        }
    }

    /// A representative context for every page, with everything optional both present and absent.
    fn contexts(name: &str) -> Vec<Value> {
        let none = Value::from(());
        let with = |ctx: Value, menu: bool| merge_maps([common(menu), ctx]);
        match name {
            "login.html" => vec![
                with(
                    context! { tx => "abc", username => none.clone(), error => none.clone() },
                    false,
                ),
                with(
                    context! { tx => none.clone(), username => "s2401001", error => "login_failed" },
                    false,
                ),
                with(
                    context! { tx => "abc", username => "s2401001", error => "locked", until => "12:30" },
                    false,
                ),
                with(
                    context! {
                        tx => "abc", username => "s2401001", error => "password_expired",
                        password_change_url => "https://idm.example.ac.jp/",
                    },
                    false,
                ),
                with(
                    context! { tx => none.clone(), username => none.clone(), error => none.clone(), notice => "session_expired" },
                    false,
                ),
            ],
            "step_up.html" => vec![
                with(
                    context! { tx => "abc", username => "s2401001", error => none.clone() },
                    false,
                ),
                with(
                    context! { tx => none.clone(), username => "s2401001", error => "login_failed" },
                    true,
                ),
                with(
                    context! { tx => "abc", username => "s2401001", error => "locked", until => "12:30" },
                    false,
                ),
            ],
            "error.html" => vec![
                with(
                    context! {
                        title_key => "error_invalid_request_title", message_key => "error_invalid_request",
                        detail => "invalid_request", back_url => "/login",
                    },
                    false,
                ),
                with(
                    context! {
                        title_key => "error_title", message_key => "error_internal",
                        detail => none.clone(), back_url => none.clone(),
                    },
                    true,
                ),
            ],
            "logout_confirm.html" => vec![
                with(
                    context! {
                        client_id => "certificates", post_logout_redirect_uri => "https://cert.example.ac.jp/",
                        state => "xyz", ui_locales => "en ja",
                    },
                    false,
                ),
                with(
                    context! {
                        client_id => none.clone(), post_logout_redirect_uri => none.clone(),
                        state => none.clone(), ui_locales => none.clone(),
                    },
                    false,
                ),
            ],
            "logged_out.html" => vec![with(context! {}, false)],
            "account.html" => vec![
                with(
                    context! {
                        display_name => "Taro Gakusei", username => "s2401001",
                        email => "taro@example.ac.jp", notice => none.clone(),
                    },
                    true,
                ),
                with(
                    context! { display_name => none.clone(), username => "s2401001", email => none.clone() },
                    true,
                ),
            ],
            "demo.html" => vec![
                with(
                    context! {
                        start_password_url => "/demo/start?level=password",
                        start_second_password_url => "/demo/start?level=second-password",
                        result => none.clone(), error => none.clone(),
                    },
                    false,
                ),
                with(
                    context! {
                        start_password_url => "/demo/start?level=password",
                        start_second_password_url => "/demo/start?level=second-password",
                        result => context! {
                            id_token_claims => "{\n  \"sub\": \"abc\",\n  \"acr\": \"urn:nidan:acr:password\"\n}",
                            userinfo => "{\n  \"sub\": \"abc\"\n}",
                            acr => "urn:nidan:acr:password",
                        },
                        error => "access_denied",
                    },
                    false,
                ),
            ],
            "registration_needed.html" => vec![with(context! {}, false)],
            "enroll_email.html" => vec![
                with(
                    context! { tx => "abc", email => none.clone(), errors => Vec::<String>::new(), mail_from => "noreply@example.ac.jp" },
                    false,
                ),
                with(
                    context! {
                        tx => none.clone(), email => "taro@example.ac.jp",
                        errors => vec!["email_invalid", "email_mismatch"], mail_from => "noreply@example.ac.jp",
                    },
                    false,
                ),
                with(
                    context! { tx => "abc", email => none.clone(), errors => none.clone(), mail_from => "noreply@example.ac.jp" },
                    false,
                ),
            ],
            "email_sent.html" => ["verify_email", "change_email", "reset"]
                .into_iter()
                .map(|purpose| {
                    with(
                        context! { purpose => purpose, minutes => 30, mail_from => "noreply@example.ac.jp" },
                        purpose == "change_email",
                    )
                })
                .collect(),
            "link_confirm.html" => vec![
                with(
                    context! { purpose => "verify_email", email => "taro@example.ac.jp", action => "/link/tok123" },
                    false,
                ),
                with(
                    context! { purpose => "change_email", email => "new@example.ac.jp", action => "/link/tok123" },
                    true,
                ),
                with(
                    context! { purpose => "verify_email", email => none.clone(), action => "/link/tok123" },
                    false,
                ),
            ],
            "link_invalid.html" => ["expired", "used", "invalid"]
                .into_iter()
                .map(|reason| with(context! { reason => reason }, false))
                .collect(),
            "email_registered.html" => vec![with(context! { login_url => "/login" }, false)],
            "enroll_second_password.html" => vec![
                with(context! { tx => "abc", errors => Vec::<String>::new() }, false),
                with(
                    context! {
                        tx => none.clone(),
                        errors => vec!["rule_too_short", "rule_no_uppercase", "rule_no_digit", "rule_confirmation_mismatch"],
                    },
                    false,
                ),
                with(
                    context! { tx => "abc", errors => vec!["full_login_required"] },
                    false,
                ),
            ],
            "second_password_set.html" => vec![with(context! { next_url => "/login?tx=abc" }, false)],
            "account_email.html" => vec![
                with(
                    context! { email => none.clone(), errors => Vec::<String>::new(), mail_from => "noreply@example.ac.jp" },
                    true,
                ),
                with(
                    context! {
                        email => "new@example.ac.jp", errors => vec!["email_domain_not_allowed", "rule_current_wrong"],
                        mail_from => "noreply@example.ac.jp",
                    },
                    true,
                ),
            ],
            "email_changed.html" => vec![with(context! { next_url => "/account" }, true)],
            "account_second_password.html" => vec![
                with(context! { errors => Vec::<String>::new() }, true),
                with(
                    context! { errors => vec!["rule_current_wrong", "rule_half_width", "rule_too_long", "rule_same_as_university_password"] },
                    true,
                ),
                with(
                    context! { errors => vec!["locked"], until => "12:30" },
                    true,
                ),
            ],
            "second_password_changed.html" => vec![with(context! { next_url => "/account" }, true)],
            "forgot.html" => vec![
                with(context! { errors => Vec::<String>::new(), email => none.clone() }, false),
                // The server may leave out the optional prefill and sender address.
                with(context! { errors => vec!["email_invalid"] }, false),
                with(
                    context! { errors => vec!["email_required"], email => "x@example.ac.jp", mail_from => "noreply@example.ac.jp" },
                    false,
                ),
            ],
            "reset.html" => vec![
                with(
                    context! { action => "/link/tok456", errors => Vec::<String>::new() },
                    false,
                ),
                with(
                    context! {
                        action => "/link/tok456", username => "s2401001",
                        errors => vec!["reset_wrong_account_or_password", "rule_no_lowercase"],
                    },
                    false,
                ),
                with(
                    context! { action => "/link/tok456", username => none.clone(), errors => vec!["reset_refused_recent_email_change"] },
                    false,
                ),
            ],
            "reset_done.html" => vec![with(context! {}, false)],
            "manual.html" => vec![with(context! {}, true), with(context! {}, false)],
            "dev_mail.html" => vec![
                with(context! { mails => Vec::<Value>::new() }, false),
                with(
                    context! {
                        mails => vec![
                            context! {
                                id => "m2", to => "taro@example.ac.jp", subject => "Second password reset",
                                created => "2025-04-01 12:35:00",
                                body => "Please open:\n\nhttp://localhost:8080/link/abc?x=1&y=<2>\n\nvalid for 30 minutes.",
                            },
                            context! {
                                id => "m1", to => "taro@example.ac.jp", subject => "Email address registration",
                                created => "2025-04-01 12:34:00", body => "No links here.",
                            },
                        ],
                    },
                    false,
                ),
            ],
            other => panic!("no test context for {other}"),
        }
    }

    /// Every full page: not the layout, the partials ("_*.html") or the mails ("mail/*.txt").
    fn pages() -> impl Iterator<Item = &'static str> {
        TEMPLATES.iter().map(|(name, _)| *name).filter(|name| {
            *name != "base.html" && !name.starts_with('_') && name.ends_with(".html")
        })
    }

    fn renders() -> Vec<(String, Locale, String)> {
        let ui = ui();
        let mut out = Vec::new();
        for name in pages() {
            for locale in Locale::ALL {
                for ctx in contexts(name) {
                    let html = ui
                        .render(name, locale, ctx)
                        .unwrap_or_else(|e| panic!("{name} ({}) failed: {e:#}", locale.as_str()));
                    out.push((name.to_owned(), locale, html));
                }
            }
        }
        out
    }

    fn is_japanese(c: char) -> bool {
        matches!(c,
            '\u{3000}'..='\u{303F}' // CJK punctuation
            | '\u{3040}'..='\u{30FF}' // hiragana, katakana
            | '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}' // kanji
            | '\u{FF00}'..='\u{FFEF}' // full-width forms
        )
    }

    /// `(tag text)` of every `<input …>` in the page.
    fn inputs(html: &str) -> Vec<&str> {
        html.match_indices("<input")
            .map(|(start, _)| &html[start..start + html[start..].find('>').unwrap() + 1])
            .collect()
    }

    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let needle = format!(" {name}=\"");
        let start = tag.find(&needle)? + needle.len();
        Some(&tag[start..start + tag[start..].find('"')?])
    }

    #[test]
    fn every_template_renders_in_both_languages() {
        let rendered = renders();
        assert!(rendered.len() >= 2 * pages().count());
        assert!(
            pages().count() >= 24,
            "the enrollment and recovery pages are registered"
        );
        for (name, locale, html) in &rendered {
            assert!(html.starts_with("<!DOCTYPE html>"), "{name}");
            assert!(
                html.contains(&format!("<html lang=\"{}\">", locale.as_str())),
                "{name}"
            );
            assert!(
                html.contains(
                    r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#
                ),
                "{name}"
            );
            assert!(
                html.contains(r#"<link rel="stylesheet" href="/static/nidan.css">"#),
                "{name}"
            );
            assert!(html.contains("The University"), "{name}");
            assert!(
                !html.contains("{until}") && !html.contains("{name}"),
                "{name}: unfilled placeholder"
            );
            assert_eq!(unfilled_placeholder(html), None, "{name}");
        }
    }

    /// The first `{word}` left in a rendered text, if any.
    fn unfilled_placeholder(text: &str) -> Option<String> {
        text.match_indices('{').find_map(|(i, _)| {
            let word: String = text[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            (!word.is_empty() && text[i + 1 + word.len()..].starts_with('}'))
                .then(|| format!("{{{word}}}"))
        })
    }

    #[test]
    fn pages_have_no_inline_style_or_script() {
        for (name, _, html) in renders() {
            let lower = html.to_lowercase();
            assert!(!lower.contains("<script"), "{name}");
            assert!(
                !lower.contains(" style=") && !lower.contains("<style"),
                "{name}"
            );
            let handler = lower.match_indices(" on").any(|(i, _)| {
                let rest = &lower[i + 3..];
                let word = rest.chars().take_while(|c| c.is_ascii_lowercase()).count();
                word > 0 && rest[word..].starts_with('=')
            });
            assert!(!handler, "{name}: inline event handler");
        }
    }

    #[test]
    fn english_pages_have_no_japanese_except_the_switch() {
        for (name, locale, html) in renders() {
            if locale != Locale::En {
                continue;
            }
            assert!(html.contains(">日本語</a>"), "{name}: no language switch");
            let rest = html.replace("日本語", "");
            let found: String = rest.chars().filter(|c| is_japanese(*c)).collect();
            assert!(
                found.is_empty(),
                "{name}: Japanese text on an English page: {found}"
            );
        }
        for (name, locale, html) in renders() {
            if locale == Locale::Ja {
                assert!(html.contains(">English</a>"), "{name}: no language switch");
            }
        }
    }

    #[test]
    fn every_input_has_a_label_and_passwords_are_empty() {
        for (name, _, html) in renders() {
            for tag in inputs(&html) {
                let kind = attr(tag, "type").unwrap_or("text");
                if kind == "hidden" {
                    continue;
                }
                let id =
                    attr(tag, "id").unwrap_or_else(|| panic!("{name}: input without id: {tag}"));
                assert!(
                    html.contains(&format!("<label for=\"{id}\">")),
                    "{name}: no label for {id}"
                );
                if kind == "password" {
                    assert!(
                        attr(tag, "value").is_none(),
                        "{name}: password field with a value: {tag}"
                    );
                    let expected = if id.starts_with("new_") {
                        "new-password"
                    } else {
                        "current-password"
                    };
                    assert_eq!(attr(tag, "autocomplete"), Some(expected), "{name}: {tag}");
                    assert_eq!(attr(tag, "name"), Some(id), "{name}: {tag}");
                }
                if kind == "email" {
                    assert_eq!(attr(tag, "autocomplete"), Some("email"), "{name}: {tag}");
                    assert!(
                        matches!(attr(tag, "name"), Some("email" | "email_confirm")),
                        "{name}: {tag}"
                    );
                    if attr(tag, "name") == Some("email_confirm") {
                        assert_eq!(
                            attr(tag, "value"),
                            Some(""),
                            "{name}: confirmation prefilled"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn login_page_matches_the_seed() {
        let ui = ui();
        let ctx = merge_maps([
            common(false),
            context! { tx => "abc", username => "s2401001", error => "login_failed" },
        ]);
        let html = ui.render("login.html", Locale::Ja, ctx).unwrap();
        for text in [
            "在学生ログイン",
            "ユーザID",
            "パスワード",
            "第2パスワード",
            "第2パスワードを忘れた場合",
            "注意事項",
            "！注意事項は必ずお読みください",
            "初回ログイン時は、学内ID/学内パスワードでログインしてください。",
            "利用後は必ずログアウトし、ブラウザも閉じるようにしてください。",
            "ログイン後、操作がないまま一定時間が経過すると、自動的にログアウトします。",
            "◎ログイン出来ない場合は、以下をご確認ください。",
            "パスワードの入力が正しいか。",
            "大文字/小文字の入力が正しいか。",
            "半角英数文字で入力しているか。",
            "ユーザID、パスワードまたは第2パスワードが正しくありません。",
        ] {
            assert!(html.contains(text), "missing {text}");
        }
        assert!(html.contains(r#"<form class="form" method="post" action="/login">"#));
        assert!(html.contains(r#"<input type="hidden" name="csrf" value="csrf-token-123">"#));
        assert!(html.contains(r#"<input type="hidden" name="tx" value="abc">"#));
        assert!(html
            .contains(r#"name="username" type="text" value="s2401001" autocomplete="username""#));
        assert!(html.contains(r#"<p class="hint" id="second-password-hint">"#));
        assert!(html.contains(r#"role="alert" id="login-error""#));
        assert!(html.contains(r#"aria-describedby="login-error""#));
        assert!(html.contains(r#"href="/forgot""#));
        assert!(html.contains(">ログイン</button>"));
        assert!(!html.contains("<details"), "no menu before login");

        let ctx = merge_maps([
            common(false),
            context! { tx => (), username => (), error => () },
        ]);
        let html = ui.render("login.html", Locale::En, ctx).unwrap();
        assert!(!html.contains(r#"name="tx""#));
        assert!(!html.contains("role=\"alert\""));
        assert!(!html.contains("aria-describedby=\"login-error\""));
        assert!(html.contains(r#"type="text" value="" autocomplete"#));
        assert!(html.contains("Student Login"));
    }

    #[test]
    fn locked_message_shows_time_and_contact() {
        let ui = ui();
        let ctx = merge_maps([
            common(false),
            context! { tx => (), username => "s1", error => "locked", until => "12:30" },
        ]);
        let html = ui.render("step_up.html", Locale::Ja, ctx).unwrap();
        assert!(html.contains("12:30 まで"));
        assert!(html.contains("Student Affairs 06-0000-0000"));
        assert!(html.contains(r#"action="/login/step-up""#));
        assert!(
            !html.contains(r#"name="username""#),
            "step-up has no username field"
        );
        assert!(
            !html.contains(r#"name="password""#),
            "step-up has no password field"
        );
        assert_eq!(
            ui.message_with(Locale::En, "locked", &[("until", "12:30")]),
            "Because of repeated wrong second passwords, logging in with the second password is blocked until 12:30."
        );
    }

    #[test]
    fn menu_is_a_gear_with_four_items_and_a_logout_post() {
        let ui = ui();
        let ctx = merge_maps([
            common(true),
            context! { display_name => "Taro", username => "s2401001", email => "t@example.ac.jp" },
        ]);
        let html = ui.render("account.html", Locale::Ja, ctx.clone()).unwrap();
        assert!(html.contains("<details class=\"menu\">"));
        assert!(html.contains("<span class=\"visually-hidden\">メニュー</span>"));
        for (href, text) in [
            ("/account/email", "メールアドレス変更"),
            ("/account/second-password", "第2パスワード変更"),
            ("/manual", "マニュアル"),
        ] {
            assert!(html.contains(&format!(r#"<a class="menu-item" href="{href}">{text}</a>"#)));
        }
        assert!(html.contains(r#"<form class="menu-logout" method="post" action="/logout">"#));
        assert!(html.contains(r#"<button class="menu-item" type="submit">ログアウト</button>"#));
        assert!(html.contains("Taro さん（ユーザID: s2401001）"));
        let html = ui.render("account.html", Locale::En, ctx).unwrap();
        assert!(html.contains("<span class=\"visually-hidden\">Menu</span>"));
    }

    #[test]
    fn logged_out_page_has_no_form_and_confirm_page_has_one() {
        let ui = ui();
        let html = ui
            .render("logged_out.html", Locale::Ja, common(false))
            .unwrap();
        assert!(!html.contains("<form"));
        assert!(html.contains("role=\"status\""));
        let ctx = merge_maps([
            common(false),
            context! { client_id => "c1", post_logout_redirect_uri => (), state => "s", ui_locales => () },
        ]);
        let html = ui.render("logout_confirm.html", Locale::En, ctx).unwrap();
        assert!(html.contains(r#"<input type="hidden" name="client_id" value="c1">"#));
        assert!(html.contains(r#"<input type="hidden" name="state" value="s">"#));
        assert!(!html.contains("post_logout_redirect_uri"));
        assert!(!html.contains(r#"name="ui_locales""#));
        assert!(html.contains(">Log out</button>"));
    }

    #[test]
    fn values_are_escaped() {
        let ui = ui();
        let ctx = merge_maps([
            common(false),
            context! { tx => "\"><script>", username => "<script>alert(1)</script>", error => () },
        ]);
        let html = ui.render("login.html", Locale::Ja, ctx).unwrap();
        assert!(!html.contains("<script"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains(r#"name="tx" value="&quot;&gt;&lt;script&gt;""#));
    }

    #[test]
    fn missing_context_is_an_error() {
        let ui = ui();
        assert!(ui.render("login.html", Locale::Ja, common(false)).is_err());
        assert!(ui.render("nope.html", Locale::Ja, common(false)).is_err());
        assert!(
            ui.env.render_str("{{ nope }}", context! {}).is_err(),
            "printing undefined"
        );
        assert!(ui
            .env
            .render_str("{{ t.nope }}", context! { t => context! {} })
            .is_err());
        assert_eq!(
            ui.env
                .render_str("{{ a }}", context! { a => "a/b&<'\"" })
                .unwrap(),
            "a/b&amp;&lt;&#x27;&quot;"
        );
    }

    #[test]
    fn catalogs_have_the_same_keys() {
        let ja: BTreeSet<_> = ui().catalogs[0].messages.keys().cloned().collect();
        let en: BTreeSet<_> = ui().catalogs[1].messages.keys().cloned().collect();
        assert_eq!(
            ja.symmetric_difference(&en).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "ja.toml and en.toml differ"
        );
        for (key, message) in &ui().catalogs[1].messages {
            let japanese = message.chars().any(is_japanese);
            assert!(
                !japanese || key == "lang_switch",
                "en.toml {key} is not English: {message}"
            );
        }
    }

    #[test]
    fn keys_the_server_uses_exist() {
        let ui = ui();
        // Messages of the login and step-up pages (`error`).
        for key in [
            "login_failed",
            "csrf_failed",
            "directory_unavailable",
            "request_expired",
            "second_password_required",
            "locked",
            "too_many_attempts",
            "password_expired",
            "username_required",
            "password_required",
            "second_password_empty",
            "session_expired",
        ] {
            assert!(ui.has_message(key), "{key}");
        }
        // The error page: a generic title, and a title and message per error.
        assert!(ui.has_message("error_title"));
        for key in [
            "error_invalid_request",
            "error_unknown_client",
            "error_bad_redirect_uri",
            "error_request_expired",
            "error_directory_unavailable",
            "error_internal",
            "error_csrf",
            "error_not_found",
            "registration_needed",
        ] {
            assert!(ui.has_message(&format!("{key}_title")), "{key}_title");
            if key != "registration_needed" {
                assert!(ui.has_message(key), "{key}");
            } else {
                assert!(ui.has_message("registration_needed_message"));
            }
        }
        // Errors of the enrollment, change and recovery forms (`errors`, one line each).
        for key in [
            "email_required",
            "email_confirm_required",
            "email_invalid",
            "email_mismatch",
            "email_domain_not_allowed",
            "email_same_as_current",
            "current_second_password_required",
            "rule_too_short",
            "rule_too_long",
            "rule_no_uppercase",
            "rule_no_lowercase",
            "rule_no_digit",
            "rule_half_width",
            "rule_confirmation_mismatch",
            "rule_same_as_university_password",
            "rule_current_wrong",
            "full_login_required",
            "reset_wrong_account_or_password",
            "reset_refused_recent_email_change",
        ] {
            assert!(ui.has_message(key), "{key}");
        }
        for (_, subject) in MAILS {
            assert!(ui.has_message(subject), "{subject}");
        }
        assert_eq!(ui.message(Locale::Ja, "login_title"), "在学生ログイン");
        assert_eq!(ui.message(Locale::En, "login_title"), "Student Login");
    }

    #[test]
    fn every_catalog_reference_in_templates_exists() {
        let ui = ui();
        for (name, source) in TEMPLATES {
            let bytes = source.as_bytes();
            for (i, _) in source.match_indices("t.") {
                let before = if i == 0 { b' ' } else { bytes[i - 1] };
                if before.is_ascii_alphanumeric() || before == b'_' || before == b'.' {
                    continue;
                }
                let key: String = source[i + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    !key.is_empty() && ui.has_message(&key),
                    "{name}: t.{key} not in the catalogs"
                );
            }
        }
    }

    #[test]
    fn stylesheet_carries_the_accent() {
        let ui = ui();
        assert!(ui.stylesheet().starts_with(":root{--accent:#1f4e8c}\n"));
        assert!(ui.stylesheet().ends_with(CSS));
        assert!(CSS.contains("var(--accent"));
        for bad in ["red;}body{display:none", "#fff\"", "", "{"] {
            let branding = Branding {
                university_name: "U".into(),
                accent_color: bad.into(),
                logo_url: String::new(),
                support_contact: String::new(),
            };
            assert!(Ui::new(branding).is_err(), "{bad:?} accepted");
        }
        let default = contrast_with_white("#1f4e8c").unwrap();
        assert!(default > 4.5, "{default}");
        assert!(contrast_with_white("#ffff00").unwrap() < 4.5);
        assert!((contrast_with_white("#000").unwrap() - 21.0).abs() < 0.01);
        assert_eq!(contrast_with_white("navy"), None);
    }

    fn page(name: &str, locale: Locale, menu: bool, ctx: Value) -> String {
        ui().render(name, locale, merge_maps([common(menu), ctx]))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"))
    }

    /// The text of the `role="alert"` box (from its opening tag to its `</div>`).
    fn alert_box(html: &str) -> &str {
        let start = html.find("role=\"alert\"").expect("an alert box");
        &html[start..start + html[start..].find("</div>").unwrap()]
    }

    #[test]
    fn enrollment_pages_match_the_seed() {
        let none = Value::from(());
        let html = page(
            "enroll_email.html",
            Locale::Ja,
            false,
            context! { tx => "abc", email => none.clone(), errors => Vec::<String>::new(), mail_from => "noreply@example.ac.jp" },
        );
        for text in [
            "<title>メールアドレス設定 | The University</title>",
            "<label for=\"email\">メールアドレス</label>",
            "<label for=\"email_confirm\">確認</label>",
            "！注意事項は必ずお読みください",
            "「確認」ボタンを押すと、指定のメールアドレスに確認メールが送信されます。",
            "確認メールに記載されたURLにアクセスし、メールアドレスの設定を完了して下さい。",
            "確認メールの送信までには、少々時間がかかる場合があります。",
            "フリーメールアドレスの場合、確認メールを受信出来ない可能性があります。",
            "※迷惑メールフィルタ等で、確認メールを受信出来ない場合があります。事前に、許可リストへ以下のアドレスを追加するようにして下さい。",
            "アドレス: <span class=\"address\">noreply@example.ac.jp</span>",
            "30分経っても確認メールが届かない場合は、以下をご確認ください。",
            "メールアドレスの入力が正しいか。",
            "余分なスペース等を誤って入力していないか。",
            "迷惑メールフィルタ許可リストへ追加したメールアドレスが正しいか。",
            "<form class=\"form\" method=\"post\" action=\"/enroll/email\" novalidate>",
            "<input type=\"hidden\" name=\"tx\" value=\"abc\">",
            "<input type=\"hidden\" name=\"lang\" value=\"ja\">",
            ">確認</button>",
        ] {
            assert!(html.contains(text), "enroll_email: missing {text}");
        }
        assert!(!html.contains("role=\"alert\""));
        assert!(html.contains(r#"name="email" type="email" value="" autocomplete="email""#));

        let html = page(
            "email_sent.html",
            Locale::Ja,
            false,
            context! { purpose => "verify_email", minutes => 30, mail_from => "noreply@example.ac.jp" },
        );
        assert!(html.contains("<div class=\"status\" role=\"status\">\n  <p>確認メールを送信しました。確認メールに記載されたURLにアクセスし、メールアドレスの設定を完了してください。</p>"));
        assert!(html.contains("URLの有効期限は30分です。"));
        assert!(html.contains("noreply@example.ac.jp"));

        let html = page(
            "email_registered.html",
            Locale::Ja,
            false,
            context! { login_url => "/login" },
        );
        assert!(html.contains("メールアドレス設定完了"));
        assert!(html.contains("メールアドレスを設定しました。今後、システムからの連絡はこのメールアドレス宛に送信されます。メールアドレスはログイン後のメニューから変更可能です。"));
        assert!(html.contains(
            r#"<a class="button button-primary" href="/login">ログインページへ移動</a>"#
        ));
        assert!(html.contains("role=\"status\""));

        let html = page(
            "enroll_second_password.html",
            Locale::Ja,
            false,
            context! { tx => "abc", errors => Vec::<String>::new() },
        );
        for text in [
            "<title>第2パスワード設定 | The University</title>",
            "<label for=\"new_second_password\">第2パスワード</label>",
            "<label for=\"new_second_password_confirm\">確認</label>",
            "セキュリティ向上の為、第2パスワードを設定してください。",
            "次回ログイン時より、パスワードと併せて第2パスワードも入力してください。",
            "第2パスワードはログイン後のメニューから変更可能です。",
            "第2パスワードは下記ルールに従い設定してください。",
            "8文字以上であること。",
            "1文字以上の半角英大文字(A-Z)が含まれること。",
            "1文字以上の半角英小文字(a-z)が含まれること。",
            "1文字以上の半角数字(0-9)が含まれること。",
            "半角英数字以外を含まないこと。",
            "64文字",
            "大学で利用しているパスワードは設定しないでください",
            "action=\"/enroll/second-password\"",
            ">設定</button>",
        ] {
            assert!(
                html.contains(text),
                "enroll_second_password: missing {text}"
            );
        }
        let html = page(
            "second_password_set.html",
            Locale::Ja,
            false,
            context! { next_url => "/login?tx=abc" },
        );
        assert!(html.contains("変更完了"));
        assert!(html.contains("<p>第2パスワードが設定されました</p>"));
        assert!(html.contains(r#"href="/login?tx=abc">OK</a>"#));

        let html = page(
            "account_second_password.html",
            Locale::Ja,
            true,
            context! { errors => Vec::<String>::new() },
        );
        for text in [
            "<title>第2パスワード変更 | The University</title>",
            "<label for=\"current_second_password\">現在の第2パスワード</label>",
            "<label for=\"new_second_password\">新しい第2パスワード</label>",
            "<label for=\"new_second_password_confirm\">確認</label>",
            "<a class=\"button button-secondary\" href=\"/account\">戻る</a>",
            ">変更</button>",
            "1文字以上の半角数字(0-9)が含まれること。",
        ] {
            assert!(
                html.contains(text),
                "account_second_password: missing {text}"
            );
        }
        let html = page(
            "second_password_changed.html",
            Locale::Ja,
            true,
            context! { next_url => "/account" },
        );
        assert!(html.contains("<p>第2パスワードは変更されました</p>"));
        assert!(html.contains(r#"href="/account">OK</a>"#));

        let html = page(
            "account_email.html",
            Locale::Ja,
            true,
            context! { email => none.clone(), errors => Vec::<String>::new(), mail_from => "noreply@example.ac.jp" },
        );
        for text in [
            "<title>メールアドレス変更 | The University</title>",
            "<label for=\"email\">新しいメールアドレス</label>",
            "<label for=\"email_confirm\">確認</label>",
            "<label for=\"current_second_password\">現在の第2パスワード</label>",
            "action=\"/account/email\"",
            ">戻る</a>",
            ">確認</button>",
            "noreply@example.ac.jp",
        ] {
            assert!(html.contains(text), "account_email: missing {text}");
        }

        let html = page(
            "forgot.html",
            Locale::Ja,
            false,
            context! { errors => Vec::<String>::new(), email => none.clone() },
        );
        for text in [
            "第2パスワードリセット",
            "第2パスワードを忘れた場合",
            "メールアドレス</label>",
            "登録しているメールアドレスを入力し、「送信」ボタンを押してください。",
            "「送信」ボタンを押すと、登録しているメールアドレスにリセットメールが届きます。",
            "リセットメールに記載されたURLにアクセスし、再設定を完了してください。",
            "リセットメールの送信までには、少々時間がかかる場合があります。",
            "action=\"/forgot\"",
            ">送信</button>",
            "href=\"/login\"",
        ] {
            assert!(html.contains(text), "forgot: missing {text}");
        }

        let html = page(
            "reset.html",
            Locale::Ja,
            false,
            context! { action => "/link/tok456", errors => Vec::<String>::new() },
        );
        for text in [
            "action=\"/link/tok456\"",
            "<label for=\"username\">ユーザID</label>",
            "<label for=\"password\">パスワード</label>",
            "<label for=\"new_second_password\">第2パスワード</label>",
            "<label for=\"new_second_password_confirm\">確認</label>",
            r#"name="username" type="text" value="" autocomplete="username""#,
            ">設定</button>",
        ] {
            assert!(html.contains(text), "reset: missing {text}");
        }
        let html = page("reset_done.html", Locale::Ja, false, context! {});
        assert!(html.contains("<p>第2パスワードが設定されました</p>"));
        assert!(html.contains(r#"href="/login">OK</a>"#));
    }

    #[test]
    fn each_error_is_its_own_line_in_one_alert() {
        let keys = [
            "rule_too_short",
            "rule_no_uppercase",
            "rule_no_digit",
            "rule_confirmation_mismatch",
        ];
        for locale in Locale::ALL {
            let html = page(
                "enroll_second_password.html",
                locale,
                false,
                context! { tx => "abc", errors => keys.to_vec() },
            );
            assert_eq!(html.matches("role=\"alert\"").count(), 1);
            let alert = alert_box(&html);
            assert!(alert.contains("id=\"form-errors\""));
            assert_eq!(alert.matches("<p>").count(), keys.len(), "{alert}");
            for key in keys {
                let line = format!("<p>{}</p>", escaped(&ui().message(locale, key)));
                assert!(alert.contains(&line), "{line} not in {alert}");
            }
            for tag in inputs(&html) {
                if attr(tag, "type") != Some("hidden") {
                    let described = attr(tag, "aria-describedby").unwrap_or("");
                    assert!(described.split(' ').any(|id| id == "form-errors"), "{tag}");
                }
            }
        }
        // No errors: no box, and no input points at a box that is not there.
        let html = page(
            "account_second_password.html",
            Locale::Ja,
            true,
            context! { errors => Vec::<String>::new() },
        );
        assert!(!html.contains("role=\"alert\""));
        assert!(!html.contains("form-errors"));
        // full_login_required offers the way back; locked shows the time and the contact.
        let html = page(
            "enroll_second_password.html",
            Locale::Ja,
            false,
            context! { tx => (), errors => vec!["full_login_required"] },
        );
        assert!(alert_box(&html).contains("href=\"/login\""));
        let html = page(
            "account_second_password.html",
            Locale::Ja,
            true,
            context! { errors => vec!["locked"], until => "12:30" },
        );
        assert!(alert_box(&html).contains("12:30 まで"));
        assert!(alert_box(&html).contains("Student Affairs 06-0000-0000"));
        let html = page(
            "account_email.html",
            Locale::Ja,
            true,
            context! { email => "a@example.ac.jp", errors => vec!["locked"], mail_from => "n@example.ac.jp" },
        );
        assert!(alert_box(&html).contains(&ui().message(Locale::Ja, "locked_no_time")));
        assert!(!alert_box(&html).contains(" まで"));
        let html = page(
            "reset.html",
            Locale::En,
            false,
            context! { action => "/link/t", errors => vec!["reset_refused_recent_email_change"] },
        );
        assert!(alert_box(&html).contains("72 hours"));
        assert!(alert_box(&html).contains("Student Affairs 06-0000-0000"));
    }

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        escape_html_into(&mut out, text);
        out
    }

    #[test]
    fn reset_sent_page_does_not_say_whether_the_address_is_registered() {
        let ctx =
            context! { purpose => "reset", minutes => 30, mail_from => "noreply@example.ac.jp" };
        let html = page("email_sent.html", Locale::En, false, ctx.clone());
        assert!(html.contains("If the address is registered, we have sent a mail"));
        assert!(html.contains("valid for 30 minutes"));
        assert!(html.contains("role=\"status\""));
        let html = page("email_sent.html", Locale::Ja, false, ctx);
        assert!(html.contains("入力されたメールアドレスが登録されている場合は"));
        let html = page(
            "email_sent.html",
            Locale::Ja,
            true,
            context! { purpose => "change_email", minutes => 45, mail_from => "noreply@example.ac.jp" },
        );
        assert!(html.contains("メールアドレスの変更を完了してください。"));
        assert!(html.contains("URLの有効期限は45分です。"));
        assert!(html.contains("href=\"/account\""));
    }

    #[test]
    fn link_pages_consume_only_on_post_and_explain_failures() {
        for (purpose, text) in [
            ("verify_email", "次のメールアドレスの登録を完了します。"),
            ("change_email", "メールアドレスを次のアドレスに変更します。"),
        ] {
            let html = page(
                "link_confirm.html",
                Locale::Ja,
                false,
                context! { purpose => purpose, email => "a&b@example.ac.jp", action => "/link/tok123" },
            );
            assert!(html.contains(text), "{purpose}");
            assert!(html.contains(r#"<form class="form" method="post" action="/link/tok123">"#));
            assert!(html.contains(r#"<input type="hidden" name="csrf" value="csrf-token-123">"#));
            assert!(html.contains(">確認</button>"));
            assert!(html.contains("a&amp;b@example.ac.jp"));
        }
        let html = page(
            "link_confirm.html",
            Locale::En,
            false,
            context! { purpose => "verify_email", email => (), action => "/link/tok123" },
        );
        assert!(html.contains(">Confirm</button>"));
        for (reason, ja, en) in [
            ("expired", "有効期限が切れています", "has expired"),
            ("used", "すでに使用されています", "already been used"),
            ("invalid", "このURLは無効です", "is not valid"),
        ] {
            let html = page(
                "link_invalid.html",
                Locale::Ja,
                false,
                context! { reason => reason },
            );
            assert!(html.contains(ja), "{reason}");
            assert!(html.contains("href=\"/forgot\""));
            assert!(html.contains("href=\"/login\""));
            assert!(!html.contains("<form"));
            let html = page(
                "link_invalid.html",
                Locale::En,
                false,
                context! { reason => reason },
            );
            assert!(html.contains(en), "{reason}");
        }
    }

    #[test]
    fn only_login_and_reset_ask_for_university_credentials() {
        for (name, _, html) in renders() {
            let asks = html.contains(r#"name="username""#) || html.contains(r#"name="password""#);
            assert_eq!(
                asks,
                name == "login.html" || name == "reset.html",
                "{name}: username/password fields"
            );
        }
    }

    #[test]
    fn every_form_carries_csrf_and_lang() {
        for (name, locale, html) in renders() {
            let forms = html.matches("<form").count();
            assert_eq!(
                html.matches(r#"<input type="hidden" name="csrf" value="csrf-token-123">"#)
                    .count(),
                forms,
                "{name}"
            );
            let lang = format!(
                r#"<input type="hidden" name="lang" value="{}">"#,
                locale.as_str()
            );
            assert_eq!(html.matches(&lang).count(), forms, "{name}");
            for (at, _) in html.match_indices("<form") {
                let tag = &html[at..at + html[at..].find('>').unwrap()];
                assert!(tag.contains(r#"method="post""#), "{name}: {tag}");
            }
        }
    }

    #[test]
    fn manual_covers_the_flows_in_both_languages() {
        let ja = page("manual.html", Locale::Ja, true, context! {});
        for text in [
            "<title>マニュアル | The University</title>",
            "メールアドレスの登録",
            "第2パスワードの設定",
            "第2パスワードの確認",
            "メールアドレスの変更",
            "第2パスワードの変更",
            "第2パスワードを忘れた場合",
            "自動的にログアウト",
            "困ったときは",
            "Student Affairs 06-0000-0000",
            "1文字以上の半角英大文字(A-Z)が含まれること。",
        ] {
            assert!(ja.contains(text), "manual ja: missing {text}");
        }
        let en = page("manual.html", Locale::En, false, context! {});
        for text in [
            "<title>Manual | The University</title>",
            "First login",
            "If you forget the second password",
            "Troubleshooting",
            "Student Affairs 06-0000-0000",
        ] {
            assert!(en.contains(text), "manual en: missing {text}");
        }
        // Every in-page link has its target.
        for html in [&ja, &en] {
            for (at, _) in html.match_indices("href=\"#") {
                let id: String = html[at + 7..].chars().take_while(|c| *c != '"').collect();
                assert!(html.contains(&format!(" id=\"{id}\"")), "no #{id}");
            }
        }
    }

    #[test]
    fn dev_mailbox_escapes_bodies_and_links_urls() {
        let html = page(
            "dev_mail.html",
            Locale::En,
            false,
            context! { mails => vec![context! {
                id => "m1", to => "t@example.ac.jp", subject => "<b>s</b>", created => "2025-04-01",
                body => "Open http://localhost:8080/link/abc?x=1&y=2.\n<script>alert(1)</script>",
            }] },
        );
        assert!(!html.contains("<script"));
        assert!(!html.contains("<b>"));
        assert!(html.contains("&lt;b&gt;s&lt;/b&gt;"));
        assert!(html.contains(
            r#"<a href="http://localhost:8080/link/abc?x=1&amp;y=2">http://localhost:8080/link/abc?x=1&amp;y=2</a>."#
        ));
        let html = page(
            "dev_mail.html",
            Locale::Ja,
            false,
            context! { mails => Vec::<Value>::new() },
        );
        assert!(html.contains("メールはありません。"));
    }

    #[test]
    fn linkify_links_only_http_urls() {
        let l = |s: &str| linkify(s.to_owned()).to_string();
        assert_eq!(l("a <b> & c"), "a &lt;b&gt; &amp; c");
        assert_eq!(
            l("see https://x.example/a?b=1&c=2, then"),
            r#"see <a href="https://x.example/a?b=1&amp;c=2">https://x.example/a?b=1&amp;c=2</a>, then"#
        );
        assert_eq!(l("javascript:alert(1)"), "javascript:alert(1)");
        assert_eq!(
            l("x http://a\"onmouseover=\"y"),
            r#"x <a href="http://a">http://a</a>&quot;onmouseover=&quot;y"#
        );
        assert_eq!(l("http:// and https://."), "http:// and https://.");
        assert_eq!(
            l("(http://a.example/)"),
            r#"(<a href="http://a.example/">http://a.example/</a>)"#
        );
        assert_eq!(
            l("URL：http://a.example/x。"),
            "URL：<a href=\"http://a.example/x\">http://a.example/x</a>。"
        );
    }

    /// A representative context for every mail.
    fn mail_context(name: &str) -> Value {
        match name {
            "mail/verify_email.txt" | "mail/change_email.txt" | "mail/reset.txt" => {
                context! { url => "http://localhost:8080/link/AbC_123?x=1&y=2", minutes => 30 }
            }
            "mail/email_changed_notice.txt" => {
                context! { when => "2025-04-01 12:34", new_email_masked => "ne***@e***.ac.jp" }
            }
            "mail/second_password_changed_notice.txt" => context! { when => "2025-04-01 12:34" },
            other => panic!("no test context for {other}"),
        }
    }

    #[test]
    fn every_mail_renders_in_both_languages() {
        let ui = ui();
        let mail_templates: Vec<_> = TEMPLATES
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| name.ends_with(".txt"))
            .collect();
        assert_eq!(mail_templates.len(), MAILS.len());
        for (name, subject_key) in MAILS {
            assert!(mail_templates.contains(name), "{name} not in TEMPLATES");
            for locale in Locale::ALL {
                let mail = ui
                    .render_mail(name, locale, mail_context(name))
                    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert_eq!(mail.subject, ui.message(locale, subject_key));
                assert!(!mail.subject.is_empty() && !mail.subject.contains('\n'));
                assert!(
                    mail.body.ends_with('\n') && !mail.body.ends_with("\n\n"),
                    "{name}"
                );
                assert!(!mail.body.starts_with('\n'), "{name}");
                assert!(!mail.body.contains("\n\n\n"), "{name}: {}", mail.body);
                assert!(
                    !mail.body.contains("&amp;") && !mail.body.contains("&#x27;"),
                    "{name}"
                );
                assert!(!mail.body.contains('<'), "{name}: plain text");
                assert_eq!(unfilled_placeholder(&mail.body), None, "{name}");
                assert!(mail.body.contains("The University"), "{name}");
                assert!(mail.body.contains("Student Affairs 06-0000-0000"), "{name}");
                if locale == Locale::En {
                    let found: String = mail.body.chars().filter(|c| is_japanese(*c)).collect();
                    assert!(
                        found.is_empty(),
                        "{name}: Japanese in an English mail: {found}"
                    );
                }
                if mail_context(name)
                    .get_attr("url")
                    .is_ok_and(|url| !url.is_undefined())
                {
                    assert!(
                        mail.body
                            .contains("\nhttp://localhost:8080/link/AbC_123?x=1&y=2\n"),
                        "{name}: the URL unescaped on its own line"
                    );
                    let validity = match locale {
                        Locale::Ja => "URL 期限：30 分",
                        Locale::En => "valid for 30 minutes",
                    };
                    assert!(mail.body.contains(validity), "{name}: {}", mail.body);
                }
            }
        }
        assert!(ui
            .render_mail("login.html", Locale::Ja, context! {})
            .is_err());
    }

    #[test]
    fn mails_match_the_seed() {
        let ui = ui();
        let body = |name: &str| {
            ui.render_mail(name, Locale::Ja, mail_context(name))
                .unwrap()
                .body
        };
        let verify = body("mail/verify_email.txt");
        assert!(verify.starts_with(
            "メールアドレスの登録を行います。\n以下の URL にアクセスし、メールアドレスの登録を完了して下さい。\n\nhttp://"
        ));
        for text in [
            "URL 期限：30 分",
            "※もしこのメールにお心当たりのない方は削除して下さい。",
            "◎このメールは送信専用メールです。",
        ] {
            assert!(verify.contains(text), "verify: missing {text}");
        }
        let change = body("mail/change_email.txt");
        assert!(change.starts_with(
            "メールアドレスの変更を行います。\n以下の URL にアクセスし、メールアドレスの変更を完了して下さい。\n"
        ));
        assert!(change.contains("URL 期限：30 分"));
        let reset = body("mail/reset.txt");
        assert!(reset.starts_with("第2パスワードのリセットを行います。\n"));
        assert!(reset.contains("ユーザIDとパスワード"));
        let notice = body("mail/email_changed_notice.txt");
        assert!(notice.contains("2025-04-01 12:34"));
        assert!(notice.contains("ne***@e***.ac.jp"));
        assert!(notice.contains("お問い合わせ先"));
        let notice = body("mail/second_password_changed_notice.txt");
        assert!(notice.contains("2025-04-01 12:34 に、第2パスワードが変更"));
        let en = ui
            .render_mail(
                "mail/email_changed_notice.txt",
                Locale::En,
                mail_context("mail/email_changed_notice.txt"),
            )
            .unwrap();
        assert!(en.body.contains(
            "On 2025-04-01 12:34, your registered email address was changed to ne***@e***.ac.jp."
        ));
        // A Japanese-only contact is left off English mails, like English pages.
        let ui_ja_contact = Ui::new(Branding {
            university_name: "The University".into(),
            accent_color: "#1f4e8c".into(),
            logo_url: String::new(),
            support_contact: "学生支援課 06-0000-0000".into(),
        })
        .unwrap();
        let en = ui_ja_contact
            .render_mail("mail/reset.txt", Locale::En, mail_context("mail/reset.txt"))
            .unwrap();
        assert!(!en.body.chars().any(is_japanese), "{}", en.body);
        assert!(!en.body.contains("Contact:"));
        let ja = ui_ja_contact
            .render_mail("mail/reset.txt", Locale::Ja, mail_context("mail/reset.txt"))
            .unwrap();
        assert!(ja
            .body
            .contains("お問い合わせ先：学生支援課 06-0000-0000\n"));
    }

    #[test]
    fn locale_parse() {
        assert_eq!(Locale::parse("ja"), Some(Locale::Ja));
        assert_eq!(Locale::parse("ja-JP"), Some(Locale::Ja));
        assert_eq!(Locale::parse("JA"), Some(Locale::Ja));
        assert_eq!(Locale::parse("en-US"), Some(Locale::En));
        assert_eq!(Locale::parse("en_GB"), Some(Locale::En));
        assert_eq!(Locale::parse(" En "), Some(Locale::En));
        assert_eq!(Locale::parse("fr"), None);
        assert_eq!(Locale::parse("jav"), None);
        assert_eq!(Locale::parse(""), None);
        assert_eq!(Locale::Ja.as_str(), "ja");
        assert_eq!(Locale::En.other(), Locale::Ja);
        assert_eq!(serde_json::to_string(&Locale::En).unwrap(), "\"en\"");
        assert_eq!(
            serde_json::from_str::<Locale>("\"ja\"").unwrap(),
            Locale::Ja
        );
    }

    #[test]
    fn locale_negotiation() {
        use Locale::{En, Ja};
        let n = Locale::negotiate;
        assert_eq!(n(None, None, None, Ja), Ja);
        assert_eq!(n(None, None, None, En), En);
        // Explicit lang wins over everything.
        assert_eq!(n(Some("en"), Some("ja"), Some("ja"), Ja), En);
        // An unusable lang falls through.
        assert_eq!(n(Some("fr"), Some("en"), None, Ja), En);
        // ui_locales: the first supported entry.
        assert_eq!(n(None, Some("fr-CA en ja"), Some("ja"), Ja), En);
        assert_eq!(n(None, Some("fr de"), Some("en-US"), Ja), En);
        // Accept-Language with q-values.
        assert_eq!(n(None, None, Some("en-US,en;q=0.9,ja;q=0.8"), Ja), En);
        assert_eq!(n(None, None, Some("en;q=0.5, ja-JP;q=0.9"), En), Ja);
        assert_eq!(n(None, None, Some("fr, ja;q=0.1"), En), Ja);
        assert_eq!(n(None, None, Some("en;q=0, ja;q=0.2"), En), Ja);
        assert_eq!(n(None, None, Some("en;q=0"), Ja), Ja);
        assert_eq!(n(None, None, Some("fr, *;q=0.5"), En), En);
        assert_eq!(n(None, None, Some("en;q=abc, ja"), En), Ja);
        assert_eq!(n(None, None, Some("ja, en"), En), Ja, "tie: first listed");
        assert_eq!(n(None, None, Some(""), En), En);
        assert_eq!(n(None, None, Some("de-DE,de;q=0.9"), Ja), Ja);
    }
}
