//! The shared tier on Redis Cluster (tier label `redis`): windows frozen by one cwm are thawed
//! by another. The local block log stays each instance's source of truth; Redis is a shared
//! cache of it, never the only copy of an acknowledged window.
//!
//! What is stored (keys under a configurable prefix `P`, default `cwm:v1`; docs/REMOTE.md):
//! - blocks, content-addressed and insert-only: `P:b:<key hex>` (and `P:b:<key hex>:<i>` for
//!   the further parts of a block larger than one value), written `SET NX` with a TTL that
//!   hits refresh (`GETEX`); no hash tag, so blocks spread over every slot;
//! - per window name, all in one slot (hash tag = the name key in hex): `P:w:{k}:head` (a hash:
//!   generation, fencing token and manifest length/checksum of the current version, the highest
//!   token seen, the name), `P:w:{k}:m:<token>` (an immutable manifest), `P:w:{k}:fence` (the
//!   token counter), `P:w:{k}:lock` (a lease).
//!
//! Publishing is fenced and versioned: take a token, write the blocks, write the manifest,
//! then one Lua compare-and-set on the head refuses a name that exists when a new one was
//! asked for (ALREADY_EXISTS: names are insert-only), a generation other than the expected
//! one (CONCURRENT_MODIFICATION), and a token at or below the highest seen (a paused holder of
//! an expired lock: fenced). Every value read back is decoded and verified ([`value`]);
//! nothing unverified is returned.

mod catalog;
mod transfer;
pub mod value;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{ErrorKind, RedisError};

use crate::error::ErrorCode;
pub use catalog::{RemoteScrub, RemoteWindow};
pub use transfer::{
    fill_prefix, fill_published_prefix, pull_window, pull_window_since, push_window, BlockSink,
    FillReport, PullReport, PushReport,
};
use value::ValueError;

/// How long an announcement subscription may go without a push before it checks that its node
/// still answers.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// The host of a node URL (`redis://host:port` → `host`).
fn seed_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.rsplit_once(':').map_or(rest, |(h, _)| h)
}

/// Where the shared tier is and how cwm uses it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Seed nodes: `redis://host:port`, or `rediss://host:port` for TLS (all of one kind).
    pub nodes: Vec<String>,
    /// TLS material for `rediss://` nodes.
    pub tls: RemoteTls,
    /// ACL user.
    pub user: Option<String>,
    /// ACL password (from a file or the environment, never a command-line flag).
    pub password: Option<String>,
    /// Key prefix.
    pub prefix: String,
    /// Time to live of block values, refreshed on every hit.
    pub block_ttl: Duration,
    /// Largest value written; larger blocks are split into parts.
    pub max_value: usize,
    /// Connection and response timeout of one request.
    pub timeout: Duration,
    /// When the daemon publishes a freeze to the tier.
    pub publish: Publish,
    /// Longest an automatic lookup waits for the tier's existence probe (the scheduler waits
    /// on lookups); past it the lookup answers from the local store alone.
    pub lookup_timeout: Duration,
    /// How long a definite miss (no block of a prompt's continuation in the tier) is
    /// remembered, so lookups of the same prefix skip the tier; at most 60 s.
    pub negative_ttl: Duration,
    /// How long a thaw naming a window not (yet) visible in the tier retries before NOT_FOUND
    /// (0: one try).
    pub visibility_timeout: Duration,
    /// Replicas every master must have received a publish's writes on before a push reports
    /// `replicated: true` (0: not waited for); waited for at most `timeout`.
    pub wait_replicas: usize,
    /// Lease of the per-name lock a named publish holds (renewed at a third of it; another
    /// instance publishing the name meanwhile gets BUSY). 0: no lock, the fence alone.
    pub lock_lease: Duration,
    /// The memory a pull or fill may count on; `None` (the daemon): what the kernel says is
    /// available as each pull or fill starts (EC-022). Tests set it.
    pub memory_available: Option<u64>,
}

/// When the daemon publishes a window it froze to the shared tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Publish {
    /// Only when asked (`push`).
    Off,
    /// In the background once the freeze is durable (the default): the freeze's answer never
    /// waits on Redis.
    #[default]
    Async,
    /// Before the freeze is answered (its answer says whether the publish succeeded; the
    /// freeze itself stands either way).
    Sync,
}

impl std::str::FromStr for Publish {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "async" => Ok(Self::Async),
            "sync" => Ok(Self::Sync),
            o => Err(format!(
                "unknown remote write mode {o:?}: use off, async or sync"
            )),
        }
    }
}

/// TLS material for `rediss://` nodes (PEM bytes, read from files at start-up). Without a CA the
/// system's trust store vouches for the nodes; the nodes' certificates must name the host or
/// IP address the seeds and the cluster's slot map give.
#[derive(Clone, Default)]
pub struct RemoteTls {
    /// CA certificates that vouch for the nodes, replacing the system's trust store.
    pub ca: Option<Vec<u8>>,
    /// Client certificate chain and its private key, for nodes that authenticate clients
    /// (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RemoteTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key's bytes.
        f.debug_struct("RemoteTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl RemoteTls {
    /// Whether any file was given.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

/// Whether `nodes` are TLS (`rediss://`) nodes; mixing both kinds, or TLS files with plain
/// nodes, is refused (a configuration that asks for TLS must not fall back to plain text).
fn tls_nodes(nodes: &[String], tls: &RemoteTls) -> Result<bool, RemoteError> {
    let n = nodes.iter().filter(|u| u.starts_with("rediss://")).count();
    if n != 0 && n != nodes.len() {
        return Err(RemoteError::Validation(
            "remote nodes mix redis:// and rediss:// URLs: give all of one kind".into(),
        ));
    }
    if n == 0 && tls.is_set() {
        return Err(RemoteError::Validation(
            "remote TLS files given but the nodes are redis:// URLs: use rediss://".into(),
        ));
    }
    Ok(n != 0)
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            tls: RemoteTls::default(),
            user: None,
            password: None,
            prefix: "cwm:v1".into(),
            block_ttl: Duration::from_secs(7 * 24 * 3600),
            max_value: 4 << 20,
            timeout: Duration::from_secs(2),
            publish: Publish::Async,
            lookup_timeout: Duration::from_millis(100),
            negative_ttl: Duration::from_secs(10),
            visibility_timeout: Duration::ZERO,
            lock_lease: Duration::from_secs(30),
            wait_replicas: 0,
            memory_available: None,
        }
    }
}

