//! A real S3-compatible server for the `repo sync` tests: moto in server mode (from PyPI;
//! `tests/run.sh` installs it into a virtualenv under `~/.cache/keepup/moto-py311`). It runs on
//! the test machine, bound to the test network's gateway address, which both the test and the
//! host containers reach (an internal network has no route out, but its gateway is this
//! machine). Buckets are made and read with boto3 from the same virtualenv.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::host::TestNet;

/// The opt-out: with `KEEPUP_SKIP_S3_TESTS=1` the S3 tests skip (and say so).
pub fn skip_s3() -> bool {
    if std::env::var("KEEPUP_SKIP_S3_TESTS").as_deref() == Ok("1") {
        eprintln!("KEEPUP_SKIP_S3_TESTS=1: skipping the S3 test");
        return true;
    }
    false
}

/// The virtualenv moto lives in (`KEEPUP_MOTO_VENV` overrides).
pub fn moto_venv() -> PathBuf {
    if let Ok(v) = std::env::var("KEEPUP_MOTO_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/keepup/moto-py311")
}

/// Access key the tests use (moto accepts any).
pub const ACCESS_KEY: &str = "keepup-test";
/// Secret key the tests use.
pub const SECRET_KEY: &str = "keepup-test-secret";

/// A moto server; killed when dropped.
pub struct S3Server {
    child: Child,
    /// `http://GATEWAY:PORT`: the endpoint for the test and the URL base for the hosts.
    pub endpoint: String,
}

impl S3Server {
    /// Starts moto on `net`'s gateway address, on a free port.
    pub fn start(net: &TestNet) -> Result<S3Server> {
        let venv = moto_venv();
        let bin = venv.join("bin/moto_server");
        ensure!(
            bin.exists(),
            "the S3 tests need moto's server at {} (`bash tests/run.sh` installs it: python3 -m \
             venv {} && {}/bin/pip install 'moto[server]'); or set KEEPUP_SKIP_S3_TESTS=1 to \
             skip them explicitly",
            bin.display(),
            venv.display(),
            venv.display()
        );
        let gateway = crate::host::docker(&[
            "network",
            "inspect",
            net.name(),
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ])?;
        ensure!(!gateway.is_empty(), "network {} has no gateway", net.name());
        let port = TcpListener::bind((gateway.as_str(), 0))
            .with_context(|| format!("binding a port on the gateway {gateway}"))?
            .local_addr()?
            .port();
        let child = Command::new(&bin)
            .args(["-H", &gateway, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = S3Server {
            child,
            endpoint: format!("http://{gateway}:{port}"),
        };
        let start = Instant::now();
        while std::net::TcpStream::connect((gateway.as_str(), port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!("moto_server exited at start: {status}");
            }
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "moto_server did not listen on {} within 30s",
                server.endpoint
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.python(
            "import boto3\nboto3.client('s3', **kw).list_buckets()\n",
            &[],
        )?;
        Ok(server)
    }

    /// Runs `script` with the virtualenv's python; `kw` (the boto3 client's keyword
    /// arguments for this server) is defined, and `sys.argv[1:]` is `args`. Returns stdout.
    pub fn python(&self, script: &str, args: &[&str]) -> Result<String> {
        let prelude = format!(
            "import sys, json\nkw = dict(endpoint_url='{}', aws_access_key_id='{ACCESS_KEY}', \
             aws_secret_access_key='{SECRET_KEY}', region_name='us-east-1')\n",
            self.endpoint
        );
        let out = Command::new(moto_venv().join("bin/python"))
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .args(args)
            .output()
            .context("running the virtualenv's python")?;
        ensure!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates `bucket`, readable by anyone (as a bucket behind a CDN is).
    pub fn public_bucket(&self, bucket: &str) -> Result<()> {
        self.python(
            "import boto3\ns3 = boto3.client('s3', **kw)\nb = sys.argv[1]\n\
             s3.create_bucket(Bucket=b)\n\
             s3.put_bucket_policy(Bucket=b, Policy=json.dumps({'Version': '2012-10-17', \
             'Statement': [{'Effect': 'Allow', 'Principal': '*', 'Action': 's3:GetObject', \
             'Resource': f'arn:aws:s3:::{b}/*'}]}))\n",
            &[bucket],
        )?;
        Ok(())
    }

    /// Every object in `bucket`: key -> bytes.
    pub fn objects(&self, bucket: &str) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
        let out = self.python(
            "import boto3\ns3 = boto3.client('s3', **kw)\nout = {}\n\
             for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1]):\n\
             \x20   for o in page.get('Contents', []):\n\
             \x20       out[o['Key']] = s3.get_object(Bucket=sys.argv[1], Key=o['Key'])['Body'].read().hex()\n\
             print(json.dumps(out))\n",
            &[bucket],
        )?;
        let map: std::collections::BTreeMap<String, String> = serde_json::from_str(&out)?;
        map.into_iter()
            .map(|(k, v)| Ok((k, hex::decode(v)?)))
            .collect()
    }

    /// The environment `keepup repo sync` needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
