//! The OpenID Connect provider: discovery, JWKS, authorization, token, userinfo, introspection,
//! revocation and logout.
pub mod authorize;
pub mod backchannel;
pub mod claims;
pub mod clients;
pub mod discovery;
pub mod introspect;
pub mod logout;
pub mod params;
pub mod service_token;
pub mod token;
pub mod userinfo;