/// Keys an announcement lists at most (more: an empty announcement).
pub const ANNOUNCE_KEYS: usize = 4096;

/// What went wrong with the shared tier.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The cluster (or the node holding a key) cannot be reached, or is down.
    #[error("remote tier unavailable: {0}")]
    Unavailable(String),
    /// A request ran past its timeout.
    #[error("remote tier timed out: {0}")]
    Timeout(String),
    /// Redis is out of memory (`maxmemory` with `noeviction`).
    #[error("remote tier full: {0}")]
    Full(String),
    /// The ACL user may not do this, or the password is wrong.
    #[error("remote tier refused: {0}")]
    PermissionDenied(String),
    /// No such window or block in the shared tier.
    #[error("not in the remote tier: {0}")]
    NotFound(String),
    /// A value read back failed its checks (Redis does not checksum values).
    #[error("remote value {key} refused: {source}")]
    Corruption {
        /// The Redis key.
        key: String,
        /// Why.
        #[source]
        source: ValueError,
    },
    /// A new name was asked for and it exists (names are insert-only).
    #[error("window {0:?} exists in the remote tier")]
    AlreadyExists(String),
    /// The window's generation is not the expected one.
    #[error("window {name:?} is at generation {found}, expected {expected}")]
    ConcurrentModification {
        /// Window name.
        name: String,
        /// Generation expected.
        expected: u64,
        /// Generation found.
        found: u64,
    },
    /// A newer fencing token has been used for this name: this writer's lock expired.
    #[error("window {name:?}: fencing token {token} is stale (highest seen {highest})")]
    Fenced {
        /// Window name.
        name: String,
        /// This writer's token.
        token: u64,
        /// Highest token the head has seen.
        highest: u64,
    },
    /// The tier shows an older generation of a name than one seen before (it lost a publish:
    /// a failover to a replica the publish had not reached).
    #[error("window {name:?}: the remote tier shows generation {found}, older than generation {seen} seen before")]
    Stale {
        /// Window name.
        name: String,
        /// Generation found now.
        found: u64,
        /// Highest generation seen before.
        seen: u64,
    },
    /// Another instance holds the name's lock.
    #[error("window {0:?} is locked by another instance")]
    Busy(String),
    /// Not even one block a stage of a pull or fill fits in the memory available (EC-022):
    /// refused before anything is fetched.
    #[error("not enough memory to fetch from the remote tier: {needed} bytes needed, {available} available")]
    InsufficientMemory {
        /// Bytes the smallest batches would hold at once.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Bad input (configuration, names).
    #[error("{0}")]
    Validation(String),
    /// The local store failed (push reads from it, pull writes into it).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Any other Redis error.
    #[error("redis: {0}")]
    Redis(String),
}

impl RemoteError {
    /// The wire code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            RemoteError::Unavailable(_) => ErrorCode::Unavailable,
            RemoteError::Timeout(_) => ErrorCode::Timeout,
            RemoteError::Full(_) => ErrorCode::NoSpace,
            RemoteError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            RemoteError::NotFound(_) => ErrorCode::NotFound,
            RemoteError::Corruption { .. } => ErrorCode::Corruption,
            RemoteError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            RemoteError::ConcurrentModification { .. } | RemoteError::Fenced { .. } => {
                ErrorCode::ConcurrentModification
            }
            RemoteError::Busy(_) => ErrorCode::Busy,
            RemoteError::InsufficientMemory { .. } => ErrorCode::InsufficientMemory,
            RemoteError::Stale { .. } => ErrorCode::Unavailable,
            RemoteError::Validation(_) => ErrorCode::Validation,
            RemoteError::Store(e) => e.code(),
            RemoteError::Redis(_) => ErrorCode::IoError,
        }
    }

    /// Whether this is the tier being unreachable, slow or full (the remote tier reports itself
    /// degraded; local service goes on), not an answer about the data.
    #[must_use]
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            RemoteError::Unavailable(_) | RemoteError::Timeout(_) | RemoteError::Full(_)
        )
    }
}

impl From<RedisError> for RemoteError {
    fn from(e: RedisError) -> Self {
        let s = e.to_string();
        if e.is_timeout() {
            return RemoteError::Timeout(s);
        }
        if e.code() == Some("OOM") {
            return RemoteError::Full(s);
        }
        if matches!(e.code(), Some("NOPERM" | "WRONGPASS" | "NOAUTH"))
            || e.kind() == ErrorKind::AuthenticationFailed
        {
            return RemoteError::PermissionDenied(s);
        }
        if e.is_connection_refusal()
            || e.is_io_error()
            || matches!(
                e.kind(),
                ErrorKind::ClusterDown
                    | ErrorKind::MasterDown
                    | ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::TryAgain
                    | ErrorKind::BusyLoadingError
            )
        {
            return RemoteError::Unavailable(s);
        }
        RemoteError::Redis(s)
    }
}

/// The current version of a window in the shared tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Window name.
    pub name: String,
    /// Generation: 1 for the first publish, +1 for each replacement.
    pub generation: u64,
    /// The fencing token its publisher held (names its manifest value).
    pub token: u64,
    /// Manifest bytes.
    pub manifest_len: u64,
    /// xxh3-64 of the manifest bytes.
    pub manifest_checksum: u64,
}

