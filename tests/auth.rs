//! Authentication with credentials (SPEC §2 consumers and policies):
//! basic-auth, jwt with every supported algorithm, JWK sets, claims in
//! compositions, several methods on one route, and the phase order. Keys
//! are test-only fixtures in `fixtures/jwt/`.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{backend, client, gateway};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const RSA_PRIVATE: &str = include_str!("../fixtures/jwt/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("../fixtures/jwt/rsa-public.pem");
const RSA2_PRIVATE: &str = include_str!("../fixtures/jwt/rsa2-private.pem");
const EC256_PRIVATE: &str = include_str!("../fixtures/jwt/ec256-private.pem");
const EC256_PUBLIC: &str = include_str!("../fixtures/jwt/ec256-public.pem");
const EC384_PRIVATE: &str = include_str!("../fixtures/jwt/ec384-private.pem");
const EC384_PUBLIC: &str = include_str!("../fixtures/jwt/ec384-public.pem");
const ED25519_PRIVATE: &str = include_str!("../fixtures/jwt/ed25519-private.pem");
const ED25519_PUBLIC: &str = include_str!("../fixtures/jwt/ed25519-public.pem");
const RSA_JWK: &str = include_str!("../fixtures/jwt/rsa-jwk.json");

/// Every jwt credential of [`consumers`]: issuer, algorithm, consumer.
const ISSUERS: &[(&str, Algorithm, &str)] = &[
    ("alice-iss", Algorithm::HS256, "alice"),
    ("rsa-iss", Algorithm::RS256, "alice"),
    ("hs384-iss", Algorithm::HS384, "bob"),
    ("hs512-iss", Algorithm::HS512, "bob"),
    ("rs384-iss", Algorithm::RS384, "bob"),
    ("rs512-iss", Algorithm::RS512, "bob"),
    ("es256-iss", Algorithm::ES256, "bob"),
    ("es384-iss", Algorithm::ES384, "bob"),
    ("eddsa-iss", Algorithm::EdDSA, "bob"),
];

fn secret(issuer: &str) -> &'static str {
    match issuer {
        "alice-iss" => "a-long-shared-secret",
        "hs384-iss" => "a-longer-shared-secret-for-hs384-tokens",
        _ => "an-even-longer-shared-secret-for-the-hs512-tokens",
    }
}

fn public_key(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => EC256_PUBLIC,
        Algorithm::ES384 => EC384_PUBLIC,
        Algorithm::EdDSA => ED25519_PUBLIC,
        _ => RSA_PUBLIC,
    }
}

/// The key that signs a token of `alg` for `issuer` (the right one).
fn signing_key(alg: Algorithm, issuer: &str) -> EncodingKey {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(secret(issuer).as_bytes()),
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC256_PRIVATE.as_bytes()).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(EC384_PRIVATE.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED25519_PRIVATE.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    }
}

/// A jwt credential as a YAML list item under `credentials:`.
fn jwt_credential(issuer: &str, alg: Algorithm) -> String {
    let name = format!("{alg:?}");
    if name.starts_with("HS") {
        return format!("      - {{ type: jwt, issuer: {issuer}, algorithm: {name}, secret: \"{}\" }}\n", secret(issuer));
    }
    let pem: String = public_key(alg).lines().map(|l| format!("          {l}\n")).collect();
    format!("      - type: jwt\n        issuer: {issuer}\n        algorithm: {name}\n        public_key: |\n{pem}")
}

