//! TLS of the gRPC links, end to end: a real hub serving TLS on 127.0.0.1
//! (certificates made here with rcgen: a CA, a server certificate for
//! 127.0.0.1 and localhost, a client certificate), real SQLite nodes, the
//! real `syncmesh status` binary.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use syncmesh::demo::TABLES_YAML;
use syncmesh::mesh::{HubTarget, hub_status_at, start_hub_from};
use syncmesh_hub::server::HubHandle;
use syncmesh_node::config::Config;
use syncmesh_node::shell::{NodeHandle, start_node};
use syncmesh_node::sqlite::SqliteAdapter;
use syncmesh_tests::{ORDERS, captured_logs, create_db, free_port, run_syncmesh, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// The files of a test PKI.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA that signed nothing here.
    other_ca: PathBuf,
}

impl Pki {
    /// `hub.tls` with the server certificate and key.
    fn hub_tls(&self) -> String {
        format!(
            "{{ cert: \"{}\", key: \"{}\" }}",
            p(&self.server_cert),
            p(&self.server_key)
        )
    }

    /// `nodes[].tls` trusting `ca`.
    fn trusting(ca: &Path) -> String {
        format!("{{ ca: \"{}\" }}", p(ca))
    }
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(CertifiedIssuer::self_signed(p, KeyPair::generate()?)?)
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("client"),
    );
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Log capture on, a temp dir with a fresh PKI in it, and a free port for
/// the hub.
fn setup() -> Result<(tempfile::TempDir, Pki, u16)> {
    captured_logs();
    let dir = tempfile::tempdir()?;
    let pki = make_pki(dir.path())?;
    Ok((dir, pki, free_port()))
}

fn make_pki(dir: &Path) -> Result<Pki> {
    let dir = dir.join("pki");
    std::fs::create_dir_all(&dir)?;
    let root = ca("syncmesh test CA")?;
    let other = ca("some other CA")?;
    let (server_cert, server_key) = leaf(
        &root,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(&root, &["node"], ExtendedKeyUsagePurpose::ClientAuth)?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    Ok(Pki {
        ca: write("ca.pem", &root.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server.key", &server_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client.key", &client_key)?,
        other_ca: write("other-ca.pem", &other.pem())?,
    })
}

/// One node of a test config: name, hub URL, `tls:` map (YAML flow, or "").
struct NodeSpec {
    name: &'static str,
    url: String,
    tls: String,
}

/// Writes a config with a hub on `port` (`hub_tls`: its `tls:` flow map
/// or "") and `nodes`, creating their SQLite files; loads it.
async fn config(dir: &Path, port: u16, hub_tls: &str, nodes: &[NodeSpec]) -> Result<Config> {
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./data/hub\n");
    if !hub_tls.is_empty() {
        yaml.push_str(&format!("  tls: {hub_tls}\n"));
    }
    if !nodes.is_empty() {
        yaml.push_str("nodes:\n");
    }
    for n in nodes {
        create_db(&dir.join(format!("{}.db", n.name)), ORDERS).await?;
        yaml.push_str(&format!(
            "  - name: {}\n    hub: {}\n    data_dir: ./data/{}\n    database: {{ type: sqlite, url: \"sqlite://./{}.db\" }}\n",
            n.name, n.url, n.name, n.name
        ));
        if !n.tls.is_empty() {
            yaml.push_str(&format!("    tls: {}\n", n.tls));
        }
    }
    yaml.push_str(TABLES_YAML);
    let path = dir.join("syncmesh.yaml");
    std::fs::write(&path, yaml)?;
    Ok(Config::load(&path)?)
}

fn https(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

fn http(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

async fn db(cfg: &Config, node: &str) -> Result<SqliteAdapter> {
    Ok(SqliteAdapter::open(cfg.node(node)?.database.url.expose(), false).await?)
}

async fn ids(db: &SqliteAdapter) -> Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar::<_, i64>("SELECT id FROM orders ORDER BY id")
            .fetch_all(db.pool())
            .await?,
    )
}

async fn insert(db: &SqliteAdapter, id: i64) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO orders VALUES ({id}, 'i{id}', 1, 'new')"
    )))
    .execute(db.pool())
    .await
    .with_context(|| format!("insert {id}"))?;
    Ok(())
}

async fn wait_ids(db: &SqliteAdapter, want: &[i64], what: &str) -> Result<()> {
    wait_until(what, WAIT, || async { Ok(ids(db).await? == want) }).await
}

/// The captured log lines of node `name`.
fn node_lines(name: &str) -> Vec<String> {
    let logs = captured_logs();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains(&format!("node={name}")))
        .map(str::to_owned)
        .collect()
}

/// Waits for a log line of node `name` containing `needle`; returns it.
async fn wait_log(name: &str, needle: &str) -> Result<String> {
    wait_until(
        &format!("a log line of {name} with {needle:?}"),
        WAIT,
        || async { Ok(node_lines(name).iter().any(|l| l.contains(needle))) },
    )
    .await
    .with_context(|| format!("lines of {name}: {:#?}", node_lines(name)))?;
    Ok(node_lines(name)
        .into_iter()
        .find(|l| l.contains(needle))
        .unwrap_or_default())
}