/// What a publish expects of the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The name must not exist (insert-only).
    New,
    /// The name must be at this generation.
    Generation(u64),
    /// Whatever the name holds is replaced.
    Any,
}

/// The compare-and-set of a head. KEYS: head, manifest, the manifest of the token the head
/// named when the publisher looked. ARGV: expectation (`new`, `any` or a generation), token,
/// manifest length, manifest checksum (decimal), name, the publisher's clock (ms), the
/// window's expiry (ms; 0: none), the manifest grace (ms), that token (empty: none). A head whose
/// window expired counts as absent for `new` (an expired name is free again, as in the
/// store) but is kept, with its generation and highest token: readers never see a
/// generation go back, and a fenced holder stays fenced. The manifest the head stops naming
/// expires after the grace, and so does the manifest of a refused publish. The manifest the
/// head names never carries a TTL (under `volatile-lfu` Redis would evict it first).
const PUBLISH: &str = r"
local h = redis.call('HMGET', KEYS[1], 'gen', 'maxtok', 'token', 'exp')
local gen = tonumber(h[1])
local maxtok = tonumber(h[2]) or 0
local oldtok = h[3]
local oldexp = tonumber(h[4]) or 0
local tok = tonumber(ARGV[2])
local function refuse(why, n)
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
  return {why, n}
end
if tok <= maxtok then return refuse('FENCED', maxtok) end
if ARGV[1] == 'new' then
  if gen and not (oldexp > 0 and oldexp <= tonumber(ARGV[6])) then return refuse('EXISTS', gen) end
elseif ARGV[1] ~= 'any' then
  if (gen or 0) ~= tonumber(ARGV[1]) then return refuse('CONFLICT', gen or 0) end
end
if redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[3]) + 24 then return refuse('NOMANIFEST', 0) end
local ng = (gen or 0) + 1
redis.call('HSET', KEYS[1], 'gen', ng, 'token', tok, 'len', ARGV[3], 'sum', ARGV[4], 'maxtok', tok, 'name', ARGV[5], 'exp', ARGV[7])
if oldtok and oldtok == ARGV[9] and oldtok ~= ARGV[2] then
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
end
return {'OK', ng}
";

/// How long a superseded manifest stays readable (a reader that read the head just before a
/// publish still finds the manifest it names), and a refused publish's is kept.
const MANIFEST_GRACE_MS: u64 = 60_000;

/// Renews a lease held with token ARGV[1] for ARGV[2] ms. KEYS: lock.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// Releases a lease held with token ARGV[1]. KEYS: lock.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A connection to the shared tier. Safe to share between threads: each request takes a
/// cluster connection from a small pool.
pub struct Remote {
    cfg: RemoteConfig,
    client: ClusterClient,
    pool: Mutex<Vec<ClusterConnection>>,
    /// Bytes the pulls and fills running through this link may hold in flight, as each
    /// planned them (one budget for all: EC-022).
    pub(crate) in_flight: Mutex<u64>,
}

/// A cluster connection taken from the pool, put back when dropped.
struct Conn<'a> {
    remote: &'a Remote,
    conn: Option<ClusterConnection>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = ClusterConnection;
    fn deref(&self) -> &ClusterConnection {
        // Present until drop.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut ClusterConnection {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl Conn<'_> {
    /// Drops the connection instead of pooling it: after an outage its slot map may be stale
    /// (a failed-over master), and a new connection asks the cluster afresh.
    fn discard(&mut self) {
        self.conn = None;
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let (Some(c), Ok(mut pool)) = (self.conn.take(), self.remote.pool.lock()) {
            pool.push(c);
        }
    }
}

/// Times an idempotent request is sent again after an interrupted socket call.
const INTERRUPTED_RETRIES: u32 = 3;

/// A request's failure, and whether a socket call was interrupted (EINTR).
enum Interrupted {
    Yes(RemoteError),
    Not(RemoteError),
}

impl From<Interrupted> for RemoteError {
    fn from(i: Interrupted) -> Self {
        match i {
            Interrupted::Yes(e) | Interrupted::Not(e) => e,
        }
    }
}

/// A block to read with [`Remote::get_blocks`]: its key and, when known, its payload length
/// and checksum (checked: a value claiming another length is refused before anything is
/// allocated for it).
#[derive(Debug, Clone, Copy)]
pub struct Want {
    /// Block key.
    pub key: u128,
    /// Payload bytes.
    pub len: Option<u64>,
    /// Payload checksum (xxh3-64), e.g. from a manifest.
    pub checksum: Option<u64>,
}

/// One block as [`Remote::get_blocks`] read it: its payload and payload checksum (xxh3-64,
/// verified), or why it was refused.
pub type FetchedBlock<B> = Result<(B, u64), RemoteError>;

/// A block read from the tier, every check made but its payload's checksum: only
/// [`Unverified::verify`] gives the payload out.
pub struct Unverified<B> {
    payload: B,
    h: value::BlockHeader,
    /// The manifest's checksum, when known.
    checksum: Option<u64>,
    /// Its (first) value's key, for the error.
    key: String,
}

impl<B: PayloadBuf> Unverified<B> {
    /// The payload and its checksum once the payload's xxh3-64 equals the header's (and the
    /// manifest's, when known); else CORRUPTION.
    pub fn verify(mut self) -> FetchedBlock<B> {
        let expected = self.checksum.map(|c| (self.h.len, c));
        match value::check_payload(&self.h, self.payload.payload_mut(), expected) {
            Ok(()) => Ok((self.payload, self.h.checksum)),
            Err(source) => Err(RemoteError::Corruption {
                key: self.key,
                source,
            }),
        }
    }
}

/// A buffer a fetched block's payload is assembled in ([`Remote::get_blocks`]).
pub trait PayloadBuf: Sized {
    /// A buffer for a payload of `len` bytes.
    fn for_payload(len: usize) -> Self;
    /// Its payload bytes (`len` of them).
    fn payload_mut(&mut self) -> &mut [u8];
}

