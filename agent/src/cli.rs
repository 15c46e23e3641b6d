//! The node CLI's views: ask the local agent's admin API, print tables or JSON.
use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// How to print an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// Reads a saved config dump (`meshlet config-dump -o json > FILE`).
pub fn read_dump(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config dump {}", path.display()))?;
    parse_dump(&text).with_context(|| {
        format!(
            "{} is not a meshlet config dump (save one with `meshlet config-dump -o json > FILE`)",
            path.display()
        )
    })
}

/// A config dump's text as JSON (untrusted: a file someone hands over).
pub fn parse_dump(text: &str) -> serde_json::Result<serde_json::Value> {
    serde_json::from_str(text)
}

/// `meshlet check --file`: the same explanation, from the control-plane update in the dump.
pub fn check_from_dump(
    dump: &serde_json::Value,
    from: &str,
    to: &str,
) -> anyhow::Result<serde_json::Value> {
    let update: meshlet_proto::v1::DiscoveryResponse =
        serde_json::from_value(dump["discovery"].clone())
            .context("the dump holds no control-plane update (the agent had none applied)")?;
    let workloads = crate::state::Store::default();
    workloads
        .apply(
            &update,
            &crate::tls::TrustBundle::default(),
            crate::state::StreamPosition::First,
        )
        .context("the dump's control-plane update does not validate")?;
    Ok(serde_json::to_value(crate::admin::views::check(
        &workloads, None, from, to,
    )?)?)
}

/// GETs `path_and_query` from the admin API and parses the JSON answer.
pub async fn admin_get(
    admin: SocketAddr,
    path_and_query: &str,
) -> anyhow::Result<serde_json::Value> {
    admin_call(
        admin,
        http::Method::GET,
        path_and_query,
        bytes::Bytes::new(),
    )
    .await
}

/// POSTs `body` to the agent's admin API and answers its JSON.
pub async fn admin_post(
    admin: SocketAddr,
    path: &str,
    body: String,
) -> anyhow::Result<serde_json::Value> {
    admin_call(admin, http::Method::POST, path, bytes::Bytes::from(body)).await
}

async fn admin_call(
    admin: SocketAddr,
    method: http::Method,
    path_and_query: &str,
    body: bytes::Bytes,
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
    let request = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, admin.to_string())
        .body(Full::new(body))?;
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
    let route = &view["route"];
    println!(
        "dial: {}{}",
        str_of(&route["destination"]),
        match route["service"].as_str() {
            Some(s) => format!(" (service {s})"),
            None => String::new(),
        }
    );
    for (i, step) in route["steps"].as_array().into_iter().flatten().enumerate() {
        println!("  {}. {}", i + 1, str_of(step));
    }
    if let Some(refusal) = route["outcome"].get("refuse") {
        println!(
            "verdict: REFUSED by the source's agent ({}) — {}",
            str_of(&refusal["reason"]),
            str_of(&refusal["detail"])
        );
        return;
    }
    println!(
        "to:   {} port {}",
        str_of(&view["to"]),
        str_of(&view["port"])
    );
    let d = &view["decision"];
    if d.is_null() {
        println!("verdict: PLAINTEXT, directly — the destination is outside the mesh");
        return;
    }
    for (i, step) in d["steps"].as_array().into_iter().flatten().enumerate() {
        println!("  {}. {}", i + 1, str_of(step));
    }
    println!(
        "verdict: {} — {}",
        str_of(&d["verdict"]).to_uppercase(),
        str_of(&d["reason"])
    );
}

