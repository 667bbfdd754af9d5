//! What the shared tier holds, as an operator sees it: every published window (each master
//! scanned for heads) and, for a scrub, which of their blocks Redis no longer holds —
//! evicted under `volatile-lfu`, expired, or lost with a node restarted without persistence.

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use serde::Serialize;

use super::{Remote, RemoteError};
use crate::store::Manifest;

/// Keys asked per `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// A window published in the tier.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteWindow {
    /// Window name.
    pub name: String,
    /// Its current generation.
    pub generation: u64,
    /// Blocks of that generation's manifest.
    pub blocks: u64,
    /// Tokens.
    pub tokens: u64,
    /// Payload bytes of its blocks.
    pub bytes: u64,
    /// When its TTL ends, ms since the epoch (`None`: no TTL).
    pub expires_unix_ms: Option<i64>,
    /// Its TTL has passed: gone for every reader (its name is free for a new publish); its
    /// head stays, and its manifest until the name is published again.
    pub expired: bool,
    /// Its manifest could not be read or decoded (the rest is then 0).
    pub error: Option<String>,
}

/// What a scrub found about one published window.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteScrub {
    /// Window name.
    pub name: String,
    /// Generation checked.
    pub generation: u64,
    /// `ok`, `partial` (some blocks are gone: a pull is NOT_FOUND, a fill keeps the prefix
    /// before the first missing one) or `damaged` (its head or manifest fails its checks).
    pub status: &'static str,
    /// Blocks of the window.
    pub blocks: u64,
    /// Blocks whose first value is gone.
    pub missing: u64,
    /// Index of the first missing block.
    pub first_missing: Option<u64>,
    /// Why, for `damaged`.
    pub detail: Option<String>,
}

impl Remote {
    /// Every master's address, as the cluster reports it.
    fn masters(&self) -> Result<Vec<(String, u16)>, RemoteError> {
        let nodes: String = self.run(|c| redis::cmd("CLUSTER").arg("NODES").query(c))?;
        Ok(nodes
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = f.nth(1)?;
                let flags = f.next()?;
                if !flags.split(',').any(|x| x == "master") || flags.contains("fail") {
                    return None;
                }
                let hostport = addr.split(['@', ',']).next()?;
                let (host, port) = hostport.rsplit_once(':')?;
                let host = if host.is_empty() { "127.0.0.1" } else { host };
                Some((host.to_string(), port.parse().ok()?))
            })
            .collect())
    }

    /// Names of every window published under this prefix (each master scanned for heads;
    /// a head whose name field is missing is skipped).
    pub fn window_names(&self) -> Result<Vec<String>, RemoteError> {
        let pattern = format!("{}:w:*:head", self.cfg.prefix);
        let mut heads = Vec::new();
        for (host, port) in self.masters()? {
            let mut cursor = "0".to_string();
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(&cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                let v = self.run(|c| c.route_command(&cmd, route.clone()))?;
                let (next, keys): (String, Vec<String>) = redis::from_redis_value(&v)?;
                heads.extend(keys);
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        if heads.is_empty() {
            return Ok(Vec::new());
        }
        let mut names = Vec::with_capacity(heads.len());
        for chunk in heads.chunks(SCAN_COUNT) {
            let mut pipe = redis::cluster::cluster_pipe();
            for k in chunk {
                pipe.cmd("HGET").arg(k).arg("name");
            }
            let got: Vec<Option<String>> = self.run(|c| pipe.query(c))?;
            names.extend(got.into_iter().flatten());
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The current generation and decoded manifest of `name`.
    fn current(&self, name: &str) -> Result<(u64, Manifest), RemoteError> {
        let (head, m) = self.published(name)?;
        Ok((head.generation, m))
    }

    /// Every published window with its current generation's size.
    pub fn list_windows(&self) -> Result<Vec<RemoteWindow>, RemoteError> {
        self.window_names()?
            .into_iter()
            .map(|name| match self.current(&name) {
                Ok((generation, m)) => Ok(RemoteWindow {
                    name,
                    generation,
                    blocks: m.blocks.len() as u64,
                    tokens: m.tokens.len() as u64,
                    bytes: m.blocks.iter().map(|b| b.len).sum(),
                    expires_unix_ms: m.retention.expires_unix_ms,
                    expired: m.retention.expired(crate::clock::now_unix_ms()),
                    error: None,
                }),
                Err(e) if e.is_outage() => Err(e),
                Err(e) => Ok(RemoteWindow {
                    name,
                    generation: 0,
                    blocks: 0,
                    tokens: 0,
                    bytes: 0,
                    expires_unix_ms: None,
                    expired: false,
                    error: Some(e.to_string()),
                }),
            })
            .collect()
    }

    /// Checks that every block of every published window is still there (one pipelined
    /// probe per window; a block counts once its first value is there — a later part Redis
    /// dropped is refused when read).
    pub fn scrub_windows(&self) -> Result<Vec<RemoteScrub>, RemoteError> {
        let mut out = Vec::new();
        for name in self.window_names()? {
            let (generation, m) = match self.current(&name) {
                Ok(x) => x,
                Err(e) if e.is_outage() => return Err(e),
                Err(e) if e.code() == crate::error::ErrorCode::NotFound => continue,
                Err(e) => {
                    out.push(RemoteScrub {
                        name,
                        generation: 0,
                        status: "damaged",
                        blocks: 0,
                        missing: 0,
                        first_missing: None,
                        detail: Some(e.to_string()),
                    });
                    continue;
                }
            };
            let keys: Vec<u128> = m.blocks.iter().map(|b| b.key).collect();
            let mut held = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(10_000) {
                held.extend(self.probe(chunk)?);
            }
            let missing = held.iter().filter(|h| !**h).count() as u64;
            out.push(RemoteScrub {
                name,
                generation,
                status: if missing == 0 { "ok" } else { "partial" },
                blocks: keys.len() as u64,
                missing,
                first_missing: held.iter().position(|h| !h).map(|i| i as u64),
                detail: None,
            });
        }
        Ok(out)
    }
}
