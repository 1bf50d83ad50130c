//! What every role's OpenAPI document says the same way: the bounds of the names the roles
//! accept (as patterns the schemas carry), the range of every integer (its Rust type's, unless
//! narrower) and the answers every route can give besides its own
//! ([`Contract`]): 401 and 403 on every route that needs credentials, 400 and 413 on every
//! route that takes a body, 400 on every route with parameters, 404 on every route with a path
//! parameter, and 422 on every route with a body or parameters (a well-formed request whose
//! values are refused for a reason the schema cannot say), each with an
//! [`ErrorBody`](crate::ErrorBody). A schema-valid request is never answered 400. The documents themselves are made
//! and served by each role (`/api/openapi.json`, `/store/openapi.json`, `/host/openapi.json`),
//! through [`served`].

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

/// An image, VM or node name ([`crate::manifest::validate_name`]): 1-64 characters of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$";
/// `NAME` or `NAME@VERSION` ([`crate::ImageRef`]'s text form).
pub const IMAGE_REF_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}(@[0-9]{1,9})?$";
/// A user name ([`crate::auth::validate_user_name`]).
pub const USER_PATTERN: &str = "^[a-z0-9][a-z0-9_.-]{0,31}$";
/// A chunk hash: 64 lowercase hex digits.
pub const HASH_PATTERN: &str = "^[0-9a-f]{64}$";

/// Opaque bytes (a zstd chunk, a hot-page bundle) as a body: `type: string, format: binary`.
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary))).into()
    }
}
impl utoipa::ToSchema for Binary {}

/// The security scheme of a user's bearer token (`Authorization: Bearer vgt_...`).
pub const BEARER: &str = "bearer";
/// The security scheme of a grid node's client certificate (mutual TLS).
pub const NODE_CERTIFICATE: &str = "node_certificate";

/// A [`utoipa::Modify`] that adds the security schemes and the answers every route can give
/// (see the module doc). `body_limit` is the largest body the role reads, named in its 413.
pub struct Contract {
    pub body_limit: usize,
}

impl utoipa::Modify for Contract {
    fn modify(&self, doc: &mut OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(BEARER, SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
        c.add_security_scheme(
            NODE_CERTIFICATE,
            SecurityScheme::MutualTls { description: Some("a client certificate of this grid's CA".into()), extensions: None },
        );
        let global_secured = doc.security.as_ref().is_some_and(|s| s.iter().any(|r| !is_empty_requirement(r)));
        let limit = self.body_limit;
        for (path, item) in doc.paths.paths.iter_mut() {
            let has_path_param = path.contains('{');
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.head, &mut item.patch].into_iter().flatten()
            {
                let secured = match &op.security {
                    None => global_secured,
                    Some(reqs) => reqs.iter().any(|r| !is_empty_requirement(r)),
                };
                let mut add = |status: &str, what: String| {
                    op.responses.responses.entry(status.to_string()).or_insert_with(|| error_response(&what));
                };
                if secured {
                    add("401", "no credentials, or credentials that do not check out (unknown, expired or revoked token)".into());
                    add("403", "the caller's credentials do not allow this".into());
                }
                let body = op.request_body.is_some();
                if body {
                    add("400", "the body is not JSON of the documented shape".into());
                    add("413", format!("the body is larger than {limit} bytes"));
                }
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                    add("400", "a parameter is not of the documented shape".into());
                    add("422", REFUSED.into());
                } else if body {
                    add("422", REFUSED.into());
                }
                if has_path_param {
                    add("404", "no such object".into());
                }
            }
        }
    }
}

/// A role's document as it is served (`/api/openapi.json` ...): with every integer's range
/// (utoipa writes each type's format, e.g. `u-int16`, but not its bounds, which a client cannot
/// guess; done on the JSON, as utoipa does not read back the formats it writes).
pub fn served(doc: &OpenApi) -> serde_json::Value {
    let mut v = serde_json::to_value(doc).expect("an OpenAPI document is JSON");
    integer_bounds(&mut v);
    v
}

/// The canonical name and range of the integer `format` utoipa writes for each Rust integer
/// type (its `non_strict_integers` feature, which spells the unsigned ones `u-int16` ...).
fn format_range(format: &str) -> Option<(&'static str, i64, u64)> {
    Some(match format {
        "int8" => ("int8", i8::MIN.into(), i8::MAX as u64),
        "uint8" | "u-int8" => ("uint8", 0, u8::MAX.into()),
        "int16" => ("int16", i16::MIN.into(), i16::MAX as u64),
        "uint16" | "u-int16" => ("uint16", 0, u16::MAX.into()),
        "int32" => ("int32", i32::MIN.into(), i32::MAX as u64),
        "uint32" | "u-int32" => ("uint32", 0, u32::MAX.into()),
        "int64" => ("int64", i64::MIN, i64::MAX as u64),
        "uint64" | "u-int64" => ("uint64", 0, u64::MAX),
        _ => return None,
    })
}

