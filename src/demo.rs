//! The fake backend services `manifold serve --demo` starts in-process, so
//! the shipped `compositions/` answer real requests with no set-up. Data in
//! `fixtures/demo/`, compiled in.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const USERS: &str = include_str!("../fixtures/demo/users.json");
const ORDERS: &str = include_str!("../fixtures/demo/orders.json");
const REVIEWS: &str = include_str!("../fixtures/demo/reviews.json");
const SELLERS: &str = include_str!("../fixtures/demo/sellers.json");

/// The demo services and their fixed loopback ports (the shipped config
/// names them).
pub const SERVICES: [(Service, u16); 4] =
    [(Service::Users, 9101), (Service::Orders, 9102), (Service::Reviews, 9103), (Service::Sellers, 9104)];

#[derive(Clone, Copy, Debug)]
pub enum Service {
    Users,
    Orders,
    Reviews,
    Sellers,
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    resp
}

/// One demo service's answer to one request.
pub fn answer(service: Service, path: &str, query: &str) -> Response<Full<Bytes>> {
    let data = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    let user = query_param(query, "user").unwrap_or("");
    match (service, path.strip_prefix('/').unwrap_or(path).split_once('/')) {
        (Service::Users, Some(("users", id))) => match data(USERS).get(id) {
            Some(user) => json_response(StatusCode::OK, user.clone()),
            None => json_response(StatusCode::NOT_FOUND, json!({ "error": "user not found" })),
        },
        (Service::Sellers, Some(("sellers", id))) => match data(SELLERS).get(id) {
            Some(seller) => json_response(StatusCode::OK, seller.clone()),
            None => json_response(StatusCode::NOT_FOUND, json!({ "error": "seller not found" })),
        },
        // A batch endpoint: `/users?ids=1,2`, the users it knows, in any order.
        (Service::Users, None) if path == "/users" => {
            let users = data(USERS);
            let ids = query_param(query, "ids").unwrap_or("");
            let found: Vec<Value> = ids.split(',').filter_map(|id| users.get(id).cloned()).collect();
            json_response(StatusCode::OK, Value::Array(found))
        }
        (Service::Orders, None) if path == "/orders" => {
            let limit = query_param(query, "limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
            let items: Vec<Value> =
                data(ORDERS).get(user).and_then(Value::as_array).map(|a| a.iter().take(limit).cloned().collect()).unwrap_or_default();
            json_response(StatusCode::OK, json!({ "user_id": user, "items": items }))
        }
        (Service::Reviews, None) if path == "/reviews" => {
            let items = data(REVIEWS).get(user).cloned().unwrap_or_else(|| json!([]));
            let stars: Vec<f64> = items.as_array().into_iter().flatten().filter_map(|r| r["stars"].as_f64()).collect();
            let average = if stars.is_empty() { Value::Null } else { json!(stars.iter().sum::<f64>() / stars.len() as f64) };
            json_response(StatusCode::OK, json!({ "user_id": user, "items": items, "average": average }))
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({ "error": "no such endpoint" })),
    }
}

/// Binds every demo service, then serves them on a thread of their own.
pub fn start() -> anyhow::Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    for (service, port) in SERVICES {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--demo needs port {port} for its {service:?} service: {e}"))?;
        listener.set_nonblocking(true)?;
        bound.push((service, listener));
    }
    let addrs = bound.iter().filter_map(|(_, l)| l.local_addr().ok()).collect();
    std::thread::Builder::new().name("manifold-demo".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for (service, listener) in bound {
                tasks.push(tokio::spawn(serve_one(service, listener)));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    })?;
    Ok(addrs)
}

async fn serve_one(service: Service, listener: std::net::TcpListener) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let query = req.uri().query().unwrap_or("").to_string();
                Ok::<_, Infallible>(answer(service, req.uri().path(), &query))
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
