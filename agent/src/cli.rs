//! The node CLI's views: ask the local agent's admin API, print tables or JSON.
use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// How to print an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// GETs `path_and_query` from the admin API and parses the JSON answer.
pub async fn admin_get(
    admin: SocketAddr,
    path_and_query: &str,
) -> anyhow::Result<serde_json::Value> {
    let no_agent = || {
        format!("no agent at {admin}: is `meshlet agent` running on this node (or is its --admin-addr elsewhere)?")
    };
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    .map_err(|_| anyhow::anyhow!(no_agent()))?
    .with_context(no_agent)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(no_agent)?;
    tokio::spawn(connection);
    let request = http::Request::get(path_and_query)
        .header(http::header::HOST, admin.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(no_agent)?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).with_context(|| {
        format!("the admin API at {admin} answered {status} with something that is not JSON")
    })?;
    if !status.is_success() {
        let message = value["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("{message}");
    }
    Ok(value)
}

/// Percent-encodes a query value.
pub fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn str_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Prints rows as an aligned table under `headers`.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `meshlet policies`.
pub fn print_policies(view: &serde_json::Value) {
    println!(
        "mesh: mode {} · default {} · version {}",
        str_of(&view["mesh_mode"]),
        if view["default_deny"].as_bool().unwrap_or(false) {
            "deny"
        } else {
            "allow"
        },
        str_of(&view["version"])
    );
    let mut rows = Vec::new();
    for w in view["workloads"].as_array().into_iter().flatten() {
        let ports: Vec<String> = w["port_modes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}={}", str_of(&p["port"]), str_of(&p["mode"]["mode"])))
            .collect();
        let policies: Vec<String> = w["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let dry = if p["dry_run"].as_bool().unwrap_or(false) {
                    ",dry-run"
                } else {
                    ""
                };
                format!("{}({}{dry})", str_of(&p["name"]), str_of(&p["action"]))
            })
            .collect();
        rows.push(vec![
            str_of(&w["workload"]),
            format!(
                "{} ({})",
                str_of(&w["mode"]["mode"]),
                str_of(&w["mode"]["source"])
            ),
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(" ")
            },
            if w["inbound_captured"].as_bool().unwrap_or(false) {
                "yes".into()
            } else {
                "no".into()
            },
            if policies.is_empty() {
                "-".into()
            } else {
                policies.join(" ")
            },
            str_of(&w["default"]),
        ]);
    }
    print_table(
        &[
            "WORKLOAD",
            "MODE",
            "PORT MODES",
            "CAPTURED",
            "POLICIES",
            "DEFAULT",
        ],
        &rows,
    );
}

/// `meshlet check`.
pub fn print_check(view: &serde_json::Value) {
    let d = &view["decision"];
    let identity = match &view["source_identity"] {
        serde_json::Value::String(s) => s.clone(),
        _ => "no identity".into(),
    };
    println!(
        "from: {} ({identity}, {}) over {}",
        str_of(&view["from"]),
        str_of(&view["source_ip"]),
        str_of(&view["transport"])
    );
    println!(
        "to:   {} port {}",
        str_of(&view["to"]),
        str_of(&view["port"])
    );
    for (i, step) in d["steps"].as_array().into_iter().flatten().enumerate() {
        println!("  {}. {}", i + 1, str_of(step));
    }
    println!(
        "verdict: {} — {}",
        str_of(&d["verdict"]).to_uppercase(),
        str_of(&d["reason"])
    );
}
