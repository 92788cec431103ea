//! Authentication levels and the decision the authorization endpoint makes with them: answer from
//! the session, ask for the full login, or ask only for the second password (step-up).
use crate::app::AppState;
use crate::clock::Timestamp;
use crate::config::{ClientSettings, ACR_PASSWORD, ACR_SECOND_PASSWORD};
use crate::oidc::authorize::AuthRequest;
use crate::store::BrowserSession;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Password,
    SecondPassword,
}

impl Level {
    pub fn acr(self) -> &'static str {
        match self {
            Level::Password => ACR_PASSWORD,
            Level::SecondPassword => ACR_SECOND_PASSWORD,
        }
    }
    pub fn from_acr(acr: &str) -> Option<Level> {
        match acr {
            ACR_PASSWORD => Some(Level::Password),
            ACR_SECOND_PASSWORD => Some(Level::SecondPassword),
            _ => None,
        }
    }
}

/// The level a request needs: the lowest acceptable `acr_values` entry, raised by the client's
/// `min_acr` and by an essential `acr` claim. Unknown values are ignored.
pub fn required_level(client: &ClientSettings, request: &AuthRequest) -> Level {
    let listed = request
        .acr_values
        .iter()
        .filter_map(|v| Level::from_acr(v))
        .min()
        .unwrap_or(Level::Password);
    let client_min = Level::from_acr(&client.min_acr).unwrap_or(Level::Password);
    let essential = request.essential_acr().unwrap_or(Level::Password);
    listed.max(client_min).max(essential)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The session is enough: issue a code at this level.
    Issue { level: Level, auth_time: Timestamp },
    /// Show the full login page.
    Login,
    /// The university password is fresh enough; ask only for the second password.
    StepUp,
}

/// Decides what the session (if any) is worth for `request`. `requested_at` is the time of the
/// authorization request when deciding again after a login or step-up for it: a check made
/// since then satisfies `max_age` and `prompt=login`; `None` decides at `/authorize` itself.
pub fn decide(
    state: &AppState,
    client: &ClientSettings,
    request: &AuthRequest,
    session: Option<&BrowserSession>,
    requested_at: Option<Timestamp>,
    now: Timestamp,
) -> Decision {
    let Some(session) = session else {
        return Decision::Login;
    };
    // prompt=login asks for every factor again, like max_age=0.
    let max_age = if request.prompt_login() {
        Some(0)
    } else {
        request.max_age
    };
    let fresh_enough = |t: Timestamp| {
        requested_at.is_some_and(|r| t >= r) || max_age.is_none_or(|max| now - t <= max && max > 0)
    };
    if !fresh_enough(session.password_at) {
        return Decision::Login;
    }
    let step_up_lifetime = state.config.session.step_up_lifetime.as_secs() as i64;
    let second_fresh = session
        .second_password_at
        .is_some_and(|t| now - t <= step_up_lifetime && fresh_enough(t));
    let required = required_level(client, request);
    if required == Level::SecondPassword && !second_fresh {
        return Decision::StepUp;
    }
    if second_fresh {
        let second_at = session.second_password_at.unwrap_or(session.password_at);
        Decision::Issue {
            level: Level::SecondPassword,
            auth_time: second_at.max(session.password_at),
        }
    } else {
        Decision::Issue {
            level: Level::Password,
            auth_time: session.password_at,
        }
    }
}
