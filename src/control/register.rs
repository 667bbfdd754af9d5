//! The `register` op: an engine's KV memory (shared-memory files, another process's memory,
//! or CUDA IPC handles) and layout become a named [`Engine`], with a staging pool (an idle
//! one adopted when it fits).

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use serde_json::{json, Value};

use super::handler::Ctx;
use super::protocol::{self, ApiError};
use super::Server;
use crate::device::host::{ProcessMemory, ShmMemory};
use crate::device::KvMemory;
use crate::error::ErrorCode;
use crate::pipeline::Engine;

/// A registered engine and who registered it.
#[derive(Clone)]
pub(super) struct Registration {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The uid of the client that registered it (`None`: unknown).
    pub owner: Option<u32>,
}

/// Whether a request of `uid` may use, replace or unregister engine `name`, registered by
/// `owner`: the owner may, and so may the daemon's own uid (the operator's). A peer let in
/// with `--allow-uid` otherwise could read another user's conversations out of its engine,
/// write into it, or take its name.
pub(super) fn may_use(owner: Option<u32>, uid: Option<u32>, name: &str) -> Result<(), ApiError> {
    // SAFETY: getuid has no preconditions.
    let own = unsafe { libc::getuid() };
    if owner == uid || uid == Some(own) {
        return Ok(());
    }
    let who = |u: Option<u32>| u.map_or_else(|| "unknown".to_string(), |u| u.to_string());
    Err(ApiError::new(
        ErrorCode::PermissionDenied,
        format!(
            "engine {name:?} was registered by uid {}, not by the requester (uid {})",
            who(owner),
            who(uid)
        ),
    ))
}

/// Memory a `register` names must be its requester's (`peer`): cwm reads and writes it with
/// its own rights.
fn owned_by(peer: Option<u32>, what: &str, owner: u32) -> Result<(), ApiError> {
    match peer {
        Some(p) if p == owner => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{what} belongs to uid {owner}, not to the requester (uid {})",
                peer.map_or_else(|| "unknown".to_string(), |p| p.to_string())
            ),
        )),
    }
}