/// Integer schemas get the canonical name of their format and its `minimum` and `maximum`,
/// unless narrower ones are given (`#[schema(minimum = 1, maximum = 65535)]`).
fn integer_bounds(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            let integer = match o.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if let Some((format, min, max)) = o.get("format").and_then(|f| f.as_str()).and_then(format_range).filter(|_| integer) {
                o.insert("format".into(), format.into());
                o.entry("minimum").or_insert(min.into());
                o.entry("maximum").or_insert(max.into());
            }
            o.values_mut().for_each(integer_bounds);
        }
        Value::Array(a) => a.iter_mut().for_each(integer_bounds),
        _ => {}
    }
}

const REFUSED: &str = "a well-formed request whose values are refused (a bound the schema cannot say, e.g. an expression that does not compile, or two fields that exclude each other): the error names the field";

/// An error answer: `what` and an [`ErrorBody`](crate::ErrorBody).
pub fn error_response(what: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(what)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build(),
    )
}

fn is_empty_requirement(r: &utoipa::openapi::security::SecurityRequirement) -> bool {
    serde_json::to_value(r).map(|v| v.as_object().is_some_and(|o| o.is_empty())).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which characters may start a name, which may follow, and the longest name.
    type Shape = (&'static dyn Fn(char) -> bool, &'static dyn Fn(char) -> bool, usize);

    fn matches(pattern: &str, s: &str) -> bool {
        // A tiny check of the patterns against the validators, on a few names: the patterns are
        // anchored character classes with a length, so a hand-made matcher suffices.
        let (first, rest, max): Shape = match pattern {
            NAME_PATTERN => {
                (&|c: char| c.is_ascii_alphanumeric() || c == '_', &|c: char| c.is_ascii_alphanumeric() || "._-".contains(c), 64)
            }
            USER_PATTERN => (
                &|c: char| c.is_ascii_lowercase() || c.is_ascii_digit(),
                &|c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c),
                32,
            ),
            _ => unreachable!(),
        };
        let mut cs = s.chars();
        cs.next().is_some_and(first) && cs.all(rest) && s.len() <= max
    }

    #[test]
    fn the_patterns_accept_what_the_validators_accept() {
        for n in ["a", "A.b-c_d", "_x", "9", ".x", "-x", "", "a b", "é", &"a".repeat(64), &"a".repeat(65)] {
            assert_eq!(matches(NAME_PATTERN, n), crate::manifest::validate_name(n).is_ok(), "{n:?}");
        }
        for n in ["alice", "a.b-c_d", "9x", "_x", ".x", "Alice", "", &"a".repeat(32), &"a".repeat(33)] {
            assert_eq!(matches(USER_PATTERN, n), crate::auth::validate_user_name(n).is_ok(), "{n:?}");
        }
    }

    #[derive(utoipa::ToSchema)]
    #[allow(dead_code)]
    struct Ints {
        port: u16,
        #[schema(minimum = 1, maximum = 65535)]
        forward: u16,
        small: Option<u8>,
        offset: i16,
        count: u32,
        size: u64,
        delta: i64,
        share: f64,
    }

    #[derive(utoipa::OpenApi)]
    #[openapi(components(schemas(Ints)), modifiers(&TEST_CONTRACT))]
    struct Doc;
    const TEST_CONTRACT: Contract = Contract { body_limit: 1 };

    #[test]
    fn integers_are_documented_with_their_types_range() {
        let doc = served(&<Doc as utoipa::OpenApi>::openapi());
        let p = &doc["components"]["schemas"]["Ints"]["properties"];
        let range = |f: &str| (p[f]["format"].clone(), p[f]["minimum"].clone(), p[f]["maximum"].clone());
        let j = |v: serde_json::Value| v;
        assert_eq!(range("port"), (j("uint16".into()), j(0.into()), j(65535.into())));
        assert_eq!(range("forward"), (j("uint16".into()), j(1.into()), j(65535.into())));
        assert_eq!(range("small"), (j("uint8".into()), j(0.into()), j(255.into())));
        assert_eq!(range("offset"), (j("int16".into()), j((-32768).into()), j(32767.into())));
        assert_eq!(range("count"), (j("uint32".into()), j(0.into()), j(u32::MAX.into())));
        assert_eq!(range("size"), (j("uint64".into()), j(0.into()), j(u64::MAX.into())));
        assert_eq!(range("delta"), (j("int64".into()), j(i64::MIN.into()), j(i64::MAX.into())));
        assert_eq!(p["share"].get("maximum"), None);
    }
}