fn consumers() -> String {
    let creds = |who: &str| -> String { ISSUERS.iter().filter(|i| i.2 == who).map(|i| jwt_credential(i.0, i.1)).collect() };
    format!(
        r#"
consumers:
  - name: alice
    groups: [staff]
    credentials:
      - {{ type: basic-auth, username: alice, password: s3cret }}
{}  - name: bob
    groups: [partners]
    credentials:
{}  - name: carol
    credentials: [{{ type: key-auth, key: k-carol }}]
  - name: guest
"#,
        creds("alice"),
        creds("bob")
    )
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims valid for five minutes.
fn claims(issuer: &str) -> Value {
    json!({ "iss": issuer, "sub": "user-42", "exp": now() + 300 })
}

fn mint(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let header = Header { kid: kid.map(str::to_string), ..Header::new(alg) };
    encode(&header, claims, key).unwrap()
}

/// A valid token of `issuer`, signed with its credential's algorithm and key.
fn token(issuer: &str) -> String {
    let alg = ISSUERS.iter().find(|i| i.0 == issuer).unwrap().1;
    mint(alg, None, &claims(issuer), &signing_key(alg, issuer))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn basic(user: &str, password: &str) -> String {
    let req = client().get("http://localhost/").basic_auth(user, Some(password)).build().unwrap();
    req.headers()["authorization"].to_str().unwrap().to_string()
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
    let (status, headers, body) = common::send("GET", url, None, headers).await;
    (status.as_u16(), headers, body)
}

/// Asserts a 401 `unauthorized` answer and returns its headers.
async fn refused(url: &str, headers: &[(&str, &str)], why: &str) -> reqwest::header::HeaderMap {
    let (s, h, body) = get(url, headers).await;
    assert_eq!((s, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{why}: {body}");
    h
}

/// The consumer the backend was told about.
async fn accepted_as(url: &str, headers: &[(&str, &str)]) -> Value {
    let (s, _, body) = get(url, headers).await;
    assert_eq!(s, 200, "{body}");
    body["headers"]["x-consumer-name"].clone()
}

fn hits(b: &common::Backend) -> usize {
    b.hits.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_names_the_consumer_and_challenges_everyone_else() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: basic, type: basic-auth, config: {{ hide_credentials: false, anonymous: null }} }}
routes:
  - {{ name: r, path: /r, upstream: "{}", policies: [basic] }}
"#,
        consumers(),
        b.url()
    ));
    let url = format!("http://{}/r", g.proxy_addr);
    let good = basic("alice", "s3cret");
    let (s, _, body) = get(&url, &[("authorization", &good), ("x-consumer-name", "bob")]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["headers"]["x-consumer-name"], json!(["alice"]));
    assert_eq!(body["headers"]["x-consumer-groups"], json!(["staff"]));
    assert_eq!(body["headers"]["authorization"], json!([good]), "hide_credentials: false passes it on");

    for (headers, why) in [
        (vec![("authorization", basic("alice", "wrong"))], "wrong password"),
        (vec![("authorization", basic("alice", "S3CRET"))], "the password is case-sensitive"),
        (vec![("authorization", basic("mallory", "s3cret"))], "unknown user"),
        (vec![("authorization", "Basic !!not-base64".to_string())], "malformed"),
        (vec![], "no credentials"),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let h = refused(&url, &headers, why).await;
        assert_eq!(h["www-authenticate"], r#"Basic realm="manifold""#, "{why}");
    }
    assert_eq!(hits(&b), 1, "refused requests never reach the backend");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_hides_credentials_and_lets_anonymous_through() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: hidden, type: basic-auth, config: {{ hide_credentials: true }} }}
  - {{ name: or-guest, type: basic-auth, config: {{ anonymous: guest }} }}
routes:
  - {{ name: hidden, path: /hidden, upstream: "{u}", policies: [hidden] }}
  - {{ name: open, path: /open, upstream: "{u}", policies: [or-guest] }}
"#,
        consumers(),
        u = b.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    let (s, _, body) = get(&format!("{base}/hidden"), &[("authorization", &basic("alice", "s3cret"))]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["headers"]["x-consumer-name"], json!(["alice"]));
    assert!(body["headers"].get("authorization").is_none(), "hide_credentials: {body}");

    assert_eq!(accepted_as(&format!("{base}/open"), &[("authorization", &basic("alice", "s3cret"))]).await, json!(["alice"]));
    assert_eq!(accepted_as(&format!("{base}/open"), &[]).await, json!(["guest"]));
    assert_eq!(accepted_as(&format!("{base}/open"), &[("authorization", &basic("alice", "wrong"))]).await, json!(["guest"]));
    g.shutdown();
}

const JWT_ROUTES: &str = r#"
policies:
  - { name: tokens, type: jwt, config: { header: authorization, query_param: null, claims_to_verify: [exp], leeway: 0s, jwks_url: null, anonymous: null } }