impl Server {
    /// Refuses a registration under `name` by `uid` that would take another uid's engine
    /// name, or add an engine past `max_engines`.
    fn may_register(
        &self,
        engines: &std::collections::HashMap<String, Registration>,
        name: &str,
        uid: Option<u32>,
    ) -> Result<(), ApiError> {
        match engines.get(name) {
            Some(r) => may_use(r.owner, uid, name),
            None if engines.len() >= self.cfg.max_engines.max(1) => Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "{} engines are registered already (max_engines); unregister one first",
                    engines.len()
                ),
            )),
            None => Ok(()),
        }
    }

    /// `register`: imports an engine's KV memory under a name. The memory it names must be the
    /// requester's own: a shared-memory file it owns, a process running as it (cwm reads and
    /// writes that memory with its own rights, so an `--allow-uid` peer could otherwise name
    /// cwm's own files and processes).
    pub(super) fn op_register(&self, a: &Value, ctx: &Ctx<'_>) -> Result<Value, ApiError> {
        let peer = ctx.uid;
        use std::os::unix::fs::MetadataExt;
        let name = protocol::str_field(a, "engine")?.to_string();
        // Refused before any memory is opened (and again when inserted: the table may change).
        {
            let engines = self
                .engines
                .lock()
                .map_err(|_| ApiError::internal("engine table poisoned"))?;
            self.may_register(&engines, &name, ctx.uid)?;
        }
        let layout_spec: crate::layout::spec::LayoutSpec = serde_json::from_value(
            a.get("layout")
                .cloned()
                .ok_or_else(|| ApiError::validation("missing field layout"))?,
        )
        .map_err(|e| ApiError::validation(format!("layout: {e}")))?;
        let layout = crate::layout::spec::layout_of(&layout_spec).map_err(ApiError::validation)?;
        let mem = a
            .get("memory")
            .ok_or_else(|| ApiError::validation("missing field memory"))?;
        let mem: Arc<dyn KvMemory> = if let Some(paths) = mem.get("shm") {
            let paths: Vec<String> = serde_json::from_value(paths.clone()).map_err(|e| {
                ApiError::validation(format!("memory.shm must be a list of paths: {e}"))
            })?;
            self.shm_memory(&paths, peer)?
        } else if let Some(p) = mem.get("process") {
            let pid = p
                .get("pid")
                .and_then(Value::as_i64)
                .ok_or_else(|| ApiError::validation("memory.process.pid must be an integer"))?;
            let what = format!("process {pid}");
            let owner = std::fs::metadata(format!("/proc/{pid}"))
                .map_err(|e| ApiError::validation(format!("{what}: {e}")))?
                .uid();
            owned_by(peer, &what, owner)?;
            let tensors: Vec<(u64, u64)> = serde_json::from_value(
                p.get("tensors").cloned().unwrap_or(Value::Null),
            )
            .map_err(|e| {
                ApiError::validation(format!(
                    "memory.process.tensors must be [[address, bytes], …]: {e}"
                ))
            })?;
            Arc::new(ProcessMemory::new(pid as i32, tensors))
        } else if let Some(cuda) = mem.get("cuda") {
            self.cuda_memory(cuda)?
        } else {
            return Err(ApiError::validation(
                "memory must name shm (paths), process (pid, tensors) or cuda (tensors)",
            ));
        };
        let engine = Engine::new(
            layout,
            mem,
            protocol::opt_str(a, "model")?.unwrap_or_else(|| "default".into()),
            protocol::opt_str(a, "salt")?,
        )
        .map_err(ApiError::from)?;
        let idle = self.staging_pools.lock().ok().and_then(|pools| {
            pools
                .iter()
                .find(|p| Arc::strong_count(p) == 1 && engine.fits_staging(p, &self.cfg.pipeline))
                .cloned()
        });
        if !idle.is_some_and(|p| engine.adopt_staging(p)) {
            if let Ok(mut pools) = self.staging_pools.lock() {
                // Pools engines that went away left behind (of another block size, or made by
                // registrations refused at the end): past `max_engines` the oldest idle ones
                // go, so registering and unregistering engines of ever new sizes does not pin
                // memory without end. (What the I/O engine took as fixed buffers, at most
                // 1 GiB, stays with it.)
                while pools.len() >= self.cfg.max_engines.max(1) {
                    match pools.iter().position(|p| Arc::strong_count(p) == 1) {
                        Some(i) => drop(pools.remove(i)),
                        None => break,
                    }
                }
            }
            engine
                .prepare_staging(&self.cfg.pipeline, self.store.engine().as_ref())
                .map_err(ApiError::from)?;
            if let (Some(p), Ok(mut pools)) = (engine.staging(), self.staging_pools.lock()) {
                pools.push(p.clone());
            }
        }
        if self.tier.enabled() {
            // The RAM tier's arena is sized for the first engine's blocks and mapped into its
            // device (a GPU thaws from it with one copy).
            self.tier.prepare(engine.layout.block_bytes() as usize);
            self.tier.attach(engine.mem.as_ref());
        }
        let out = json!({"engine": name, "block_bytes": engine.layout.block_bytes(),
            "fingerprint": format!("{:016x}", engine.layout.fingerprint())});
        let engine = Arc::new(engine);
        {
            let mut engines = self
                .engines
                .lock()
                .map_err(|_| ApiError::internal("engine table poisoned"))?;
            self.may_register(&engines, &name, ctx.uid)?;
            let owner = ctx.uid;
            engines.insert(
                name.clone(),
                Registration {
                    engine: engine.clone(),
                    owner,
                },
            );
        }
        if let Ok(mut r) = ctx.registered.lock() {
            *r = Some((name, engine));
        }
        Ok(out)
    }

    /// Shared-memory files named by a `register` of `peer`: each path is resolved once, to a
    /// descriptor that opens nothing (O_PATH: no device is touched); where that really is,
    /// what it is and who owns it are checked through it, and only then is that same file
    /// opened for reading and writing. A check of the path, then a second open of it, would
    /// let a symlink swapped in between name another file.
    fn shm_memory(
        &self,
        paths: &[String],
        peer: Option<u32>,
    ) -> Result<Arc<dyn KvMemory>, ApiError> {
        use std::os::unix::fs::MetadataExt;
        let allowed =
            std::fs::canonicalize(&self.cfg.shm_dir).unwrap_or_else(|_| self.cfg.shm_dir.clone());
        let mut files = Vec::new();
        for p in paths {
            let at = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(p)
                .map_err(|e| ApiError::validation(format!("{p}: {e}")))?;
            let fd_path = format!("/proc/self/fd/{}", at.as_raw_fd());
            let real = std::fs::read_link(&fd_path)
                .map_err(|e| ApiError::validation(format!("{p}: {e}")))?;
            if !real.starts_with(&allowed) {
                return Err(ApiError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "{p} is outside the allowed shared-memory directory {}",
                        allowed.display()
                    ),
                ));
            }
            let meta = at
                .metadata()
                .map_err(|e| ApiError::validation(format!("{p}: {e}")))?;
            if !meta.is_file() {
                return Err(ApiError::validation(format!("{p} is not a regular file")));
            }
            owned_by(peer, p, meta.uid())?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fd_path)
                .map_err(|e| ApiError::validation(format!("{p}: {e}")))?;
            files.push(f);
        }
        Ok(Arc::new(
            ShmMemory::from_files(files).map_err(|e| ApiError::new(e.code(), e.to_string()))?,
        ))
    }

    /// Imports an engine's GPU tensors (CUDA IPC handles) and its optional interprocess event.
    fn cuda_memory(&self, cuda: &Value) -> Result<Arc<dyn KvMemory>, ApiError> {
        use crate::device::cuda::{Cuda, CudaMemory, IpcTensor};
        let tensors: Vec<crate::layout::spec::TensorSpec> = serde_json::from_value(
            cuda.get("tensors").cloned().unwrap_or(Value::Null),
        )
        .map_err(|e| {
            ApiError::validation(format!(
                "memory.cuda.tensors must be [{{handle, offset, size}}, …]: {e}"
            ))
        })?;
        let device = cuda.get("device").and_then(Value::as_i64).unwrap_or(0) as i32;
        let ctx = Cuda::shared(device)
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        let ipc = tensors
            .iter()
            .map(|t| {
                Ok(IpcTensor {
                    handle: crate::layout::spec::hex64(&t.handle).map_err(ApiError::validation)?,
                    offset: t.offset,
                    size: t.size,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let m = CudaMemory::open(ctx, &ipc).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
        if let Some(ev) = cuda.get("event").and_then(Value::as_str) {
            let h = crate::layout::spec::hex64(ev).map_err(ApiError::validation)?;
            m.wait_for_event(&h)
                .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
        }
        Ok(Arc::new(m))
    }
}
