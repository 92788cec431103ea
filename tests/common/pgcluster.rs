//! A private PostgreSQL cluster for one test (initdb + pg_ctl on a free loopback port, in a temp
//! dir of its own), so a test can stop and restart the database under a running nidan without
//! touching the shared server the other tests use. Run as the `postgres` user when the tests run
//! as root (initdb refuses root). Stopped (immediately) and removed when dropped.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::slapd::free_port;

pub struct PgCluster {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_postgres: bool,
    running: bool,
}

/// The directory with `initdb` and `pg_ctl`: the newest /usr/lib/postgresql/*/bin, else PATH.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("pg_ctl").exists().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => PathBuf::from("/usr/local/bin"),
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// initdb and start on a free port (a few ports are tried if another test takes one first).
    pub async fn start() -> PgCluster {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("the cluster starts")
    }

    fn start_blocking() -> PgCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres = running_as_root();
        if as_postgres {
            let out = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .output()
                .expect("chown runs");
            assert!(out.status.success(), "chown: {out:?}");
        }
        let mut cluster = PgCluster {
            port: 0,
            bin: bin_dir(),
            dir,
            as_postgres,
            running: false,
        };
        let data = cluster.data().display().to_string();
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            if cluster.try_start() {
                return cluster;
            }
            last = cluster.log();
        }
        panic!("the private PostgreSQL cluster did not start:\n{last}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A URL for `database` (the cluster has `postgres`; create others through it).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{} cannot run: {e}", program.display()))
    }

    fn try_start(&mut self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let data = self.data().display().to_string();
        let log = self.log_path().display().to_string();
        let out = self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "30", "start",
            ],
        );
        self.running = out.status.success();
        self.running
    }

    /// Starts the stopped cluster again on the same port.
    pub async fn start_again(&mut self) {
        let mut cluster = std::mem::replace(self, Self::placeholder());
        let cluster = tokio::task::spawn_blocking(move || {
            for _ in 0..20 {
                if cluster.try_start() {
                    return cluster;
                }
                // The old postmaster may still hold the port for a moment.
                std::thread::sleep(Duration::from_millis(250));
            }
            panic!("the cluster did not start again:\n{}", cluster.log());
        })
        .await
        .expect("restart task");
        *self = cluster;
    }

    /// Stops the cluster: `fast` disconnects every client and shuts down cleanly.
    pub async fn stop(&mut self) {
        let mut cluster = std::mem::replace(self, Self::placeholder());
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.stop_blocking("fast");
            cluster
        })
        .await
        .expect("stop task");
        *self = cluster;
    }

    /// `pg_ctl restart -m fast`: what an operator does for a configuration change or an upgrade.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    fn stop_blocking(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let data = self.data().display().to_string();
        let out = self.run(
            "pg_ctl",
            &["-D", &data, "-m", mode, "-w", "-t", "30", "stop"],
        );
        assert!(
            out.status.success() || mode == "immediate",
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// A stand-in while the real cluster is moved into a blocking task.
    fn placeholder() -> PgCluster {
        PgCluster {
            port: 0,
            bin: PathBuf::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            as_postgres: false,
            running: false,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_blocking("immediate");
    }
}
