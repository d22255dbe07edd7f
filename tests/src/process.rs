//! Running programs with bounds: [`run`] and [`run_ok`] wait for a command with a timeout and kill
//! it when the time is up; [`Process`] is a long-running child (a server, the agent, dnsmasq)
//! that the testbed tracks and kills on cleanup. Where a program runs (which netns, cgroup,
//! resolv.conf) is decided by the `Command` it is given: see `Node::command` and `Pod::command`.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

/// How often bounded waits poll.
const POLL: Duration = Duration::from_millis(10);

/// Describes a command for error messages: program and arguments, shell-like.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with its stdout and stderr captured; kills it after `timeout`.
/// A non-zero exit is not an error here (see [`run_ok`]); a timeout is.
pub fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn `{what}`"))?;
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("BUG: stdout is piped");
    let mut stderr = child.stderr.take().expect("BUG: stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("wait for `{what}`"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(POLL);
    };
    // The pipes close when the child (and any grandchild holding them) is gone. A grandchild
    // that outlives a killed child could hold them open; its pod cgroup is killed on cleanup.
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "`{what}` did not finish within {timeout:?}; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// Like [`run`], and fails with the command and its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let output = run(cmd, timeout)?;
    if !output.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A long-running child the testbed started and will kill on cleanup. Its stdout and stderr go
/// to log files in the testbed's temp dir.
#[derive(Clone)]
pub struct Process {
    label: String,
    pid: u32,
    child: Arc<Mutex<Child>>,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
}

fn lock(child: &Mutex<Child>) -> MutexGuard<'_, Child> {
    // A panic while holding the lock leaves the Child itself intact.
    child
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Process {
    pub(crate) fn spawn(label: &str, cmd: &mut Command, log_dir: &Path) -> anyhow::Result<Self> {
        let what = describe(cmd);
        let stdout_log = log_dir.join(format!("{label}.out"));
        let stderr_log = log_dir.join(format!("{label}.err"));
        let out = File::create(&stdout_log)
            .with_context(|| format!("create {}", stdout_log.display()))?;
        let err = File::create(&stderr_log)
            .with_context(|| format!("create {}", stderr_log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn `{what}` ({label})"))?;
        Ok(Self {
            label: label.to_owned(),
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            stdout_log,
            stderr_log,
        })
    }

    /// The label given at spawn; also the log files' stem.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The pid of the program itself (namespaces are entered before exec, no wrapper process).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the file that receives the program's stdout.
    pub fn stdout_log(&self) -> &Path {
        &self.stdout_log
    }

    /// Path of the file that receives the program's stderr.
    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// What the program has written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_log).unwrap_or_default()
    }

    /// What the program has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The exit status if the program has exited (and reaps it).
    pub fn try_wait(&self) -> anyhow::Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("wait for {} (pid {})", self.label, self.pid))
    }

    /// Sends `signal` unless the program has already been reaped (so a recycled pid is never
    /// signalled).
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let mut child = lock(&self.child);
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child (we hold
        // the lock that guards reaping), so it cannot have been recycled.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to {} (pid {})", self.label, self.pid));
        }
        Ok(())
    }

    /// Waits for the program to exit, at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}; stderr: {}",
                    self.label,
                    self.pid,
                    tail(&self.stderr(), 2000)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILLs the program and reaps it (bounded).
    pub fn kill(&self) -> anyhow::Result<()> {
        let mut child = lock(&self.child);
        // Child::kill is a no-op once reaped, so this never hits a recycled pid.
        let _ = child.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} (pid {}) survived SIGKILL for 5s", self.label, self.pid);
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until the program has a TCP socket listening on `port` (any address), read from
    /// `/proc/<pid>/net/tcp{,6}`, which shows the sockets of the program's own netns. Fails early
    /// if the program exits.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on port {port}; stderr: {}",
                    self.label,
                    tail(&self.stderr(), 2000)
                );
            }
            if listening_ports(self.pid)?.contains(&port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) not listening on port {port} after {timeout:?}; stderr: {}",
                    self.label,
                    self.pid,
                    tail(&self.stderr(), 2000)
                );
            }
            thread::sleep(POLL);
        }
    }
}

/// TCP ports in LISTEN state in the netns of `pid`.
fn listening_ports(pid: u32) -> anyhow::Result<Vec<u16>> {
    let mut ports = Vec::new();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{file}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        // "  0: 0100007F:1F90 00000000:0000 0A ...": local address:port (hex), remote, state.
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) =
                (fields.nth(1), fields.next(), fields.next())
            else {
                continue;
            };
            if state != "0A" {
                continue;
            }
            let Some((_, port)) = local.rsplit_once(':') else {
                continue;
            };
            if let Ok(port) = u16::from_str_radix(port, 16) {
                ports.push(port);
            }
        }
    }
    if ports.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(anyhow!("process {pid} is gone"));
    }
    Ok(ports)
}

/// The last `max` bytes of `s`, on a char boundary.
pub(crate) fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s.trim();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].trim()
}