/// `meshlet services`.
pub fn print_services(v: &serde_json::Value) {
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().into_iter().flatten().map(str_of).collect()
    };
    let mut rows = Vec::new();
    for s in v.as_array().into_iter().flatten() {
        let ports: Vec<String> = s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let target = match &p["target"] {
                    serde_json::Value::Object(o) => {
                        o.values().next().map(str_of).unwrap_or_default()
                    }
                    other => str_of(other),
                };
                format!(
                    "{}→{}/{}",
                    str_of(&p["port"]),
                    target,
                    str_of(&p["protocol"])
                )
            })
            .collect();
        let vips = list(&s["vips"]);
        let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
        if endpoints.is_empty() {
            rows.push(vec![
                str_of(&s["service"]),
                if vips.is_empty() {
                    "None (headless)".into()
                } else {
                    vips.join(",")
                },
                ports.join(","),
                "-".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for (i, e) in endpoints.iter().enumerate() {
            let first = i == 0;
            rows.push(vec![
                if first {
                    str_of(&s["service"])
                } else {
                    String::new()
                },
                if !first {
                    String::new()
                } else if vips.is_empty() {
                    "None (headless)".into()
                } else {
                    vips.join(",")
                },
                if first {
                    ports.join(",")
                } else {
                    String::new()
                },
                str_of(&e["endpoint"]),
                list(&e["addresses"]).join(","),
                str_of(&e["health"]),
                if e["in_mesh"].as_bool().unwrap_or(false) {
                    str_of(&e["node"])
                } else {
                    "(outside the mesh)".into()
                },
            ]);
        }
    }
    print_table(
        &[
            "SERVICE",
            "CLUSTER IPS",
            "PORTS",
            "ENDPOINT",
            "ADDRESSES",
            "HEALTH",
            "NODE",
        ],
        &rows,
    );
}

fn ts(v: &serde_json::Value) -> String {
    match v.as_u64() {
        Some(secs) => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            humantime_utc(t)
        }
        None => "-".into(),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC, whole seconds).
pub fn humantime_utc(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.max(std::time::UNIX_EPOCH)).to_string()
}

fn duration(secs: i64) -> String {
    let sign = if secs < 0 { "-" } else { "" };
    let s = secs.unsigned_abs();
    if s >= 3600 {
        format!("{sign}{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{sign}{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{sign}{s}s")
    }
}

/// `meshlet status`.
pub fn print_status(v: &serde_json::Value) {
    let ready = v["ready"]["ready"].as_bool().unwrap_or(false);
    println!("node:           {}", str_of(&v["node"]));
    println!("agent version:  {}", str_of(&v["version"]));
    println!(
        "ready:          {}",
        if ready {
            "yes".to_string()
        } else {
            "NO".to_string()
        }
    );
    for reason in v["ready"]["reasons"].as_array().into_iter().flatten() {
        println!("                - {}", str_of(reason));
    }
    let link = &v["control_plane"];
    let since = link["since"]
        .as_u64()
        .map(|s| humantime_utc(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)))
        .unwrap_or_else(|| "?".into());
    let state = match link["connected"].as_bool() {
        Some(true) => format!("connected since {since}"),
        Some(false) => format!(
            "disconnected since {since} ({}); serving the last good state",
            str_of(&link["reason"])
        ),
        None => "unknown".into(),
    };
    println!(
        "control plane:  {state}, version {}",
        str_of(&v["control_plane_version"])
    );
    println!(
        "local:          {} pods, {} identities, {} live connections",
        str_of(&v["pods"]),
        str_of(&v["identities"]),
        str_of(&v["connections"])
    );
    let r = &v["redirect"];
    println!(
        "kernel:         {} redirected, {} captured inbound, {} dropped inbound, {} binds refused",
        str_of(&r["redirected"]),
        str_of(&r["inbound_captured"]),
        str_of(&r["inbound_dropped"]),
        str_of(&r["bind_refused"])
    );
}

/// `meshlet workloads`.
pub fn print_workloads(v: &serde_json::Value) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let ips: Vec<String> = w["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect();
            vec![
                str_of(&w["workload"]),
                str_of(&w["node"]),
                ips.join(","),
                str_of(&w["mode"]),
                if w["local"].as_bool().unwrap_or(false) {
                    "yes".into()
                } else {
                    "no".into()
                },
                str_of(&w["identity"]),
            ]
        })
        .collect();
    print_table(
        &["WORKLOAD", "NODE", "IPS", "MODE", "LOCAL", "IDENTITY"],
        &rows,
    );
}

