//! A real Redis Cluster for the shared-tier tests: `redis-server` processes on free loopback
//! ports (cluster mode, no persistence, short node timeout), joined by `redis-cli --cluster
//! create`, killed by PID when dropped. scripts/test.sh installs Debian's redis-server.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One node.
pub struct Node {
    pub port: u16,
    child: Child,
}

/// A running cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// redis-cli's TLS options (empty: plain nodes).
    tls: Vec<String>,
}

/// TLS material made by the openssl command-line tool: a CA, a certificate for 127.0.0.1 the
/// nodes serve, and a client certificate, both signed by the CA (P-256 keys).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA with its server and client certificates.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ossl = |args: &[&str]| {
            let o = Command::new("openssl")
                .current_dir(d)
                .args(args)
                .output()
                .expect("openssl (scripts/test.sh installs Debian's openssl)");
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let key = |name: &str| {
            ossl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                name,
            ])
        };
        key("ca.key");
        ossl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=cwm test CA",
            "-days",
            "2",
            "-out",
            "ca.crt",
        ]);
        std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for who in ["server", "client"] {
            key(&format!("{who}.key"));
            ossl(&[
                "req",
                "-new",
                "-key",
                &format!("{who}.key"),
                "-subj",
                &format!("/CN=cwm test {who}"),
                "-out",
                &format!("{who}.csr"),
            ]);
            ossl(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.crt"),
            ]);
        }
        Pki { dir }
    }

    /// A file of the PKI: `ca.crt`, `server.crt`, `server.key`, `client.crt`, `client.key`.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// The bytes of [`Pki::path`].
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("pki file")
    }
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// `n` ports p with p and p + 10000 (its cluster bus) free.
/// Both below the kernel's ephemeral range (32768 and up here), so no outgoing connection
/// takes a node's port or bus port between this check and the node's bind.
fn ports(n: usize) -> Vec<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut out = Vec::new();
    let seed = std::process::id().wrapping_mul(7919)
        + NEXT.fetch_add(97, std::sync::atomic::Ordering::Relaxed)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() % 1000);
    let mut p = 10000 + (seed % 12000) as u16;
    while out.len() < n {
        p = if p >= 21990 { 10000 } else { p + 1 };
        if free(p) && free(p + 10000) {
            out.push(p);
        }
    }
    out
}

