//! A real OpenID provider for the tests: `oidc-provider-mock` from PyPI,
//! run by `tests/oidc/provider.py` on a port of its own. `.ci/run` installs
//! it; elsewhere a test without it skips with a printed reason (and fails
//! under `CI=true`, where a skip would hide that it never ran).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct RealProvider {
    /// `http://127.0.0.1:PORT`: its issuer, and where its endpoints live.
    pub issuer: String,
    child: Child,
}

impl RealProvider {
    /// Starts the provider, or returns `None` (after printing why) when
    /// Python's `oidc_provider_mock` is not installed outside CI.
    pub fn start() -> Option<RealProvider> {
        let installed = Command::new("python3")
            .args(["-c", "import oidc_provider_mock"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            super::support::skip_unless_ci(
                "the real OpenID provider needs `pip install oidc-provider-mock`",
            );
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oidc/provider.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/oidc/provider.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("listening on ") {
                    let _ = tx.send(port.trim().to_owned());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the OpenID provider reports its port");
        Some(RealProvider {
            issuer: format!("http://127.0.0.1:{port}"),
            child,
        })
    }

    /// Sets the claims of user `subject` (the ID token carries them).
    pub async fn set_user(&self, subject: &str, claims: Value) {
        let response = reqwest::Client::new()
            .put(format!("{}/users/{subject}", self.issuer))
            .json(&claims)
            .send()
            .await
            .expect("reach the OpenID provider");
        assert_eq!(response.status(), 204, "set the user's claims");
    }

    /// Signs `subject` in at the provider's authorization page, as a
    /// browser would submit its form: `authorize_url` is where the gateway
    /// sent the browser; returns where the provider sends it back.
    pub async fn authorize(&self, authorize_url: &str, subject: &str) -> String {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let form = client
            .get(authorize_url)
            .send()
            .await
            .expect("authorization page");
        assert_eq!(
            form.status(),
            200,
            "the provider shows its authorization form"
        );
        assert!(Instant::now() < deadline);
        let answer = client
            .post(authorize_url)
            .form(&[("sub", subject)])
            .send()
            .await
            .expect("submit the authorization form");
        assert_eq!(answer.status().as_u16(), 302, "the provider redirects back");
        answer.headers()["location"].to_str().unwrap().to_owned()
    }
}

impl Drop for RealProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