/// `meshlet certs`.
pub fn print_certs(v: &serde_json::Value) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let chain: Vec<String> = c["issuer_chain"]
                .as_array()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect();
            vec![
                str_of(&c["identity"]),
                str_of(&c["state"]),
                str_of(&c["serial"]),
                ts(&c["not_before"]),
                ts(&c["not_after"]),
                c["rotation_in_seconds"]
                    .as_i64()
                    .map(duration)
                    .unwrap_or_else(|| "-".into()),
                if chain.is_empty() {
                    "-".into()
                } else {
                    chain.join(" ← ")
                },
            ]
        })
        .collect();
    print_table(
        &[
            "IDENTITY",
            "STATE",
            "SERIAL",
            "NOT BEFORE",
            "NOT AFTER",
            "ROTATES IN",
            "ISSUER CHAIN",
        ],
        &rows,
    );
}

/// `meshlet connections`.
pub fn print_connections(v: &serde_json::Value) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                str_of(&c["direction"]),
                str_of(&c["transport"]),
                format!("{} {}", str_of(&c["source"]), str_of(&c["source_identity"])),
                format!(
                    "{} {}",
                    str_of(&c["destination"]),
                    str_of(&c["destination_identity"])
                ),
                duration(c["age_seconds"].as_i64().unwrap_or(0)),
                str_of(&c["bytes_sent"]),
                str_of(&c["bytes_received"]),
            ]
        })
        .collect();
    print_table(
        &[
            "DIRECTION",
            "TRANSPORT",
            "SOURCE",
            "DESTINATION",
            "AGE",
            "SENT",
            "RECEIVED",
        ],
        &rows,
    );
}

/// `meshlet config-dump` as a table: the status, then each section.
pub fn print_config_dump(v: &serde_json::Value) {
    print_status(&v["status"]);
    println!();
    print_workloads(&v["workloads"]);
    println!();
    print_certs(&v["certs"]);
    println!();
    print_connections(&v["connections"]);
    println!();
    print_policies(&v["policies"]);
}

/// `meshlet certs verify`: each certificate, then the verdict and every reason.
pub fn print_chain_verdict(v: &serde_json::Value) {
    for (i, c) in v["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let label = if i == 0 {
            "leaf".to_string()
        } else {
            format!("#{i}")
        };
        let name = match c["identity"].as_str() {
            Some(id) => id.to_string(),
            None => str_of(&c["subject"]),
        };
        println!(
            "{label:>5}  {name}\n       serial {}  valid {} → {}\n       issuer {}",
            str_of(&c["serial"]),
            ts(&c["not_before"]),
            ts(&c["not_after"]),
            str_of(&c["issuer"])
        );
    }
    let domains: Vec<String> = v["trust_domains"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    println!(
        "trust: bundles of {} · {} CRLs",
        if domains.is_empty() {
            "no trust domain (no control-plane update yet)".to_string()
        } else {
            domains.join(", ")
        },
        v["crls"].as_u64().unwrap_or(0)
    );
    if v["trusted"].as_bool() == Some(true) {
        println!("verdict: TRUSTED as {}", str_of(&v["identity"]));
        return;
    }
    let reasons = v["reasons"].as_array().cloned().unwrap_or_default();
    println!("verdict: REFUSED ({} reasons)", reasons.len());
    for r in reasons {
        println!("  ✗ {}: {}", str_of(&r["reason"]), str_of(&r["message"]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_durations_read_well() {
        assert_eq!(
            humantime_utc(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_528_288)),
            "2026-11-24T13:51:28Z"
        );
        assert_eq!(
            humantime_utc(std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(duration(3725), "1h02m");
        assert_eq!(duration(-5), "-5s");
        assert_eq!(query_value("default/api:80"), "default%2Fapi%3A80");
    }
}