impl PayloadBuf for Vec<u8> {
    fn for_payload(len: usize) -> Self {
        vec![0; len]
    }

    fn payload_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Remote {
    /// Connects to the cluster `cfg.nodes` names (one node is enough: the rest are discovered).
    pub fn connect(cfg: RemoteConfig) -> Result<Self, RemoteError> {
        if cfg.nodes.is_empty() {
            return Err(RemoteError::Validation("no remote nodes given".into()));
        }
        if cfg.prefix.is_empty() || cfg.prefix.contains(['{', '}']) {
            return Err(RemoteError::Validation(format!(
                "remote prefix {:?} must be non-empty and hold no braces",
                cfg.prefix
            )));
        }
        let tls = tls_nodes(&cfg.nodes, &cfg.tls)?;
        let mut b = ClusterClient::builder(cfg.nodes.clone())
            .connection_timeout(cfg.timeout)
            .response_timeout(cfg.timeout)
            .retries(2);
        if tls && cfg.tls.is_set() {
            b = b.certs(cfg.tls.certificates());
        }
        if let Some(u) = &cfg.user {
            b = b.username(u.clone());
        }
        if let Some(p) = &cfg.password {
            b = b.password(p.clone());
        }
        let client = b.build()?;
        let remote = Self {
            cfg,
            client,
            pool: Mutex::new(Vec::new()),
            in_flight: Mutex::new(0),
        };
        // Fail now, not at the first request, when the cluster cannot be reached.
        drop(remote.conn()?);
        Ok(remote)
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    fn conn(&self) -> Result<Conn<'_>, RemoteError> {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        let conn = match pooled {
            Some(c) => c,
            None => self.client.get_connection()?,
        };
        Ok(Conn {
            remote: self,
            conn: Some(conn),
        })
    }

    /// Runs `f`, an idempotent request (a read, an insert-only write, a compare-and-set that
    /// a repeat leaves as it is), on a pooled connection, sending it again on a fresh
    /// connection when a socket call was interrupted (see [`Remote::run_once`]).
    fn run<T>(
        &self,
        mut f: impl FnMut(&mut ClusterConnection) -> redis::RedisResult<T>,
    ) -> Result<T, RemoteError> {
        let mut tries = 0;
        loop {
            match self.run_once(&mut f) {
                Err(Interrupted::Yes(_)) if tries < INTERRUPTED_RETRIES => tries += 1,
                r => return r.map_err(RemoteError::from),
            }
        }
    }

    /// Runs `f` on a pooled connection once; after an outage the connection is discarded.
    /// A blocking socket call with a timeout fails with EINTR when the process is stopped
    /// and resumed (SIGSTOP and SIGCONT, a cgroup freezer) even without a signal handler:
    /// that comes back as [`Interrupted`] (the request may or may not have run).
    fn run_once<T>(
        &self,
        f: impl FnOnce(&mut ClusterConnection) -> redis::RedisResult<T>,
    ) -> Result<T, Interrupted> {
        let mut c = self.conn().map_err(Interrupted::Not)?;
        f(&mut c).map_err(|e| {
            let interrupted = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(|io| io.kind() == std::io::ErrorKind::Interrupted);
            let e = RemoteError::from(e);
            if e.is_outage() {
                c.discard();
            }
            if interrupted {
                Interrupted::Yes(e)
            } else {
                Interrupted::Not(e)
            }
        })
    }

    /// The Redis key of part `part` of block `key`.
    #[must_use]
    pub fn block_key(&self, key: u128, part: u32) -> String {
        match part {
            0 => format!("{}:b:{key:032x}", self.cfg.prefix),
            p => format!("{}:b:{key:032x}:{p}", self.cfg.prefix),
        }
    }

    /// The Redis key of `what` (`head`, `fence`, `lock`, `m:<token>`) of window `name`.
    #[must_use]
    pub fn window_key(&self, name: &str, what: &str) -> String {
        format!(
            "{}:w:{{{:032x}}}:{what}",
            self.cfg.prefix,
            crate::store::name_key(name)
        )
    }