routes:
  - { name: r, path: /r, upstream: "UPSTREAM", policies: [tokens] }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn jwt_accepts_every_supported_algorithm_and_the_issuer_picks_the_consumer() {
    let b = backend().run().await;
    let g = gateway(&format!("{}{}", consumers(), JWT_ROUTES.replace("UPSTREAM", &b.url())));
    let url = format!("http://{}/r", g.proxy_addr);
    for (issuer, alg, consumer) in ISSUERS {
        let (s, _, body) = get(&url, &[("authorization", &bearer(&token(issuer)))]).await;
        assert_eq!(s, 200, "{alg:?}: {body}");
        assert_eq!(body["headers"]["x-consumer-name"], json!([consumer]), "{alg:?}");
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_refuses_missing_malformed_forged_and_expired_tokens() {
    let b = backend().run().await;
    let g = gateway(&format!("{}{}", consumers(), JWT_ROUTES.replace("UPSTREAM", &b.url())));
    let url = format!("http://{}/r", g.proxy_addr);
    let rsa2 = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
    let hs_key = signing_key(Algorithm::HS256, "alice-iss");
    // A signature over other claims: another token's payload under this one's signature.
    let (a, other) =
        (token("alice-iss"), mint(Algorithm::HS256, None, &json!({"iss": "alice-iss", "sub": "root", "exp": now() + 300}), &hs_key));
    let [ah, _, asig]: [&str; 3] = a.split('.').collect::<Vec<_>>().try_into().unwrap();
    let spliced = format!("{ah}.{}.{asig}", other.split('.').nth(1).unwrap());
    let cases = [
        (String::new(), "no token"),
        ("Bearer".to_string(), "an empty bearer"),
        (bearer("not-a-jwt"), "not a jwt"),
        (bearer("a.b.c"), "segments that are not base64 json"),
        (basic("alice", "s3cret"), "basic credentials are no token"),
        (bearer(&spliced), "a payload the signature does not cover"),
        (bearer(&mint(Algorithm::HS256, None, &claims("alice-iss"), &EncodingKey::from_secret(b"not-the-secret"))), "wrong secret"),
        (bearer(&mint(Algorithm::RS256, None, &claims("rsa-iss"), &rsa2)), "signed by another RSA key"),
        (bearer(&mint(Algorithm::HS256, None, &claims("nobody-iss"), &hs_key)), "unknown issuer"),
        (bearer(&mint(Algorithm::HS256, None, &json!({"sub": "user-42", "exp": now() + 300}), &hs_key)), "no issuer"),
        (bearer(&mint(Algorithm::HS256, None, &json!({"iss": "alice-iss", "exp": now() - 60}), &hs_key)), "expired"),
        (bearer(&mint(Algorithm::HS256, None, &json!({"iss": "alice-iss"}), &hs_key)), "exp is required"),
    ];
    for (authorization, why) in &cases {
        let headers = [("authorization", authorization.as_str())];
        refused(&url, if authorization.is_empty() { &[] } else { &headers }, why).await;
    }
    assert_eq!(hits(&b), 0, "refused requests never reach the backend");
    assert_eq!(accepted_as(&url, &[("authorization", &bearer(&a))]).await, json!(["alice"]), "the genuine token passes");
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_accepts_only_the_credentials_algorithm() {
    let b = backend().run().await;
    let g = gateway(&format!("{}{}", consumers(), JWT_ROUTES.replace("UPSTREAM", &b.url())));
    let url = format!("http://{}/r", g.proxy_addr);
    // alg: none, for an HS and an RS credential, with and without a signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // base64url of {"alg":"none","typ":"JWT"}
    for issuer in ["alice-iss", "rsa-iss"] {
        let real = token(issuer);
        let (payload, sig) = (real.split('.').nth(1).unwrap(), real.split('.').nth(2).unwrap());
        refused(&url, &[("authorization", &bearer(&format!("{none}.{payload}.")))], "alg none").await;
        refused(&url, &[("authorization", &bearer(&format!("{none}.{payload}.{sig}")))], "alg none, signed").await;
    }
    // The HS/RS confusion: HMAC keyed with the RSA public key's PEM text.
    for pem in [RSA_PUBLIC, RSA_PUBLIC.trim_end()] {
        let forged = mint(Algorithm::HS256, None, &claims("rsa-iss"), &EncodingKey::from_secret(pem.as_bytes()));
        refused(&url, &[("authorization", &bearer(&forged))], "HS256 keyed with the RS256 public key").await;
    }
    // The right key, another algorithm than the credential's.
    let rs384 = mint(Algorithm::RS384, None, &claims("rsa-iss"), &signing_key(Algorithm::RS384, "rsa-iss"));
    refused(&url, &[("authorization", &bearer(&rs384))], "RS384 for an RS256 credential").await;
    let hs512 = mint(Algorithm::HS512, None, &claims("alice-iss"), &signing_key(Algorithm::HS256, "alice-iss"));
    refused(&url, &[("authorization", &bearer(&hs512))], "HS512 for an HS256 credential").await;
    let ps256 = mint(Algorithm::PS256, None, &claims("rsa-iss"), &signing_key(Algorithm::RS256, "rsa-iss"));
    refused(&url, &[("authorization", &bearer(&ps256))], "PS256 for an RS256 credential").await;
    assert_eq!(hits(&b), 0);
    assert_eq!(accepted_as(&url, &[("authorization", &bearer(&token("rsa-iss")))]).await, json!(["alice"]));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_time_claims_with_and_without_leeway() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: strict, type: jwt, config: {{ claims_to_verify: [exp, nbf] }} }}
  - {{ name: lenient, type: jwt, config: {{ claims_to_verify: [exp, nbf], leeway: 30s }} }}
routes:
  - {{ name: strict, path: /strict, upstream: "{u}", policies: [strict] }}
  - {{ name: lenient, path: /lenient, upstream: "{u}", policies: [lenient] }}
"#,
        consumers(),
        u = b.url()
    ));
    let base = format!("http://{}", g.proxy_addr);
    let key = signing_key(Algorithm::HS256, "alice-iss");
    let t = |exp: u64, nbf: Option<u64>| {
        let mut c = json!({ "iss": "alice-iss", "exp": exp });
        if let Some(nbf) = nbf {
            c["nbf"] = json!(nbf);
        }
        bearer(&mint(Algorithm::HS256, None, &c, &key))
    };
    let n = now();
    let strict = format!("{base}/strict");
    let lenient = format!("{base}/lenient");
    assert_eq!(accepted_as(&strict, &[("authorization", &t(n + 300, Some(n - 1)))]).await, json!(["alice"]));
    refused(&strict, &[("authorization", &t(n + 300, None))], "nbf is listed, so required").await;
    refused(&strict, &[("authorization", &t(n - 10, Some(n - 60)))], "expired 10 s ago, no leeway").await;
    refused(&strict, &[("authorization", &t(n + 300, Some(n + 10)))], "valid in 10 s, no leeway").await;
    assert_eq!(accepted_as(&lenient, &[("authorization", &t(n - 10, Some(n - 60)))]).await, json!(["alice"]), "within leeway");
    assert_eq!(accepted_as(&lenient, &[("authorization", &t(n + 300, Some(n + 10)))]).await, json!(["alice"]), "within leeway");
    refused(&lenient, &[("authorization", &t(n - 120, Some(n - 600)))], "expired past the leeway").await;
    refused(&lenient, &[("authorization", &t(n + 600, Some(n + 120)))], "not yet valid past the leeway").await;
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_from_a_query_parameter() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: in-query, type: jwt, config: {{ query_param: jwt }} }}
routes:
  - {{ name: r, path: /r, upstream: "{}", policies: [in-query] }}
