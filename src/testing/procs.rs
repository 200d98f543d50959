//! `hat serve-cloud` and `hat run-edge` as processes, the way a user deploys them, for the
//! benchmarks: where each runs ([`Placement`]: two one-core "machines" or shared cores), an
//! emulated [`Link`], a [`Cloud`] killed when dropped, and [`run_edge`] returning its JSON.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// One emulated link: the same rate both ways and a round trip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub mbps: f64,
    pub rtt_ms: f64,
}

impl Link {
    /// `run-edge`/`profile` flags emulating it.
    pub fn flags(&self) -> Vec<String> {
        let m = self.mbps.to_string();
        vec!["--link-up-mbps".into(), m.clone(), "--link-down-mbps".into(), m, "--link-rtt-ms".into(), self.rtt_ms.to_string()]
    }

    pub fn name(&self) -> String {
        format!("{:.0} Mbit/s, {:.0} ms", self.mbps, self.rtt_ms)
    }

    /// Parses `10/20,50/80` (Mbit/s / RTT ms).
    pub fn parse_list(s: &str) -> Vec<Link> {
        s.split(',')
            .filter_map(|l| {
                let (m, r) = l.split_once('/')?;
                Some(Link { mbps: m.trim().parse().ok()?, rtt_ms: r.trim().parse().ok()? })
            })
            .collect()
    }
}

/// Where the processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Cloud on core 1, edge on core 0, one thread each.
    TwoMachines,
    /// Both on every core, default threads.
    Shared,
}

impl Placement {
    /// `hat` (at `bin`) as this placement runs it on `core`.
    pub fn command(self, bin: &str, core: usize) -> Command {
        match self {
            Placement::TwoMachines => {
                let mut c = Command::new("taskset");
                c.args(["-c", &core.to_string(), bin, "--threads", "1"]);
                c
            }
            Placement::Shared => Command::new(bin),
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Placement::TwoMachines => "two machines: cloud `taskset -c 1 … --threads 1`, edge `taskset -c 0 … --threads 1`",
            Placement::Shared => "shared cores: both processes on both cores, default threads",
        }
    }

    /// Whether this machine can pin two processes to two cores.
    pub fn can_pin() -> bool {
        Command::new("taskset").arg("--version").output().is_ok() && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
    }
}

/// A running `hat serve-cloud`; killed when dropped.
pub struct Cloud {
    child: Child,
    pub addr: String,
    pub fingerprint: String,
}

impl Cloud {
    /// Starts `hat serve-cloud` for `split/cloud` on `port` with `extra` flags, state in
    /// `split/state-PORT`, and waits until it listens.
    pub fn start(bin: &str, placement: Placement, split: &Path, port: u16, extra: &[String]) -> anyhow::Result<Self> {
        let addr = format!("127.0.0.1:{port}");
        let mut child = placement
            .command(bin, 1)
            .args(["serve-cloud", "--bundle"])
            .arg(split.join("cloud"))
            .args(["--listen", &addr, "--state-dir"])
            .arg(split.join(format!("state-{port}")))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut fingerprint = None;
        for line in BufReader::new(out).lines() {
            let line = line?;
            if let Some(fp) = line.strip_prefix("fingerprint ") {
                fingerprint = Some(fp.trim().to_string());
                break;
            }
        }
        let fingerprint = fingerprint.ok_or_else(|| anyhow::anyhow!("serve-cloud exited without a fingerprint"))?;
        Ok(Self { child, addr, fingerprint })
    }

    /// `--cloud ADDR --cloud-fingerprint FP`.
    pub fn flags(&self) -> Vec<String> {
        vec!["--cloud".into(), self.addr.clone(), "--cloud-fingerprint".into(), self.fingerprint.clone()]
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `hat run-edge --bundle split/device --json` against `cloud` with `flags`; its JSON.
pub fn run_edge(bin: &str, placement: Placement, split: &Path, cloud: &Cloud, link: Link, flags: &[String]) -> anyhow::Result<Value> {
    let out = placement
        .command(bin, 0)
        .args(["run-edge", "--bundle"])
        .arg(split.join("device"))
        .args(cloud.flags())
        .arg("--json")
        .args(link.flags())
        .args(flags)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("run-edge {flags:?} failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
