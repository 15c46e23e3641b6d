//! Links, addresses and routes, through netlink (rtnetlink), in named netns.
use std::{net::IpAddr, os::fd::AsRawFd};

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// A netlink handle whose socket lives in netns `name`.
pub async fn handle_in(name: &str) -> anyhow::Result<Handle> {
    let runtime = tokio::runtime::Handle::current();
    let (connection, handle) = crate::netns::run_in(name, move || {
        let _guard = runtime.enter();
        let (connection, handle, _) = rtnetlink::new_connection()?;
        Ok((connection, handle))
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

pub async fn index(handle: &Handle, link: &str) -> anyhow::Result<u32> {
    let msg = handle
        .link()
        .get()
        .match_name(link.to_string())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up link {link}"))?
        .with_context(|| format!("no link {link}"))?;
    Ok(msg.header.index)
}

pub async fn up(handle: &Handle, link: &str) -> anyhow::Result<()> {
    let index = index(handle, link).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("setting {link} up"))
}

/// Creates veth `local`↔`peer` in `handle`'s netns and moves `peer` into `peer_ns`, renamed
/// to `peer_name`.
pub async fn veth(
    handle: &Handle,
    local: &str,
    peer: &str,
    peer_ns: &str,
    peer_name: &str,
) -> anyhow::Result<()> {
    handle
        .link()
        .add(LinkVeth::new(local, peer).build())
        .execute()
        .await
        .with_context(|| format!("creating veth {local}/{peer}"))?;
    let peer_index = index(handle, peer).await?;
    let ns_file = std::fs::File::open(crate::netns::path(peer_ns))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(peer_index)
                .setns_by_fd(ns_file.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("moving {peer} into {peer_ns}"))?;
    if peer != peer_name {
        let peer_handle = handle_in(peer_ns).await?;
        let idx = index(&peer_handle, peer).await?;
        peer_handle
            .link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .name(peer_name.to_string())
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("renaming {peer} to {peer_name}"))?;
    }
    Ok(())
}

pub async fn address(
    handle: &Handle,
    link: &str,
    ip: impl Into<IpAddr>,
    prefix: u8,
) -> anyhow::Result<()> {
    let ip = ip.into();
    let index = index(handle, link).await?;
    handle
        .address()
        .add(index, ip, prefix)
        .execute()
        .await
        .with_context(|| format!("adding {ip}/{prefix} to {link}"))
}

/// `ip route add DST/PREFIX dev LINK scope link`.
pub async fn route_dev(
    handle: &Handle,
    dst: impl Into<IpAddr>,
    prefix: u8,
    link: &str,
) -> anyhow::Result<()> {
    let dst = dst.into();
    let index = index(handle, link).await?;
    let route = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .with_context(|| format!("route {dst}/{prefix}"))?
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("route {dst}/{prefix} dev {link}"))
}

/// `ip route add DST/PREFIX via GW`.
pub async fn route_via(
    handle: &Handle,
    dst: impl Into<IpAddr>,
    prefix: u8,
    gateway: impl Into<IpAddr>,
) -> anyhow::Result<()> {
    let (dst, gateway) = (dst.into(), gateway.into());
    let route = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .with_context(|| format!("route {dst}/{prefix}"))?
        .gateway(gateway)
        .with_context(|| format!("gateway {gateway}"))?
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("route {dst}/{prefix} via {gateway}"))
}

/// `GET path` over plain HTTP/1.1 from `addr` (a lab admin, metrics or health endpoint), in
/// the calling thread's netns: (status, body). Connecting and each read time out after 5 s.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}