/// Runs the `syncmesh` binary off the runtime's threads.
async fn cli(args: &[&str]) -> Result<(bool, String, String)> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_syncmesh(&refs)
    })
    .await?
}

async fn stop(hub: HubHandle, nodes: Vec<NodeHandle>) -> Result<()> {
    for n in nodes {
        n.shutdown().await?;
    }
    hub.shutdown().await?;
    Ok(())
}

/// Two nodes sync through a TLS hub that a private CA signed: rows
/// converge both ways, and the hub's URL is https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sync_through_a_tls_hub() -> Result<()> {
    let (dir, pki, port) = setup()?;
    let node_tls = Pki::trusting(&pki.ca);
    let cfg = config(
        dir.path(),
        port,
        &pki.hub_tls(),
        &[
            NodeSpec {
                name: "tls-a",
                url: https(port),
                tls: node_tls.clone(),
            },
            // By name: the certificate lists localhost too.
            NodeSpec {
                name: "tls-b",
                url: format!("https://localhost:{port}"),
                tls: node_tls,
            },
        ],
    )
    .await?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    assert_eq!(hub.url(), https(port));
    let nodes = vec![
        start_node(&cfg, "tls-a").await?,
        start_node(&cfg, "tls-b").await?,
    ];
    let (a, b) = (db(&cfg, "tls-a").await?, db(&cfg, "tls-b").await?);
    insert(&a, 1).await?;
    insert(&b, 2).await?;
    wait_ids(&a, &[1, 2], "tls-a to hold both rows").await?;
    wait_ids(&b, &[1, 2], "tls-b to hold both rows").await?;
    // The hub over TLS answers the status call the CLI makes.
    let target = HubTarget::of_node(cfg.node("tls-a")?);
    let status = hub_status_at(&target).await?;
    assert_eq!(status.total_ops, 2);
    a.close().await;
    b.close().await;
    stop(hub, nodes).await
}

/// A node trusting another CA never syncs; its log, and `syncmesh
/// check`'s hub probe, say the certificate is not trusted and what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_trusting_the_wrong_ca_is_told_the_certificate_is_not_trusted() -> Result<()> {
    let (dir, pki, port) = setup()?;
    let cfg = config(
        dir.path(),
        port,
        &pki.hub_tls(),
        &[
            NodeSpec {
                name: "wrongca-a",
                url: https(port),
                tls: Pki::trusting(&pki.other_ca),
            },
            NodeSpec {
                name: "wrongca-b",
                url: https(port),
                tls: Pki::trusting(&pki.ca),
            },
        ],
    )
    .await?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let nodes = vec![
        start_node(&cfg, "wrongca-a").await?,
        start_node(&cfg, "wrongca-b").await?,
    ];
    let (a, b) = (db(&cfg, "wrongca-a").await?, db(&cfg, "wrongca-b").await?);
    insert(&a, 1).await?;
    insert(&b, 2).await?;
    let line = wait_log("wrongca-a", "certificate not trusted").await?;
    assert!(
        line.contains(&format!(
            "hub {}: certificate not trusted: set nodes[0].tls.ca to the CA that signed the hub's certificate",
            https(port)
        )),
        "{line}"
    );
    // The good node reached the hub; its row stays away from the bad one.
    wait_until("the hub to hold wrongca-b's op", WAIT, || async {
        let t = HubTarget::of_node(cfg.node("wrongca-b")?);
        Ok(hub_status_at(&t).await?.total_ops == 1)
    })
    .await?;
    assert!(!nodes[0].stats().connected);
    assert_eq!(ids(&a).await?, vec![1]);
    assert_eq!(ids(&b).await?, vec![2]);
    // What `syncmesh check` prints for that node's hub.
    let err = hub_status_at(&HubTarget::of_node(cfg.node("wrongca-a")?))
        .await
        .unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!(
            "hub {}: certificate not trusted: set nodes[0].tls.ca to the CA that signed the hub's certificate (the configured CA did not sign it)",
            https(port)
        )
    );
    // And `syncmesh check` (the binary) prints it as the node's FAIL line.
    let config_path = p(&dir.path().join("syncmesh.yaml"));
    let (ok, out, err) = cli(&["check", "--config", &config_path, "--name", "wrongca-a"]).await?;
    assert!(!ok, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "FAIL node wrongca-a: hub {}: certificate not trusted: set nodes[0].tls.ca to the CA that signed the hub's certificate",
            https(port)
        )),
        "stdout: {out}\nstderr: {err}"
    );
    a.close().await;
    b.close().await;
    stop(hub, nodes).await
}