"#,
        consumers(),
        b.url()
    ));
    let url = format!("http://{}/r", g.proxy_addr);
    assert_eq!(accepted_as(&format!("{url}?a=1&jwt={}", token("es256-iss")), &[]).await, json!(["bob"]));
    refused(&format!("{url}?jwt=not-a-jwt"), &[], "a malformed token in the query").await;
    refused(&format!("{url}?token={}", token("es256-iss")), &[], "another parameter").await;
    refused(&url, &[], "no token").await;
    // The header stays a place for the token (the contract's "or").
    assert_eq!(accepted_as(&url, &[("authorization", &bearer(&token("alice-iss")))]).await, json!(["alice"]));
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_keys_from_a_jwks_url_chosen_by_kid() {
    let b = backend().run().await;
    let jwk: Value = serde_json::from_str(RSA_JWK).unwrap();
    let kid = jwk["kid"].as_str().unwrap().to_string();
    let jwks = backend().json(json!({ "keys": [jwk] })).run().await;
    let g = gateway(&format!(
        r#"
consumers:
  - name: dave
    groups: [keyset]
    credentials: [{{ type: jwt, issuer: jwks-iss, algorithm: RS256 }}]
policies:
  - {{ name: keyset, type: jwt, config: {{ jwks_url: "{}/jwks.json" }} }}
routes:
  - {{ name: r, path: /r, upstream: "{}", policies: [keyset] }}
"#,
        jwks.url(),
        b.url()
    ));
    let url = format!("http://{}/r", g.proxy_addr);
    let rsa = signing_key(Algorithm::RS256, "");
    let good = bearer(&mint(Algorithm::RS256, Some(&kid), &claims("jwks-iss"), &rsa));
    // The key set is fetched in the background after the gateway starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let (s, _, body) = get(&url, &[("authorization", &good)]).await;
        if s == 200 || tokio::time::Instant::now() > deadline {
            assert_eq!(s, 200, "the JWKS key is never used: {body}");
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["headers"]["x-consumer-name"], json!(["dave"]));
    assert_eq!(jwks.seen.lock().unwrap()[0]["path"], "/jwks.json");
    let rsa2 = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
    for (token, why) in [
        (mint(Algorithm::RS256, Some("no-such-kid"), &claims("jwks-iss"), &rsa), "unknown kid"),
        (mint(Algorithm::RS256, Some(&kid), &claims("jwks-iss"), &rsa2), "signed by another key"),
        (mint(Algorithm::RS256, Some(&kid), &claims("nobody-iss"), &rsa), "unknown issuer"),
        (mint(Algorithm::RS256, Some(&kid), &json!({"iss": "jwks-iss", "exp": now() - 60}), &rsa), "expired"),
    ] {
        refused(&url, &[("authorization", &bearer(&token))], why).await;
    }
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_reach_composition_templates() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: tokens, type: jwt }}
compositions:
  - name: me
    path: /me
    policies: [tokens]
    calls:
      echo: {{ url: "{}/echo?sub={{{{request.consumer.claims.sub}}}}" }}
    response:
      body: {{ sub: $.request.consumer.claims.sub, name: $.request.consumer.name, q: $.echo.body.query }}