    /// Which of `keys` the tier holds (one pipelined probe; a block counts once its first
    /// value is there, which is written last).
    pub fn probe(&self, keys: &[u128]) -> Result<Vec<bool>, RemoteError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::cluster::cluster_pipe();
        for k in keys {
            pipe.cmd("EXISTS").arg(self.block_key(*k, 0));
        }
        let found: Vec<i64> = self.run(|c| pipe.query(c))?;
        Ok(found.into_iter().map(|n| n > 0).collect())
    }

    /// Stores blocks the tier does not hold yet; returns how many were written (the rest
    /// were there).
    pub fn put_blocks(&self, blocks: &[(u128, &[u8])]) -> Result<usize, RemoteError> {
        let keys: Vec<u128> = blocks.iter().map(|(k, _)| *k).collect();
        let held = self.probe(&keys)?;
        let missing: Vec<(u128, &[u8])> = blocks
            .iter()
            .zip(held)
            .filter(|(_, h)| !h)
            .map(|(b, _)| *b)
            .collect();
        self.write_blocks(&missing)?;
        Ok(missing.len())
    }

    /// Writes blocks (`SET NX`: one another instance wrote meanwhile is left alone) in
    /// pipelines of about 64 MiB. Further parts are written before the first, so a block whose
    /// first value is visible is whole (unless Redis evicted a part: reads then refuse it).
    pub fn write_blocks(&self, blocks: &[(u128, &[u8])]) -> Result<(), RemoteError> {
        let summed: Vec<(u128, &[u8], Option<u64>)> =
            blocks.iter().map(|&(k, p)| (k, p, None)).collect();
        self.write_blocks_summed(&summed)
    }

    /// [`Remote::write_blocks`] with each payload's xxh3-64 when the caller has it (the local
    /// log's records carry it): the payload is then neither hashed nor copied again before it
    /// goes into the request buffer.
    pub fn write_blocks_summed(
        &self,
        blocks: &[(u128, &[u8], Option<u64>)],
    ) -> Result<(), RemoteError> {
        let ttl = self.cfg.block_ttl.as_secs().max(1);
        let mut pipe = redis::cluster::cluster_pipe();
        let mut queued = 0usize;
        for &(key, payload, sum) in blocks {
            let b = value::EncodedBlock::new(key, payload, sum, self.cfg.max_value);
            let order = (1..b.parts()).chain(std::iter::once(0));
            for i in order {
                let v = b.arg(i);
                queued += v.len();
                pipe.cmd("SET")
                    .arg(self.block_key(key, i as u32))
                    .arg(v)
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
            if queued >= 64 << 20 {
                self.run(|c| pipe.query::<()>(c))?;
                pipe = redis::cluster::cluster_pipe();
                queued = 0;
            }
        }
        if queued > 0 {
            self.run(|c| pipe.query::<()>(c))?;
        }
        Ok(())
    }

    /// Reads block `key`, refreshing its TTL, and verifies it (against the manifest's
    /// (length, checksum) when given). Missing: NOT_FOUND; anything that fails a check:
    /// CORRUPTION.
    pub fn get_block(
        &self,
        key: u128,
        expected: Option<(u64, u64)>,
    ) -> Result<Vec<u8>, RemoteError> {
        let want = Want {
            key,
            len: expected.map(|(l, _)| l),
            checksum: expected.map(|(_, c)| c),
        };
        self.get_blocks::<Vec<u8>>(&[want])?
            .pop()
            .unwrap_or_else(|| Err(RemoteError::NotFound(format!("block {key:032x}"))))
            .map(|(payload, _)| payload)
    }

    /// Reads blocks in two pipelined round trips (every first value, then every further
    /// part), refreshing their TTLs; each verified as [`Remote::get_block`] does (its length
    /// and checksum, when known, checked before any byte is copied), its payload assembled
    /// in a `B`. The outer error is the tier failing; the inner ones say, per block, why it
    /// was refused. Each block comes with its payload checksum (xxh3-64, just verified).
    pub fn get_blocks<B: PayloadBuf>(
        &self,
        blocks: &[Want],
    ) -> Result<Vec<FetchedBlock<B>>, RemoteError> {
        Ok(self
            .get_blocks_unverified(blocks)?
            .into_iter()
            .map(|r| r.and_then(Unverified::verify))
            .collect())
    }

    /// [`Remote::get_blocks`] with every check made but the payload's checksum, which
    /// [`Unverified::verify`] makes — on another thread, while the next batch is read — before
    /// the payload can be had.
    pub fn get_blocks_unverified<B: PayloadBuf>(
        &self,
        blocks: &[Want],
    ) -> Result<Vec<Result<Unverified<B>, RemoteError>>, RemoteError> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.cfg.block_ttl.as_secs().max(1);
        let mut pipe = redis::cluster::cluster_pipe();
        for w in blocks {
            pipe.cmd("GETEX")
                .arg(self.block_key(w.key, 0))
                .arg("EX")
                .arg(ttl);
        }
        let firsts: Vec<Option<Vec<u8>>> = self.run(|c| pipe.query(c))?;
        let mut out: Vec<Result<(value::BlockHeader, B), RemoteError>> = blocks
            .iter()
            .zip(firsts)
            .map(|(w, first)| self.first_part(w, first))
            .collect();
        let mut pipe = redis::cluster::cluster_pipe();
        let mut asked = Vec::new();
        for (b, r) in out.iter().enumerate() {
            if let Ok((h, _)) = r {
                for i in 1..h.parts {
                    pipe.cmd("GETEX")
                        .arg(self.block_key(h.key, i))
                        .arg("EX")
                        .arg(ttl);
                    asked.push((b, i));
                }
            }
        }
        if !asked.is_empty() {
            let rest: Vec<Option<Vec<u8>>> = self.run(|c| pipe.query(c))?;
            for ((b, i), v) in asked.into_iter().zip(rest) {
                let Some(Ok((h, payload))) = out.get_mut(b) else {
                    continue;
                };
                let ki = self.block_key(h.key, i);
                let r = match v {
                    None => Err(RemoteError::NotFound(format!("{ki} (a part of a block)"))),
                    Some(v) => value::put_part(h, i, &v, payload.payload_mut())
                        .map_err(|source| RemoteError::Corruption { key: ki, source }),
                };
                if let Err(e) = r {
                    out[b] = Err(e);
                }
            }
        }
        Ok(out
            .into_iter()
            .zip(blocks)
            .map(|(r, w)| {
                let (h, payload) = r?;
                Ok(Unverified {
                    payload,
                    checksum: w.checksum,
                    key: self.block_key(w.key, 0),
                    h,
                })
            })
            .collect())
    }

    /// Checks the first value of block `w.key` (as read: `None` if missing) and copies its
    /// payload bytes into a new `B`.
    fn first_part<B: PayloadBuf>(
        &self,
        w: &Want,
        first: Option<Vec<u8>>,
    ) -> Result<(value::BlockHeader, B), RemoteError> {
        let k0 = self.block_key(w.key, 0);
        let first = first.ok_or_else(|| RemoteError::NotFound(format!("block {:032x}", w.key)))?;
        let bad = |source| RemoteError::Corruption {
            key: k0.clone(),
            source,
        };
        let h = value::decode_block_header(&first, w.key).map_err(bad)?;
        // Before anything is allocated for it: a header may claim any length.
        if let Some(len) = w.len {
            if len != h.len {
                return Err(bad(ValueError::Payload(format!(
                    "{} bytes, {len} expected",
                    h.len
                ))));
            }
        }
        let mut payload = B::for_payload(h.len as usize);
        value::put_part(&h, 0, &first, payload.payload_mut()).map_err(bad)?;
        Ok((h, payload))
    }

    /// Memory of every master (`INFO memory`): `(used, limit)` bytes each, the limit being
    /// `maxmemory`, or the machine's memory when none is set.
    pub fn memory(&self) -> Result<Vec<(u64, u64)>, RemoteError> {
        let infos: std::collections::HashMap<String, String> =
            self.run(|c| redis::cmd("INFO").arg("memory").query(c))?;
        Ok(infos
            .values()
            .map(|info| {
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                let max = match field("maxmemory") {
                    0 => field("total_system_memory"),
                    m => m,
                };
                (field("used_memory"), max)
            })
            .collect())
    }

    /// The channel publishes are announced on (`P:announce`).
    #[must_use]
    pub fn announce_channel(&self) -> String {
        format!("{}:announce", self.cfg.prefix)
    }

    /// Announces that `keys` are now in the tier: a sharded `SPUBLISH` on
    /// [`Remote::announce_channel`], which only the shard owning the channel's slot (its
    /// master and replicas) carries — a plain `PUBLISH` would cross every node of the cluster
    /// bus. 16 bytes a key, little-endian; more than [`ANNOUNCE_KEYS`] keys are announced as
    /// an empty message ("anything may have changed").
    pub fn announce(&self, keys: &[u128]) -> Result<(), RemoteError> {
        let payload: Vec<u8> = if keys.len() > ANNOUNCE_KEYS {
            Vec::new()
        } else {
            keys.iter().flat_map(|k| k.to_le_bytes()).collect()
        };
        let ch = self.announce_channel();
        // (Routed by its first argument, the channel: to the master of the channel's slot.)
        self.run(|c| {
            redis::cmd("SPUBLISH")
                .arg(&ch)
                .arg(&payload)
                .query::<i64>(c)
        })?;
        Ok(())
    }

    /// A client for one node at `url`, with the tier's credentials and TLS material.
    fn node_client(
        &self,
        url: &str,
        protocol: redis::ProtocolVersion,
    ) -> Result<redis::Client, RemoteError> {
        let mut info: redis::ConnectionInfo = url.parse()?;
        info.redis.username = self.cfg.user.clone().or(info.redis.username);
        info.redis.password = self.cfg.password.clone().or(info.redis.password);
        info.redis.protocol = protocol;
        Ok(if url.starts_with("rediss://") && self.cfg.tls.is_set() {
            redis::Client::build_with_tls(info, self.cfg.tls.certificates())?
        } else {
            redis::Client::open(info)?
        })
    }

    /// The `host:port` of the master serving `key`'s slot, as node `seed` (a URL) sees the
    /// cluster.
    fn slot_owner(&self, seed: &str, key: &str) -> Result<String, RemoteError> {
        let mut c = self
            .node_client(seed, redis::ProtocolVersion::RESP2)?
            .get_connection_with_timeout(self.cfg.timeout)?;
        c.set_read_timeout(Some(self.cfg.timeout))?;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)?;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c)?;
        let int = |v: &redis::Value| match v {
            redis::Value::Int(i) => Some(*i),
            _ => None,
        };
        for entry in &slots {
            let redis::Value::Array(e) = entry else {
                continue;
            };
            let (Some(from), Some(to)) = (e.first().and_then(int), e.get(1).and_then(int)) else {
                continue;
            };
            if !(from..=to).contains(&slot) {
                continue;
            }
            if let Some(redis::Value::Array(master)) = e.get(2) {
                let host = match master.first() {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(redis::Value::SimpleString(s)) => s.clone(),
                    _ => continue,
                };
                if let Some(port) = master.get(1).and_then(int) {
                    // (An empty or "?" host means "the address you reached me on".)
                    let host = if host.is_empty() || host == "?" {
                        seed_host(seed).to_string()
                    } else {
                        host
                    };
                    return Ok(format!("{host}:{port}"));
                }
            }
        }
        Err(RemoteError::Unavailable(format!(
            "no node serves slot {slot} (cluster down?)"
        )))
    }

    /// Listens to the announcements: asks seed node `i` (modulo their number) which master
    /// serves the channel's slot, subscribes there (`SSUBSCRIBE`, RESP3) and hands `on` each
    /// announcement's keys (empty: anything may have changed), or `None` when none came
    /// within `wait`; `on` ends the listening by returning false. Returns when `on` does, or
    /// with the error that ended the subscription — a broken connection, or the slot moving
    /// to another master (failover, resharding): the caller subscribes again.
    pub fn listen(
        &self,
        i: usize,
        wait: Duration,
        mut on: impl FnMut(Option<Vec<u128>>) -> bool,
    ) -> Result<(), RemoteError> {
        let seed = &self.cfg.nodes[i % self.cfg.nodes.len().max(1)];
        let ch = self.announce_channel();
        let owner = self.slot_owner(seed, &ch)?;
        let scheme = if seed.starts_with("rediss://") {
            "rediss"
        } else {
            "redis"
        };
        let mut conn = self
            .node_client(
                &format!("{scheme}://{owner}"),
                redis::ProtocolVersion::RESP3,
            )?
            .get_connection_with_timeout(self.cfg.timeout)?;
        let (tx, rx) = std::sync::mpsc::channel();
        conn.set_push_sender(tx);
        conn.set_read_timeout(Some(self.cfg.timeout))?;
        redis::cmd("SSUBSCRIBE")
            .arg(&ch)
            .set_no_response(true)
            .exec(&mut conn)?;
        conn.set_read_timeout(Some(wait))?;
        let subscribe = redis::cmd("SSUBSCRIBE").arg(&ch).get_packed_command();
        // Liveness: a node that stops answering (paused, partitioned) keeps its socket open.
        // After [`KEEPALIVE`] without a push the subscription is asked for again (its
        // confirmation is a push too); no push within the request timeout after that ends it.
        let mut last_push = std::time::Instant::now();
        let mut asked: Option<std::time::Instant> = None;
        loop {
            // Reading delivers the pushes (messages, subscription changes) to `rx`; what the
            // read itself returns is not looked at, but for a broken connection.
            let read = conn.recv_response();
            let mut heard = false;
            while let Ok(p) = rx.try_recv() {
                last_push = std::time::Instant::now();
                asked = None;
                match p.kind {
                    redis::PushKind::SMessage => {
                        heard = true;
                        let keys = match p.data.get(1) {
                            Some(redis::Value::BulkString(b)) => b
                                .chunks_exact(16)
                                .map(|c| {
                                    let mut k = [0u8; 16];
                                    k.copy_from_slice(c);
                                    u128::from_le_bytes(k)
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        if !on(Some(keys)) {
                            return Ok(());
                        }
                    }
                    redis::PushKind::SUnsubscribe => {
                        return Err(RemoteError::Unavailable(format!(
                            "the announcement channel left {owner} (its slot moved)"
                        )))
                    }
                    redis::PushKind::Disconnection => {
                        return Err(RemoteError::Unavailable(format!(
                            "the announcement subscription at {owner} was disconnected"
                        )))
                    }
                    _ => {}
                }
            }
            match read {
                Err(e) if !e.is_timeout() => return Err(e.into()),
                _ => {}
            }
            match asked {
                Some(at) if at.elapsed() > self.cfg.timeout + wait => {
                    return Err(RemoteError::Timeout(format!(
                        "the announcement subscription at {owner} stopped answering"
                    )))
                }
                None if last_push.elapsed() > KEEPALIVE => {
                    conn.send_packed_command(&subscribe)?;
                    asked = Some(std::time::Instant::now());
                }
                _ => {}
            }
            if !heard && !on(None) {
                return Ok(());
            }
        }
    }

    /// Every master's replication offset and its replicas' (`INFO replication`).
    fn replication(&self) -> Result<HashMap<String, (u64, Vec<u64>)>, RemoteError> {
        let infos: HashMap<String, String> =
            self.run(|c| redis::cmd("INFO").arg("replication").query(c))?;
        Ok(infos
            .into_iter()
            .map(|(addr, info)| {
                let mut own = 0;
                let mut replicas = Vec::new();
                for l in info.lines() {
                    if let Some(v) = l.strip_prefix("master_repl_offset:") {
                        own = v.trim().parse().unwrap_or(0);
                    } else if l.starts_with("slave") && l.contains("state=online") {
                        if let Some(o) = l
                            .split(',')
                            .find_map(|f| f.strip_prefix("offset="))
                            .and_then(|v| v.trim().parse().ok())
                        {
                            replicas.push(o);
                        }
                    }
                }
                (addr, (own, replicas))
            })
            .collect())
    }

    /// Waits until at least `n` replicas of every master have received everything written to
    /// it before this call (their offsets reach the master's as read now), for at most
    /// `timeout`. False when they did not in time (a master with fewer replicas never does).
    /// Unlike `WAIT`, this does not depend on which pooled connection made the writes.
    pub fn wait_replicated(&self, n: usize, timeout: Duration) -> Result<bool, RemoteError> {
        let target = self.replication()?;
        let until = std::time::Instant::now() + timeout;
        loop {
            let now = self.replication()?;
            let done = target.iter().all(|(addr, (want, _))| {
                now.get(addr)
                    .is_some_and(|(_, reps)| reps.iter().filter(|o| **o >= *want).count() >= n)
            });
            if done {
                return Ok(true);
            }
            if std::time::Instant::now() >= until {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new fencing token for `name` (a counter, never reused).
    pub fn token(&self, name: &str) -> Result<u64, RemoteError> {
        let t: u64 = self.run(|c| {
            redis::cmd("INCR")
                .arg(self.window_key(name, "fence"))
                .query(c)
        })?;
        Ok(t)
    }

    /// Publishes `manifest` (the store's encoding) as the new version of `name`, holding
    /// fencing token `token`; its blocks must be in the tier already. Returns the new head.
    pub fn publish(
        &self,
        name: &str,
        manifest: &[u8],
        expect: Expect,
        token: u64,
    ) -> Result<Head, RemoteError> {
        // The manifest the head names now: superseded by this publish, it expires after a
        // grace (if the head moved meanwhile, that one is left: a script touches only the
        // keys it is given).
        let before = self
            .run(|c| {
                redis::cmd("HGET")
                    .arg(self.window_key(name, "head"))
                    .arg("token")
                    .query::<Option<String>>(c)
            })?
            .unwrap_or_default();
        let before_key = self.window_key(name, &format!("m:{before}"));
        // The window's expiry (0: none), from the manifest the head will name.
        let expires = crate::store::Manifest::decode(manifest)
            .ok()
            .and_then(|m| m.retention.expires_unix_ms)
            .unwrap_or(0)
            .max(0);
        let mkey = self.window_key(name, &format!("m:{token}"));
        // Immutable: a token names one publish attempt, whose manifest is written once.
        let _: Option<String> = self.run(|c| {
            redis::cmd("SET")
                .arg(&mkey)
                .arg(value::encode_manifest(manifest))
                .arg("NX")
                .query(c)
        })?;
        let checksum = xxhash_rust::xxh3::xxh3_64(manifest);
        let exp = match expect {
            Expect::New => "new".to_string(),
            Expect::Any => "any".to_string(),
            Expect::Generation(g) => g.to_string(),
        };
        // Once: a repeat of a publish that ran would find its own head (and refuse it).
        let (verdict, n): (String, u64) = self
            .run_once(|c| {
                redis::Script::new(PUBLISH)
                    .key(self.window_key(name, "head"))
                    .key(&mkey)
                    .key(&before_key)
                    .arg(exp)
                    .arg(token)
                    .arg(manifest.len() as u64)
                    .arg(checksum.to_string())
                    .arg(name)
                    .arg(crate::clock::now_unix_ms())
                    .arg(expires)
                    .arg(MANIFEST_GRACE_MS)
                    .arg(&before)
                    .invoke(c)
            })
            .map_err(RemoteError::from)?;
        match verdict.as_str() {
            "OK" => Ok(Head {
                name: name.to_string(),
                generation: n,
                token,
                manifest_len: manifest.len() as u64,
                manifest_checksum: checksum,
            }),
            "EXISTS" => Err(RemoteError::AlreadyExists(name.to_string())),
            "CONFLICT" => Err(RemoteError::ConcurrentModification {
                name: name.to_string(),
                expected: match expect {
                    Expect::Generation(g) => g,
                    _ => 0,
                },
                found: n,
            }),
            "FENCED" => Err(RemoteError::Fenced {
                name: name.to_string(),
                token,
                highest: n,
            }),
            v => Err(RemoteError::Redis(format!(
                "publish of {name:?} answered {v} (manifest value missing or of another length)"
            ))),
        }
    }

    /// The current head of `name` (`None`: not in the tier).
    pub fn head(&self, name: &str) -> Result<Option<Head>, RemoteError> {
        let key = self.window_key(name, "head");
        let f: std::collections::HashMap<String, String> =
            self.run(|c| redis::cmd("HGETALL").arg(&key).query(c))?;
        if f.is_empty() {
            return Ok(None);
        }
        let num = |k: &str| -> Result<u64, RemoteError> {
            f.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| RemoteError::Corruption {
                    key: key.clone(),
                    source: ValueError::Inconsistent("head field missing or not a number"),
                })
        };
        let head = Head {
            name: f.get("name").cloned().unwrap_or_default(),
            generation: num("gen")?,
            token: num("token")?,
            manifest_len: num("len")?,
            manifest_checksum: num("sum")?,
        };
        if head.name != name {
            return Err(RemoteError::Corruption {
                key,
                source: ValueError::Inconsistent("head names another window"),
            });
        }
        Ok(Some(head))
    }

    /// The current head of `name` and its manifest bytes, verified against the head.
    pub fn manifest(&self, name: &str) -> Result<(Head, Vec<u8>), RemoteError> {
        let head = self
            .head(name)?
            .ok_or_else(|| RemoteError::NotFound(format!("window {name:?}")))?;
        let mkey = self.window_key(name, &format!("m:{}", head.token));
        let v: Option<Vec<u8>> = self.run(|c| redis::cmd("GET").arg(&mkey).query(c))?;
        let v = v.ok_or_else(|| RemoteError::NotFound(format!("manifest {mkey}")))?;
        let body = value::decode_manifest(&v, head.manifest_len, head.manifest_checksum)
            .map_err(|source| RemoteError::Corruption { key: mkey, source })?;
        Ok((head.clone(), body.to_vec()))
    }

    /// The current head of `name` and its manifest, verified against the head and decoded
    /// (one that does not decode, or names another window: CORRUPTION).
    pub fn published(&self, name: &str) -> Result<(Head, crate::store::Manifest), RemoteError> {
        let (head, bytes) = self.manifest(name)?;
        let m = crate::store::Manifest::decode(&bytes).map_err(|e| RemoteError::Corruption {
            key: self.window_key(name, &format!("m:{}", head.token)),
            source: ValueError::Payload(format!("manifest does not decode: {e}")),
        })?;
        if m.name != name {
            return Err(RemoteError::Corruption {
                key: self.window_key(name, "head"),
                source: ValueError::Inconsistent("manifest of another window"),
            });
        }
        Ok((head, m))
    }

    /// [`Remote::published`], unless the window's TTL has passed: NOT_FOUND then — an expired
    /// window is gone for every reader at once, on every instance, though its head and
    /// manifest stay in the tier until replaced.
    pub fn published_live(
        &self,
        name: &str,
    ) -> Result<(Head, crate::store::Manifest), RemoteError> {
        let (head, m) = self.published(name)?;
        if m.retention.expired(crate::clock::now_unix_ms()) {
            return Err(RemoteError::NotFound(format!(
                "window {name:?} (its TTL has passed)"
            )));
        }
        Ok((head, m))
    }

    /// Takes `name`'s lease for `lease` (SET NX PX with a fresh fencing token as value);
    /// returns the token. Another holder: BUSY.
    pub fn lock(&self, name: &str, lease: Duration) -> Result<u64, RemoteError> {
        let token = self.token(name)?;
        // Once: a repeat of a SET NX that ran would find its own lease (and say BUSY).
        let ok: Option<String> = self
            .run_once(|c| {
                redis::cmd("SET")
                    .arg(self.window_key(name, "lock"))
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease.as_millis().max(1) as u64)
                    .query(c)
            })
            .map_err(RemoteError::from)?;
        match ok {
            Some(_) => Ok(token),
            None => Err(RemoteError::Busy(name.to_string())),
        }
    }

    /// Renews the lease held with `token`; `false`: it expired (or another holds it).
    pub fn renew(&self, name: &str, token: u64, lease: Duration) -> Result<bool, RemoteError> {
        let n: i64 = self.run(|c| {
            redis::Script::new(RENEW)
                .key(self.window_key(name, "lock"))
                .arg(token)
                .arg(lease.as_millis().max(1) as u64)
                .invoke(c)
        })?;
        Ok(n == 1)
    }

    /// Releases the lease held with `token` (a no-op when it expired or another holds it).
    pub fn unlock(&self, name: &str, token: u64) -> Result<bool, RemoteError> {
        let n: i64 = self.run(|c| {
            redis::Script::new(RELEASE)
                .key(self.window_key(name, "lock"))
                .arg(token)
                .invoke(c)
        })?;
        Ok(n == 1)
    }
}