fn cli(port: u16, tls: &[String], args: &[&str]) -> String {
    let o = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(tls)
        .args(args)
        .output()
        .expect("redis-cli (scripts/test.sh installs Debian's redis-server package)");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Cluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until every node says
    /// the cluster is ok.
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None)
    }

    /// [`Cluster::start`] of TLS-only nodes (`rediss://`, the cluster bus and replication over
    /// TLS too) serving `pki`'s server certificate; with `auth_clients` a client must present
    /// a certificate the CA signed.
    pub fn start_tls(masters: usize, pki: &Pki, auth_clients: bool) -> Self {
        Self::start_with(masters, 0, Some((pki, auth_clients)))
    }

    fn start_with(masters: usize, replicas: usize, tls: Option<(&Pki, bool)>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = masters * (1 + replicas);
        let mut nodes = Vec::new();
        let p = |pki: &Pki, f: &str| pki.path(f).to_string_lossy().into_owned();
        let (server_opts, cli_opts): (Vec<String>, Vec<String>) = match tls {
            None => (Vec::new(), Vec::new()),
            Some((pki, auth)) => (
                [
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--tls-cert-file",
                    &p(pki, "server.crt"),
                    "--tls-key-file",
                    &p(pki, "server.key"),
                    "--tls-ca-cert-file",
                    &p(pki, "ca.crt"),
                    "--tls-auth-clients",
                    if auth { "yes" } else { "no" },
                ]
                .map(String::from)
                .to_vec(),
                [
                    "--tls",
                    "--cacert",
                    &p(pki, "ca.crt"),
                    "--cert",
                    &p(pki, "client.crt"),
                    "--key",
                    &p(pki, "client.key"),
                ]
                .map(String::from)
                .to_vec(),
            ),
        };
        for port in ports(n) {
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d).expect("node dir");
            let child = if tls.is_some() {
                let mut extra = vec!["--port", "0", "--tls-port"];
                let ps = port.to_string();
                extra.push(&ps);
                extra.extend(server_opts.iter().map(String::as_str));
                spawn_on(None, &d, &extra)
            } else {
                spawn(port, &d)
            };
            nodes.push(Node { port, child });
        }
        let c = Cluster {
            dir,
            nodes,
            tls: cli_opts,
        };
        let t = Instant::now();
        for nd in &c.nodes {
            while c.cli(nd.port, &["PING"]).trim() != "PONG" {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "node {} never answered PING:\n{}",
                    nd.port,
                    c.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let addrs: Vec<String> = c
            .nodes
            .iter()
            .map(|nd| format!("127.0.0.1:{}", nd.port))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        let r = replicas.to_string();
        args.extend(["--cluster-replicas", &r, "--cluster-yes"]);
        let out = c.cli(c.nodes[0].port, &args);
        assert!(
            out.contains("[OK] All 16384 slots covered"),
            "cluster create: {out}"
        );
        c.wait_ok();
        // A replica that has not finished its first sync cannot fail over: wait until every
        // master sees its replicas online.
        let want = format!("connected_slaves:{replicas}");
        wait(
            || {
                c.masters(0).iter().all(|&m| {
                    let info = c.cli(c.nodes[m].port, &["INFO", "replication"]);
                    info.contains(&want) && info.matches("state=online").count() == replicas
                })
            },
            "replicas in sync",
        );
        c
    }

    /// One node holding every slot, started with `extra` redis-server options (e.g.
    /// `--maxmemory`).
    pub fn single(extra: &[&str]) -> Self {
        Self::single_at(free_port(), extra)
    }

    /// [`Cluster::single`] on `port` (one a client was told about before the node exists).
    pub fn single_at(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join(port.to_string());
        std::fs::create_dir_all(&d).expect("node dir");
        let child = spawn_with(port, &d, extra);
        wait(
            || cli(port, &[], &["PING"]).trim() == "PONG",
            "node answers PING",
        );
        cli(port, &[], &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        let c = Cluster {
            dir,
            nodes: vec![Node { port, child }],
            tls: Vec::new(),
        };
        c.wait_ok();
        c
    }

    /// Indexes of the nodes that are masters now, as node `from` sees them.
    pub fn masters(&self, from: usize) -> Vec<usize> {
        let out = self.cli(self.nodes[from].port, &["CLUSTER", "NODES"]);
        out.lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| {
                let addr = l.split_whitespace().nth(1)?;
                let port: u16 = addr.split(['@', ':']).nth(1)?.parse().ok()?;
                self.nodes.iter().position(|n| n.port == port)
            })
            .collect()
    }

    /// Pauses node `i` (SIGSTOP): it holds its sockets open and answers nothing.
    pub fn pause(&self, i: usize) {
        signal(&self.nodes[i].child, libc_sig::STOP);
    }

    /// Resumes a paused node (SIGCONT).
    pub fn resume(&self, i: usize) {
        signal(&self.nodes[i].child, libc_sig::CONT);
    }

    /// Waits until every live node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        for nd in &self.nodes {
            wait(
                || {
                    self.cli(nd.port, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                },
                "cluster_state:ok",
            );
        }
    }

    /// redis-cli against node port `port`, with the cluster's TLS options.
    fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, &self.tls, args)
    }

    /// The seed-node URLs (`rediss://` for a TLS cluster).
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Runs a redis-cli command against the node serving `key` (follows the redirect).
    pub fn cmd(&self, args: &[&str]) -> String {
        let o = Command::new("redis-cli")
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[0].port.to_string(),
            ])
            .args(&self.tls)
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a redis-cli command on node `i` (no redirects followed).
    pub fn cmd_on(&self, i: usize, args: &[&str]) -> String {
        self.cli(self.nodes[i].port, args)
    }

    /// Waits until every node but `except` reports `cluster_state:ok`.
    pub fn wait_ok_except(&self, except: usize) {
        for (i, nd) in self.nodes.iter().enumerate().filter(|(i, _)| *i != except) {
            wait(
                || {
                    self.cli(nd.port, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                },
                &format!("cluster_state:ok on node {i}"),
            );
        }
    }

    /// The tail of every node's log (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log =
                std::fs::read_to_string(self.dir.path().join(n.port.to_string()).join("redis.log"))
                    .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "== {}\n{}\n",
                n.port,
                lines[lines.len().saturating_sub(8)..].join("\n")
            ));
        }
        out
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
    }

    /// Restarts node `i` in its directory (its nodes.conf: it rejoins with its slots).
    pub fn restart(&mut self, i: usize) {
        let port = self.nodes[i].port;
        let d = self.dir.path().join(port.to_string());
        self.nodes[i].child = spawn(port, &d);
        wait(
            || cli(port, &[], &["PING"]).trim() == "PONG",
            "restarted node answers PING",
        );
    }
}

mod libc_sig {
    pub const STOP: &str = "STOP";
    pub const CONT: &str = "CONT";
}

fn signal(c: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &c.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// A port free a moment ago for a node (and its bus port), below the ephemeral range.
pub fn free_port() -> u16 {
    ports(1)[0]
}

fn spawn(port: u16, d: &std::path::Path) -> Child {
    spawn_with(port, d, &[])
}

fn spawn_with(port: u16, d: &std::path::Path, extra: &[&str]) -> Child {
    spawn_on(Some(port), d, extra)
}

/// A node on plain `port`, or with `None` on the ports `extra` names.
fn spawn_on(port: Option<u16>, d: &std::path::Path, extra: &[&str]) -> Child {
    let mut cmd = Command::new("redis-server");
    if let Some(port) = port {
        cmd.args(["--port", &port.to_string()]);
    }
    cmd.args(["--bind", "127.0.0.1"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args([
            "--cluster-node-timeout",
            "1000",
            "--appendonly",
            "no",
            "--save",
            "",
            // Replicas sync at once, and may always take over.
            "--repl-diskless-sync-delay",
            "0",
            "--cluster-replica-validity-factor",
            "0",
        ])
        .args(["--protected-mode", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(d)
        .arg("--logfile")
        .arg(d.join("redis.log"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/test.sh installs Debian's redis-server package)")
}

fn wait(mut ok: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}