/// With `client_ca` the hub requires client certificates: a node without
/// one is refused (and told what to set); two nodes with one sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_node_without_a_client_certificate() -> Result<()> {
    let (dir, pki, port) = setup()?;
    let with_cert = format!(
        "{{ ca: \"{}\", cert: \"{}\", key: \"{}\" }}",
        p(&pki.ca),
        p(&pki.client_cert),
        p(&pki.client_key)
    );
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "{{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}",
            p(&pki.server_cert),
            p(&pki.server_key),
            p(&pki.ca)
        ),
        &[
            NodeSpec {
                name: "mtls-nocert",
                url: https(port),
                tls: Pki::trusting(&pki.ca),
            },
            NodeSpec {
                name: "mtls-a",
                url: https(port),
                tls: with_cert.clone(),
            },
            NodeSpec {
                name: "mtls-b",
                url: https(port),
                tls: with_cert,
            },
        ],
    )
    .await?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let nodes = vec![
        start_node(&cfg, "mtls-nocert").await?,
        start_node(&cfg, "mtls-a").await?,
        start_node(&cfg, "mtls-b").await?,
    ];
    let (x, a, b) = (
        db(&cfg, "mtls-nocert").await?,
        db(&cfg, "mtls-a").await?,
        db(&cfg, "mtls-b").await?,
    );
    insert(&x, 1).await?;
    insert(&a, 2).await?;
    insert(&b, 3).await?;
    wait_ids(&a, &[2, 3], "mtls-a to hold both certified rows").await?;
    wait_ids(&b, &[2, 3], "mtls-b to hold both certified rows").await?;
    let line = wait_log("mtls-nocert", "requires a client certificate").await?;
    assert!(
        line.contains(
            "the hub requires a client certificate (its hub.tls.client_ca is set): set nodes[0].tls.cert and nodes[0].tls.key"
        ),
        "{line}"
    );
    assert!(!nodes[0].stats().connected);
    assert_eq!(ids(&x).await?, vec![1]);
    for d in [x, a, b] {
        d.close().await;
    }
    stop(hub, nodes).await
}

/// A plaintext node against a TLS hub, and a TLS client against a
/// plaintext hub: each fails at once with a line naming what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_tls_mismatches_say_what_to_change() -> Result<()> {
    let (dir, pki, port) = setup()?;
    let cfg = config(
        dir.path(),
        port,
        &pki.hub_tls(),
        &[NodeSpec {
            name: "plain-node",
            url: http(port),
            tls: String::new(),
        }],
    )
    .await?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let nodes = vec![start_node(&cfg, "plain-node").await?];
    let line = wait_log("plain-node", "speaks TLS").await?;
    assert!(
        line.contains(&format!(
            "hub {}: the hub at {} speaks TLS but the URL is plaintext http://: use https:// in nodes[0].hub",
            http(port),
            http(port)
        )),
        "{line}"
    );
    assert!(!nodes[0].stats().connected);
    let err = hub_status_at(&HubTarget::plain(&http(port)))
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}")
            .contains("speaks TLS but the URL is plaintext http://: use https:// in --hub"),
        "{err:#}"
    );
    stop(hub, nodes).await?;

    // https:// against a plaintext hub.
    let dir2 = tempfile::tempdir()?;
    let port2 = free_port();
    let cfg2 = config(dir2.path(), port2, "", &[]).await?;
    let plain_hub = start_hub_from(&cfg2, cfg2.hub()?).await?;
    let target = HubTarget::from_flags(&https(port2), Some(pki.ca.clone()), None, None, None)?;
    let err = hub_status_at(&target).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.starts_with(&format!("hub {}: ", https(port2)))
            && text.contains(
                "use http:// in --hub for a hub without hub.tls, or set hub.tls on the hub"
            ),
        "{text}"
    );
    plain_hub.shutdown().await?;
    Ok(())
}

/// `syncmesh status --hub https://… --ca …` (the real binary) shows the
/// dashboard of a TLS hub; without `--ca` it says what to pass; `--ca` on
/// an http:// URL is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_speaks_tls_with_ca_flag() -> Result<()> {
    let (dir, pki, port) = setup()?;
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "{{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}",
            p(&pki.server_cert),
            p(&pki.server_key),
            p(&pki.ca)
        ),
        &[],
    )
    .await?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let url = https(port);
    let (ca, cert, key) = (p(&pki.ca), p(&pki.client_cert), p(&pki.client_key));
    let (ok, out, err) = cli(&[
        "status", "--hub", &url, "--ca", &ca, "--cert", &cert, "--key", &key, "--json",
    ])
    .await?;
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["hub"], "hub", "{out}");

    let (ok, _, err) = cli(&["status", "--hub", &url]).await?;
    assert!(!ok);
    assert!(
        err.contains(
            "certificate not trusted: set --ca to the CA that signed the hub's certificate"
        ),
        "{err}"
    );
    let (ok, _, err) = cli(&["conflicts", "--hub", &url, "--ca", &ca]).await?;
    assert!(!ok);
    assert!(err.contains("requires a client certificate"), "{err}");
    let (ok, _, err) = cli(&["status", "--hub", &http(port), "--ca", &ca]).await?;
    assert!(!ok);
    assert!(
        err.contains("is plaintext http:// but TLS settings are given: use https://"),
        "{err}"
    );
    hub.shutdown().await?;
    Ok(())
}