"#,
        consumers(),
        b.url()
    ));
    let url = format!("http://{}/me", g.proxy_addr);
    let (s, _, body) = get(&url, &[("authorization", &bearer(&token("rsa-iss")))]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body, json!({ "sub": "user-42", "name": "alice", "q": "sub=user-42" }));
    assert_eq!(b.seen.lock().unwrap()[0]["headers"]["x-consumer-name"], json!(["alice"]));
    refused(&url, &[], "no token").await;
    assert_eq!(hits(&b), 1);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_method_that_accepts_wins() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: keys, type: key-auth }}
  - {{ name: basic, type: basic-auth }}
  - {{ name: tokens, type: jwt }}
routes:
  - {{ name: r, path: /r, upstream: "{}", policies: [keys, basic, tokens] }}
"#,
        consumers(),
        b.url()
    ));
    let url = format!("http://{}/r", g.proxy_addr);
    let alice_basic = basic("alice", "s3cret");
    assert_eq!(accepted_as(&url, &[("apikey", "k-carol")]).await, json!(["carol"]));
    assert_eq!(accepted_as(&url, &[("authorization", &alice_basic)]).await, json!(["alice"]));
    assert_eq!(accepted_as(&url, &[("authorization", &bearer(&token("eddsa-iss")))]).await, json!(["bob"]));
    assert_eq!(accepted_as(&url, &[("apikey", "wrong"), ("authorization", &alice_basic)]).await, json!(["alice"]), "a refusal is no veto");
    assert_eq!(accepted_as(&url, &[("apikey", "k-carol"), ("authorization", &alice_basic)]).await, json!(["carol"]), "first wins");
    refused(&url, &[], "no credentials").await;
    refused(&url, &[("apikey", "wrong"), ("authorization", &basic("alice", "wrong"))], "nothing valid").await;
    refused(&url, &[("apikey", "wrong"), ("authorization", &bearer("x.y.z"))], "nothing valid").await;
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_authentication_spends_no_rate_limit() {
    let b = backend().run().await;
    let g = gateway(&format!(
        r#"{}
policies:
  - {{ name: one, type: rate-limit, config: {{ limit: 1, window: 1m, by: ip }} }}
  - {{ name: basic, type: basic-auth }}
routes:
  - {{ name: r, path: /r, upstream: "{}", policies: [one, basic] }}
"#,
        consumers(),
        b.url()
    ));
    let url = format!("http://{}/r", g.proxy_addr);
    refused(&url, &[], "no credentials").await;
    refused(&url, &[("authorization", &basic("alice", "wrong"))], "wrong password").await;
    refused(&url, &[("authorization", &basic("mallory", "x"))], "unknown user").await;
    let good = basic("alice", "s3cret");
    assert_eq!(accepted_as(&url, &[("authorization", &good)]).await, json!(["alice"]), "the quota is untouched");
    let (s, _, body) = get(&url, &[("authorization", &good)]).await;
    assert_eq!((s, body["error"]["code"].as_str()), (429, Some("rate_limited")), "the limit does apply");
    g.shutdown();
}
