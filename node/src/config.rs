//! The YAML configuration shared by every syncmesh process.
//!
//! One file describes the whole mesh: an optional `hub` section, the `nodes`
//! (one per database), the synced `tables` with their merge rules, and the
//! `sync` and `conflicts` settings. `syncmesh hub` reads the hub section,
//! `syncmesh node --name N` reads node `N`, and both read the tables.
//!
//! Loading goes in three steps, each failing with one line that names the
//! file, the line or key, and what to do:
//!
//! 1. `${VAR}` is expanded from the environment in the raw text (`$$` is a
//!    literal `$`; full-line comments are left alone). An unset variable is an
//!    error.
//! 2. The YAML is parsed into private raw types that reject unknown keys and
//!    check every value where it is read, so errors carry the line.
//! 3. Cross-checks (unique names, at least one table, ...) run, secrets are
//!    read from `url_file`, and relative paths are resolved against the config
//!    file's directory.
//!
//! Database URLs are held in a [`Secret`], whose `Debug` and `Display` print a
//! redacted form; no error message ever contains a secret.
//!
//! ```
//! use std::path::Path;
//! use syncmesh_node::config::{Config, Mode};
//!
//! let yaml = r#"
//! nodes:
//!   - name: edge-a
//!     hub: http://127.0.0.1:7700
//!     data_dir: ./data/edge-a
//!     database: { type: sqlite, url: "sqlite://./edge-a.db" }
//! tables:
//!   - name: orders
//!     key: [id]
//! "#;
//! let config = Config::parse(yaml, "<config>", Path::new("/srv/mesh")).unwrap();
//! let node = config.node("edge-a").unwrap();
//! assert_eq!(node.mode, Mode::Bidirectional);
//! assert_eq!(node.database.url.expose(), "sqlite:///srv/mesh/edge-a.db");
//! assert!(config.hub().is_err());
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use syncmesh_resolver::{DeletePolicy, Granularity, NodeId, Strategy, TableRules};

use crate::{Error, Result};

/// Default of `sync.batch_size`, and its maximum.
pub const MAX_BATCH_SIZE: usize = 10_000;
/// Default of `sync.max_clock_drift`, in milliseconds.
pub const DEFAULT_MAX_CLOCK_DRIFT_MS: u64 = 500;
/// Default of `hub.tombstone_grace_hours` (7 days).
pub const DEFAULT_TOMBSTONE_GRACE_HOURS: u64 = 168;
/// Default of `conflicts.retention_days`.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;
/// Default name of the hub.
pub const DEFAULT_HUB_NAME: &str = "hub";

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// A parsed and validated configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The `hub` section, when this file configures a hub.
    pub hub: Option<HubConfig>,
    /// The nodes (may be empty in a hub-only file).
    pub nodes: Vec<NodeConfig>,
    /// The synced tables (at least one).
    pub tables: Vec<TableConfig>,
    /// Exchange settings.
    pub sync: SyncConfig,
    /// Conflict log settings.
    pub conflicts: ConflictsConfig,
    /// The path of the file, or `<config>` when parsed from a string.
    pub source: String,
}

/// The `hub` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub's identity (default `hub`); a valid node name.
    pub name: String,
    /// The gRPC listen address.
    pub listen: SocketAddr,
    /// Where the hub keeps its sled store (absolute after loading).
    pub data_dir: PathBuf,
    /// Where to serve Prometheus text at `/metrics`, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// A writer silent for longer no longer holds back tombstone garbage
    /// collection (`tombstone_grace_hours`, default 168 = 7 days).
    pub tombstone_grace_hours: u64,
    /// `hub.tls`: serve gRPC over TLS (files read and checked at load).
    pub tls: Option<crate::tls::ServerTls>,
}

/// One entry of `nodes`: a sidecar next to one database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's identity, unique in the mesh.
    pub name: NodeId,
    /// The hub URL, like `http://127.0.0.1:7700`.
    pub hub: String,
    /// Where the node keeps its sled log (absolute after loading).
    pub data_dir: PathBuf,
    /// Whether the node captures, applies, or both.
    pub mode: Mode,
    /// Rank for `source_priority` and `merge` (higher wins; default 0).
    pub priority: i64,
    /// The database this node is the sidecar of.
    pub database: DatabaseConfig,
    /// Where to serve Prometheus text at `/metrics`, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// `tls`: how to speak TLS to an `https://` hub (a private CA, a client
    /// certificate); `None` with `https://` trusts the webpki roots.
    pub tls: Option<crate::tls::ClientTls>,
    /// Where this node's settings are in the file (`nodes[0]`), for
    /// messages that say what to change.
    pub at: String,
}

/// Which directions a node syncs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Capture local changes and apply remote ones (the default).
    #[default]
    Bidirectional,
    /// Source only: capture local changes, never apply remote ones.
    Publish,
    /// Replica only: apply remote changes, never capture.
    Subscribe,
}

impl Mode {
    /// The YAML spelling: `bidirectional`, `publish` or `subscribe`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Bidirectional => "bidirectional",
            Mode::Publish => "publish",
            Mode::Subscribe => "subscribe",
        }
    }

    /// True when the node captures local changes (not `subscribe`).
    pub fn captures(&self) -> bool {
        *self != Mode::Subscribe
    }

    /// True when the node applies remote changes (not `publish`).
    pub fn applies(&self) -> bool {
        *self != Mode::Publish
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a PostgreSQL node reads its slot (YAML key `capture`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgCapture {
    /// Over a replication connection (`START_REPLICATION`), falling back
    /// to `peek` where that is unavailable. The default.
    #[default]
    Stream,
    /// With `pg_logical_slot_peek_binary_changes` on a normal connection
    /// (for a pooler that does not pass replication connections on).
    Peek,
}

/// The database engine of a node (YAML key `type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseKind {
    /// SQLite (`sqlite`).
    Sqlite,
    /// PostgreSQL (`postgresql`, also `postgres`).
    #[serde(alias = "postgres")]
    Postgresql,
    /// MySQL or MariaDB (`mysql`, also `mariadb`).
    #[serde(alias = "mariadb")]
    Mysql,
    /// MongoDB (`mongodb`).
    Mongodb,
    /// Redis (`redis`), a target only.
    Redis,
}

impl DatabaseKind {
    /// The YAML spelling: `sqlite`, `postgresql`, `mysql`, `mongodb` or `redis`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DatabaseKind::Sqlite => "sqlite",
            DatabaseKind::Postgresql => "postgresql",
            DatabaseKind::Mysql => "mysql",
            DatabaseKind::Mongodb => "mongodb",
            DatabaseKind::Redis => "redis",
        }
    }

    /// The URL prefixes accepted for this engine.
    pub fn url_prefixes(&self) -> &'static [&'static str] {
        match self {
            DatabaseKind::Sqlite => &["sqlite:"],
            DatabaseKind::Postgresql => &["postgres://", "postgresql://"],
            DatabaseKind::Mysql => &["mysql://", "mariadb://"],
            DatabaseKind::Mongodb => &["mongodb://", "mongodb+srv://"],
            DatabaseKind::Redis => &["redis://", "rediss://", "redis+unix://", "unix://"],
        }
    }
}

impl fmt::Display for DatabaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `database` map of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// The engine.
    pub kind: DatabaseKind,
    /// The connection URL (from `url` or the content of `url_file`). SQLite
    /// URLs are `sqlite://<absolute path>[?query]` after loading.
    pub url: Secret,
    /// PostgreSQL: the logical replication slot name.
    pub slot: Option<String>,
    /// PostgreSQL: the publication name.
    pub publication: Option<String>,
    /// PostgreSQL: how capture reads the slot.
    pub capture: PgCapture,
    /// Redis: the prefix of every key written.
    pub key_prefix: Option<String>,
    /// Redis: expiry of written keys, in seconds (YAML `ttl`).
    pub ttl_seconds: Option<u64>,
}

/// A string that must never be printed: `Debug` and `Display` show
/// [`Secret::redacted`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, to hand to a database driver. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A printable form: for a URL the scheme, user, host and path with the
    /// password (and any query) replaced by `***`; otherwise `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Secret").field(&self.redacted()).finish()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// One entry of `tables`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Table name.
    pub name: String,
    /// Key columns; empty means the table's declared primary key.
    pub key: Vec<String>,
    /// What an update concurrent with a delete does.
    pub deletes: DeletePolicy,
    /// Field or whole-row conflicts.
    pub granularity: Granularity,
    /// Merge strategies.
    pub resolve: ResolveConfig,
}

impl TableConfig {
    /// The resolver rules of this table; `priorities` ranks the nodes for
    /// `source_priority` and `merge` (see [`Config::priorities`]).
    pub fn rules(&self, priorities: &BTreeMap<NodeId, i64>) -> TableRules {
        let convert = |spec: &StrategySpec| match spec {
            StrategySpec::LastWriteWins => Strategy::LastWriteWins,
            StrategySpec::SourcePriority => Strategy::SourcePriority,
            StrategySpec::Merge => Strategy::Merge,
            StrategySpec::Max => Strategy::Max,
            StrategySpec::Min => Strategy::Min,
            StrategySpec::Sum => Strategy::Sum,
            StrategySpec::PriorityOrder(list) => Strategy::PriorityOrder(list.clone()),
        };
        TableRules {
            deletes: self.deletes,
            granularity: self.granularity,
            default_strategy: convert(&self.resolve.default),
            fields: self
                .resolve
                .fields
                .iter()
                .map(|(f, spec)| (f.clone(), convert(spec)))
                .collect(),
            priorities: priorities.clone(),
        }
    }
}

/// The `resolve` map of a table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolveConfig {
    /// Strategy of fields not listed in `fields` (default `last_write_wins`).
    pub default: StrategySpec,
    /// Per-field strategies.
    pub fields: BTreeMap<String, StrategySpec>,
}

/// A field strategy as written in the config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StrategySpec {
    /// `last_write_wins`: the highest HLC wins.
    #[default]
    LastWriteWins,
    /// `source_priority`: the node with the higher `priority` wins, then HLC.
    SourcePriority,
    /// `merge`: only-one-changed takes the change, else source priority.
    Merge,
    /// `max`: the greatest value wins.
    Max,
    /// `min`: the least value wins.
    Min,
    /// `sum`: a counter; every write contributes its delta.
    Sum,
    /// `{ priority_order: [a, b, c] }`: earlier values win, then HLC.
    PriorityOrder(Vec<String>),
}

impl StrategySpec {
    /// The names accepted as a plain string.
    pub const NAMES: [&'static str; 6] = [
        "last_write_wins",
        "source_priority",
        "merge",
        "max",
        "min",
        "sum",
    ];

    /// The strategy's name (`priority_order` for [`StrategySpec::PriorityOrder`]).
    pub fn name(&self) -> &'static str {
        match self {
            StrategySpec::LastWriteWins => "last_write_wins",
            StrategySpec::SourcePriority => "source_priority",
            StrategySpec::Merge => "merge",
            StrategySpec::Max => "max",
            StrategySpec::Min => "min",
            StrategySpec::Sum => "sum",
            StrategySpec::PriorityOrder(_) => "priority_order",
        }
    }

    fn from_name(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "last_write_wins" => StrategySpec::LastWriteWins,
            "source_priority" => StrategySpec::SourcePriority,
            "merge" => StrategySpec::Merge,
            "max" => StrategySpec::Max,
            "min" => StrategySpec::Min,
            "sum" => StrategySpec::Sum,
            "priority_order" => {
                return Err(
                    "strategy priority_order needs its list of values: write { priority_order: [a, b, c] }"
                        .to_owned(),
                );
            }
            other => {
                return Err(format!(
                    "unknown strategy `{other}`: use one of {}, or {{ priority_order: [a, b, c] }}",
                    Self::NAMES.join(", ")
                ));
            }
        })
    }
}

impl fmt::Display for StrategySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrategySpec::PriorityOrder(list) => {
                write!(f, "{{ priority_order: [{}] }}", list.join(", "))
            }
            other => f.write_str(other.name()),
        }
    }
}

impl<'de> Deserialize<'de> for StrategySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrategySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a strategy name or { priority_order: [a, b, c] }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<StrategySpec, E> {
                StrategySpec::from_name(v).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StrategySpec, A::Error> {
                let mut list: Option<Vec<String>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "priority_order" {
                        return Err(de::Error::custom(format!(
                            "unknown key `{key}` in a strategy: check the spelling; the only valid key is priority_order"
                        )));
                    }
                    if list.is_some() {
                        return Err(de::Error::custom("priority_order is given twice: keep one"));
                    }
                    list = Some(map.next_value::<Option<Vec<String>>>()?.unwrap_or_default());
                }
                let Some(list) = list else {
                    return Err(de::Error::custom(
                        "empty strategy map: write { priority_order: [a, b, c] } or a strategy name",
                    ));
                };
                if list.is_empty() {
                    return Err(de::Error::custom(
                        "priority_order needs at least one value: write { priority_order: [a, b, c] }",
                    ));
                }
                let mut seen = BTreeSet::new();
                for value in &list {
                    if !seen.insert(value) {
                        return Err(de::Error::custom(format!(
                            "priority_order lists `{value}` twice: list each value once"
                        )));
                    }
                }
                Ok(StrategySpec::PriorityOrder(list))
            }
        }
        d.deserialize_any(V)
    }
}

/// The `sync` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    /// Ops per exchanged batch, 1..=10000 (default 10000).
    pub batch_size: usize,
    /// How far ahead of local time a remote HLC may be, in milliseconds
    /// (YAML `max_clock_drift`, default 500ms).
    pub max_clock_drift_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            batch_size: MAX_BATCH_SIZE,
            max_clock_drift_ms: DEFAULT_MAX_CLOCK_DRIFT_MS,
        }
    }
}

/// The `conflicts` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictsConfig {
    /// Days conflict records are kept (default 90).
    pub retention_days: u32,
    /// Alerting on conflict rate, if configured.
    pub alert: Option<AlertConfig>,
    /// `conflicts.mirror`: a database table every record is copied into.
    pub mirror: Option<MirrorConfig>,
}

impl Default for ConflictsConfig {
    fn default() -> Self {
        ConflictsConfig {
            retention_days: DEFAULT_RETENTION_DAYS,
            alert: None,
            mirror: None,
        }
    }
}

/// Default of `conflicts.mirror.table`.
pub const DEFAULT_MIRROR_TABLE: &str = "sync_conflicts";

/// `conflicts.mirror`: the hub copies every conflict record into `table`
/// of the database at `url` (SQLite, PostgreSQL or MySQL/MariaDB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The database; its `Debug` and `Display` hide the password.
    pub url: Secret,
    /// The table (a plain identifier, created if missing).
    pub table: String,
}

impl MirrorConfig {
    /// The engine the url names.
    pub fn kind(&self) -> DatabaseKind {
        mirror_kind(self.url.expose()).unwrap_or(DatabaseKind::Sqlite)
    }
}

/// The engine of a mirror url, if it is one the mirror supports.
/// What a URL's scheme is, for an error message (never the rest of the
/// URL, which may hold a password).
fn describe_scheme(url: &str) -> String {
    match url.find(':') {
        Some(i)
            if i > 0
                && url[..i]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            format!("it starts with `{}:`", &url[..i])
        }
        _ => "it has no scheme".to_owned(),
    }
}

fn mirror_kind(url: &str) -> Option<DatabaseKind> {
    [
        DatabaseKind::Sqlite,
        DatabaseKind::Postgresql,
        DatabaseKind::Mysql,
    ]
    .into_iter()
    .find(|k| k.url_prefixes().iter().any(|p| url.starts_with(p)))
}

/// `conflicts.alert`. Its `Debug` hides the webhook path, which often
/// carries a token.
#[derive(Clone, PartialEq, Eq)]
pub struct AlertConfig {
    /// Alert when more conflicts than this happen in an hour.
    pub per_hour: u32,
    /// Where to POST the alert (an http:// or https:// URL).
    pub webhook: Option<String>,
}

impl fmt::Debug for AlertConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertConfig")
            .field("per_hour", &self.per_hour)
            .field("webhook", &self.webhook.as_deref().map(redact_webhook))
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Reads and validates the config file at `path`. Relative paths in it
    /// resolve against the file's directory.
    pub fn load(path: &Path) -> Result<Config> {
        let source = path.display().to_string();
        let fail = |message: String| Error::Config {
            path: source.clone(),
            message,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(
                    "file not found: create it or pass --config with the right path".to_owned(),
                ));
            }
            Err(e) => {
                return Err(fail(format!(
                    "cannot read the file ({e}): pass the path of a readable YAML file"
                )));
            }
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| fail("the file is not valid UTF-8: save it as UTF-8".to_owned()))?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Config::parse(&text, &source, base)
    }

    /// Parses config text, expanding `${VAR}` from the process environment.
    /// `source` names the text in errors; relative paths resolve against
    /// `base_dir`.
    pub fn parse(text: &str, source: &str, base_dir: &Path) -> Result<Config> {
        Config::parse_with_env(text, source, base_dir, |name| std::env::var(name).ok())
    }

    /// Like [`Config::parse`], with `${VAR}` looked up through `lookup`
    /// instead of the process environment.
    pub fn parse_with_env(
        text: &str,
        source: &str,
        base_dir: &Path,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let fail = |message: String| Error::Config {
            path: source.to_owned(),
            message,
        };
        let expanded = expand(text, &lookup).map_err(fail)?;
        let scrub = |message: String| fail(expanded.scrub(message));
        let raw: RawConfig = yaml_serde::from_str(&expanded.text)
            .map_err(|e| scrub(yaml_error_message(&e, &expanded.line_map)))?;
        let base = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        build(raw, source, &base).map_err(scrub)
    }

    /// The node named `name`, or an error listing the configured nodes.
    pub fn node(&self, name: &str) -> Result<&NodeConfig> {
        if let Some(node) = self.nodes.iter().find(|n| n.name.as_str() == name) {
            return Ok(node);
        }
        let message = if self.nodes.is_empty() {
            format!(
                "node `{name}` is not configured (the file has no nodes): add it under `nodes:`"
            )
        } else {
            format!(
                "node `{name}` is not configured: configured nodes are {}; pass one of them or add `{name}` under `nodes:`",
                self.node_names().join(", ")
            )
        };
        Err(Error::Config {
            path: self.source.clone(),
            message,
        })
    }

    /// The `hub` section, or an error when the file has none.
    pub fn hub(&self) -> Result<&HubConfig> {
        self.hub.as_ref().ok_or_else(|| Error::Config {
            path: self.source.clone(),
            message: "no `hub:` section: add one with listen and data_dir to run a hub".to_owned(),
        })
    }

    /// Every node's `priority`, for `source_priority` and `merge`.
    pub fn priorities(&self) -> BTreeMap<NodeId, i64> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.priority))
            .collect()
    }

    /// The table named `name`, if configured.
    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The names of the configured nodes, in file order.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }
}

/// Expands `${VAR}` in `text` through `lookup`: `$$` is a literal `$`, a `$`
/// followed by anything else stays as it is, and full-line comments are
/// left alone. An unset variable is an error naming it and its line.
pub fn expand_env(
    text: &str,
    source: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String> {
    expand(text, &lookup)
        .map(|e| e.text)
        .map_err(|message| Error::Config {
            path: source.to_owned(),
            message,
        })
}

/// The expanded text, the original line of each expanded line, and the
/// substituted values (scrubbed from error messages).
struct Expanded {
    text: String,
    line_map: Vec<usize>,
    values: Vec<(String, String)>,
}

impl Expanded {
    /// Replaces every substituted value (that is long enough to be a secret
    /// and not a fragment of ordinary words) with its `${NAME}`.
    fn scrub(&self, mut message: String) -> String {
        for (name, value) in &self.values {
            if value.len() >= 4 && message.contains(value.as_str()) {
                message = message.replace(value.as_str(), &format!("${{{name}}}"));
            }
        }
        message
    }
}

fn expand(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<Expanded, String> {
    let mut out = String::with_capacity(text.len());
    let mut line_map = Vec::new();
    let mut values: Vec<(String, String)> = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let n = index + 1;
        let start = out.len();
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            let mut rest = line;
            while let Some(pos) = rest.find('$') {
                out.push_str(&rest[..pos]);
                let after = &rest[pos + 1..];
                if let Some(tail) = after.strip_prefix('$') {
                    out.push('$');
                    rest = tail;
                } else if let Some(tail) = after.strip_prefix('{') {
                    let Some(end) = tail.find('}') else {
                        return Err(format!(
                            "line {n}: `${{` is not closed: write ${{NAME}}, or $$ for a literal $"
                        ));
                    };
                    let name = &tail[..end];
                    if !valid_var_name(name) {
                        return Err(format!(
                            "line {n}: `${{{name}}}` is not a valid environment variable reference: use ${{NAME}} with letters, digits and _, or $$ for a literal $"
                        ));
                    }
                    let Some(value) = lookup(name) else {
                        return Err(format!(
                            "line {n}: environment variable {name} is not set: export it or remove ${{{name}}}"
                        ));
                    };
                    out.push_str(&value);
                    if !values.iter().any(|(k, _)| k == name) {
                        values.push((name.to_owned(), value));
                    }
                    rest = &tail[end + 1..];
                } else {
                    out.push('$');
                    rest = after;
                }
            }
            out.push_str(rest);
        }
        let segment = &out[start..];
        let lines = segment.matches('\n').count() + usize::from(!segment.ends_with('\n'));
        line_map.extend(std::iter::repeat_n(n, lines));
    }
    // Longest first, so a value containing another is replaced whole.
    values.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
    Ok(Expanded {
        text: out,
        line_map,
        values,
    })
}

fn valid_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The original line of expanded line `line` (1-based).
fn original_line(line_map: &[usize], line: usize) -> usize {
    match line_map.get(line.wrapping_sub(1)) {
        Some(n) => *n,
        None => {
            let last = line_map.last().copied().unwrap_or(0);
            last + line.saturating_sub(line_map.len())
        }
    }
}

/// One line from a YAML error: `line N: <path>: <what>: <what to do>`.
fn yaml_error_message(err: &yaml_serde::Error, line_map: &[usize]) -> String {
    let mut text = err.to_string();
    // A libyaml (syntax) error debugs as a struct; a serde message as a tuple.
    let syntax = format!("{err:?}").starts_with("Error {");
    let location = err.location();
    if let Some(loc) = &location {
        let mark = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(pos) = text.find(&mark) {
            text.replace_range(pos..pos + mark.len(), "");
        }
    }
    let text = remap_lines(&text, line_map);
    let body = if text.starts_with("EOF while parsing") {
        "the file is empty: add at least a `tables:` list".to_owned()
    } else if text.contains("more than one document") {
        "the file holds more than one YAML document: keep one (remove the `---` separators)"
            .to_owned()
    } else if syntax && text.contains("tab character") {
        format!("{text}: indent with spaces, not tabs")
    } else if syntax {
        format!(
            "{text}: fix the YAML syntax (check the indentation, and quote values that contain `: `, ` #`, `{{` or `[`)"
        )
    } else {
        rewrite_serde_message(&text)
    };
    match location {
        Some(loc) => format!("line {}: {body}", original_line(line_map, loc.line())),
        None => body,
    }
}

/// Maps every `line N` in a message through the expansion's line map.
fn remap_lines(text: &str, line_map: &[usize]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("line ") {
        let (head, tail) = rest.split_at(pos + "line ".len());
        out.push_str(head);
        let digits = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&original_line(line_map, n).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Turns serde's wording into the config's: key names, valid keys, hints.
fn rewrite_serde_message(text: &str) -> String {
    fn quoted(rest: &str) -> Option<(&str, &str)> {
        let end = rest.find('`')?;
        Some((&rest[..end], &rest[end + 1..]))
    }
    fn list(tail: &str) -> Option<String> {
        let t = tail
            .strip_prefix(", expected one of ")
            .or_else(|| tail.strip_prefix(", expected "))?;
        Some(t.replace('`', ""))
    }
    for (needle, what) in [("unknown field `", "key"), ("unknown variant `", "value")] {
        if let Some(pos) = text.find(needle)
            && let Some((name, tail)) = quoted(&text[pos + needle.len()..])
        {
            let prefix = &text[..pos];
            return match list(tail) {
                Some(valid) => format!(
                    "{prefix}unknown {what} `{name}`: check the spelling; valid {what}s are {valid}"
                ),
                None => format!("{prefix}unknown {what} `{name}`: remove it"),
            };
        }
    }
    if let Some(pos) = text.find("missing field `")
        && let Some((name, _)) = quoted(&text[pos + "missing field `".len()..])
    {
        return format!("{}missing key `{name}`: add it", &text[..pos]);
    }
    if let Some(pos) = text.find("duplicate field `")
        && let Some((name, _)) = quoted(&text[pos + "duplicate field `".len()..])
    {
        return format!("{}key `{name}` is given twice: keep one", &text[..pos]);
    }
    if ["invalid type:", "invalid value:", "invalid length"]
        .iter()
        .any(|p| text.contains(p))
    {
        return format!("{text}: fix this value");
    }
    text.to_owned()
}

// ---------------------------------------------------------------------------
// Raw (as-written) types
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a config map with tables and optionally hub, nodes, sync and conflicts"
)]
struct RawConfig {
    #[serde(default)]
    hub: Option<Checked<RawHub>>,
    #[serde(default)]
    nodes: Vec<Checked<RawNode>>,
    #[serde(default)]
    tables: Vec<Checked<RawTable>>,
    #[serde(default)]
    sync: Option<RawSync>,
    #[serde(default)]
    conflicts: Option<RawConflicts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a hub map with listen and data_dir")]
struct RawHub {
    #[serde(default)]
    name: Option<Parsed<NodeId>>,
    listen: Parsed<SocketAddr>,
    data_dir: PathBuf,
    #[serde(default)]
    metrics: Option<Parsed<SocketAddr>>,
    #[serde(default)]
    tombstone_grace_hours: Option<u64>,
    #[serde(default)]
    tls: Option<RawHubTls>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a tls map with cert and key (PEM files) and optionally client_ca"
)]
struct RawHubTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a tls map with ca, cert, key and server_name (each optional)"
)]
struct RawNodeTls {
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default)]
    server_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a node map with name, hub, data_dir and database"
)]
struct RawNode {
    name: Parsed<NodeId>,
    hub: Parsed<HubUrl>,
    data_dir: PathBuf,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    priority: i64,
    database: Checked<RawDatabase>,
    #[serde(default)]
    metrics: Option<Parsed<SocketAddr>>,
    #[serde(default)]
    tls: Option<RawNodeTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a database map with type and url")]
struct RawDatabase {
    #[serde(rename = "type")]
    kind: DatabaseKind,
    #[serde(default)]
    url: Option<Parsed<Secret>>,
    #[serde(default)]
    url_file: Option<PathBuf>,
    #[serde(default)]
    slot: Option<String>,
    #[serde(default)]
    publication: Option<String>,
    #[serde(default)]
    capture: Option<PgCapture>,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    ttl: Option<Ttl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table map with a name")]
struct RawTable {
    name: String,
    #[serde(default)]
    key: Option<KeyList>,
    #[serde(default)]
    deletes: RawDeletes,
    #[serde(default)]
    granularity: RawGranularity,
    #[serde(default)]
    resolve: Option<RawResolve>,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawDeletes {
    #[default]
    DeleteWins,
    UpdateWins,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawGranularity {
    #[default]
    Field,
    Row,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a resolve map with default and/or fields"
)]
struct RawResolve {
    #[serde(default)]
    default: Option<StrategySpec>,
    #[serde(default)]
    fields: Option<FieldMap>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a sync map with batch_size and/or max_clock_drift"
)]
struct RawSync {
    #[serde(default)]
    batch_size: Option<BatchSize>,
    #[serde(default)]
    max_clock_drift: Option<ClockDrift>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a conflicts map with retention_days, alert and/or mirror"
)]
struct RawConflicts {
    #[serde(default)]
    retention_days: Option<RetentionDays>,
    #[serde(default)]
    alert: Option<RawAlert>,
    #[serde(default)]
    mirror: Option<Checked<RawMirror>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mirror map with url and optionally table"
)]
struct RawMirror {
    url: Parsed<Secret>,
    #[serde(default)]
    table: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an alert map with per_hour and optionally webhook"
)]
struct RawAlert {
    per_hour: u32,
    #[serde(default)]
    webhook: Option<Parsed<WebhookUrl>>,
}

// ---------------------------------------------------------------------------
// Checks that run while parsing (so errors carry the line)
// ---------------------------------------------------------------------------

/// A map-shaped raw value checked as a whole once read; the error points
/// at the start of the map.
trait Check: Sized {
    /// What the map is, for "invalid type" errors.
    const EXPECTING: &'static str;
    fn check(self) -> std::result::Result<Self, String>;
}

struct Checked<T>(T);

impl<'de, T: Deserialize<'de> + Check> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(PhantomData<fn() -> T>);
        impl<'de, T: Deserialize<'de> + Check> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<T, A::Error> {
                let raw = T::deserialize(de::value::MapAccessDeserializer::new(map))?;
                raw.check().map_err(de::Error::custom)
            }
        }
        d.deserialize_map(V(PhantomData)).map(Checked)
    }
}

impl Check for RawHub {
    const EXPECTING: &'static str = "a hub map with listen and data_dir";
    fn check(self) -> std::result::Result<Self, String> {
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir is empty: give the directory for the hub's store".to_owned());
        }
        if self.tombstone_grace_hours == Some(0) {
            return Err("tombstone_grace_hours is 0: give the hours (at least 1, default 168) a silent node may hold back tombstone collection".to_owned());
        }
        Ok(self)
    }
}

impl Check for RawNode {
    const EXPECTING: &'static str = "a node map with name, hub, data_dir and database";
    fn check(self) -> std::result::Result<Self, String> {
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir is empty: give the directory for the node's log".to_owned());
        }
        if self.database.0.kind == DatabaseKind::Redis && self.mode != Mode::Subscribe {
            return Err(format!(
                "node {}: redis is a target only, so mode `{}` is not possible: set mode: subscribe",
                self.name.0, self.mode
            ));
        }
        Ok(self)
    }
}

impl Check for RawMirror {
    const EXPECTING: &'static str = "a mirror map with url and optionally table";
    fn check(self) -> std::result::Result<Self, String> {
        let url = self.url.0.expose();
        if url.trim().is_empty() {
            return Err("mirror url is empty: give the database url (e.g. \"sqlite:///var/lib/syncmesh/conflicts.db\" or \"${MIRROR_URL}\")".to_owned());
        }
        if mirror_kind(url).is_none() {
            let scheme = describe_scheme(url);
            return Err(format!(
                "mirror url is not a supported database ({scheme}): use sqlite:, postgres://, postgresql://, mysql:// or mariadb://"
            ));
        }
        if let Some(t) = &self.table {
            check_mirror_table(t)?;
        }
        Ok(self)
    }
}

/// A mirror table name: a plain SQL identifier every engine accepts
/// unquoted (letters, digits, `_`; not starting with a digit; ≤ 63 bytes).
fn check_mirror_table(t: &str) -> std::result::Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 63
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !t.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else if t.is_empty() {
        Err(
            "mirror table is empty: give a table name such as sync_conflicts or leave table out"
                .to_owned(),
        )
    } else {
        Err(format!(
            "mirror table `{t}` is not a plain identifier: use letters, digits and `_` (not starting with a digit, at most 63 bytes), e.g. sync_conflicts"
        ))
    }
}

impl Check for RawDatabase {
    const EXPECTING: &'static str = "a database map with type and url";
    fn check(self) -> std::result::Result<Self, String> {
        match (&self.url, &self.url_file) {
            (Some(_), Some(_)) => {
                return Err("both url and url_file are given: keep exactly one of them".to_owned());
            }
            (None, None) => {
                return Err(
                    "no url: give url (e.g. \"${DB_URL}\") or url_file (a file holding the url)"
                        .to_owned(),
                );
            }
            (Some(url), None) => check_url(self.kind, url.0.expose(), "url")?,
            (None, Some(file)) if file.as_os_str().is_empty() => {
                return Err(
                    "url_file is empty: give the path of the file holding the url".to_owned(),
                );
            }
            (None, Some(_)) => {}
        }
        let only = |present: bool, key: &str, kind: DatabaseKind| {
            if present && self.kind != kind {
                Err(format!(
                    "{key} applies to type {kind} only, not {}: remove it",
                    self.kind
                ))
            } else {
                Ok(())
            }
        };
        only(self.slot.is_some(), "slot", DatabaseKind::Postgresql)?;
        only(
            self.publication.is_some(),
            "publication",
            DatabaseKind::Postgresql,
        )?;
        only(self.capture.is_some(), "capture", DatabaseKind::Postgresql)?;
        only(self.key_prefix.is_some(), "key_prefix", DatabaseKind::Redis)?;
        only(self.ttl.is_some(), "ttl", DatabaseKind::Redis)?;
        for (key, value) in [("slot", &self.slot), ("publication", &self.publication)] {
            if let Some(v) = value
                && !valid_pg_name(v)
            {
                return Err(format!(
                    "{key} `{v}` is not a valid PostgreSQL name: use 1-63 characters from a-z 0-9 _, not starting with a digit"
                ));
            }
        }
        Ok(self)
    }
}

impl Check for RawTable {
    const EXPECTING: &'static str = "a table map with a name";
    fn check(self) -> std::result::Result<Self, String> {
        check_identifier(&self.name, "table name")?;
        let key = self
            .key
            .as_ref()
            .map(|k| k.0.as_slice())
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        for column in key {
            check_identifier(column, "key column")?;
            if !seen.insert(column) {
                return Err(format!(
                    "table {}: key lists column `{column}` twice: list each column once",
                    self.name
                ));
            }
        }
        let fields = self.resolve.as_ref().and_then(|r| r.fields.as_ref());
        if let Some(fields) = fields {
            if matches!(self.granularity, RawGranularity::Row) && !fields.0.is_empty() {
                return Err(format!(
                    "table {}: granularity row resolves the whole row as one, so resolve.fields does not apply: remove resolve.fields or use granularity: field",
                    self.name
                ));
            }
            for field in fields.0.keys() {
                check_identifier(field, "field name")?;
                if key.contains(field) {
                    return Err(format!(
                        "table {}: `{field}` is a key column and key columns are never merged: remove it from resolve.fields",
                        self.name
                    ));
                }
            }
        }
        Ok(self)
    }
}

fn check_identifier(name: &str, what: &str) -> std::result::Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{what} is empty: give a name"));
    }
    if name
        .chars()
        .any(|c| c.is_control() || matches!(c, '"' | '\'' | '`'))
    {
        return Err(format!(
            "{what} `{}` contains quotes or control characters: use the plain name",
            name.escape_debug()
        ));
    }
    Ok(())
}

fn valid_pg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks that `url` fits `kind`, without ever printing more than its scheme.
fn check_url(kind: DatabaseKind, url: &str, key: &str) -> std::result::Result<(), String> {
    if url.trim().is_empty() {
        return Err(format!("{key} is empty: give the {kind} connection url"));
    }
    if kind.url_prefixes().iter().any(|p| url.starts_with(p)) {
        return Ok(());
    }
    let found = describe_scheme(url);
    Err(format!(
        "{key} does not fit type {kind} ({found}): it must start with {}; fix the url or the type",
        kind.url_prefixes().join(" or ")
    ))
}

/// A scalar parsed from its string form, failing with the line of the value.
trait ParseStr: Sized {
    const EXPECTING: &'static str;
    fn parse_str(s: &str) -> std::result::Result<Self, String>;
}

struct Parsed<T>(T);

impl<'de, T: ParseStr> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(PhantomData<fn() -> T>);
        impl<'de, T: ParseStr> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<T, E> {
                T::parse_str(v).map_err(E::custom)
            }
            // Never echo a value that was not a string (it may be a secret).
            fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<T, E> {
                Err(E::custom(format!(
                    "expected {}: quote the value",
                    T::EXPECTING
                )))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<T, E> {
                Err(E::custom(format!(
                    "expected {}: quote the value",
                    T::EXPECTING
                )))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<T, E> {
                Err(E::custom(format!(
                    "expected {}: quote the value",
                    T::EXPECTING
                )))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<T, E> {
                Err(E::custom(format!(
                    "expected {}: quote the value",
                    T::EXPECTING
                )))
            }
        }
        d.deserialize_str(V(PhantomData)).map(Parsed)
    }
}

impl ParseStr for SocketAddr {
    const EXPECTING: &'static str = "a socket address such as 127.0.0.1:7700";
    fn parse_str(s: &str) -> std::result::Result<Self, String> {
        s.trim().parse().map_err(|_| {
            format!(
                "`{s}` is not a socket address: use IP:PORT such as 127.0.0.1:7700 (a host name is not accepted; quote IPv6 like \"[::1]:7700\")"
            )
        })
    }
}

impl ParseStr for NodeId {
    const EXPECTING: &'static str = "a node name";
    fn parse_str(s: &str) -> std::result::Result<Self, String> {
        NodeId::new(s).map_err(|e| e.to_string())
    }
}

impl ParseStr for Secret {
    const EXPECTING: &'static str = "a connection url string";
    fn parse_str(s: &str) -> std::result::Result<Self, String> {
        Ok(Secret::new(s))
    }
}

struct HubUrl(String);

impl ParseStr for HubUrl {
    const EXPECTING: &'static str = "a hub url such as http://127.0.0.1:7700";
    fn parse_str(s: &str) -> std::result::Result<Self, String> {
        let rest = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"));
        match rest {
            Some(r) if !r.is_empty() && !r.starts_with('/') && !s.contains(char::is_whitespace) => {
                Ok(HubUrl(s.to_owned()))
            }
            _ => Err(format!(
                "hub url `{s}` is not an http:// or https:// url with a host: use e.g. http://127.0.0.1:7700"
            )),
        }
    }
}

struct WebhookUrl(String);

impl ParseStr for WebhookUrl {
    const EXPECTING: &'static str = "a webhook url";
    fn parse_str(s: &str) -> std::result::Result<Self, String> {
        let rest = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"));
        match rest {
            Some(r) if !r.is_empty() && !r.starts_with('/') && !s.contains(char::is_whitespace) => {
                Ok(WebhookUrl(s.to_owned()))
            }
            // The url itself is not printed: webhook paths often hold tokens.
            _ => Err("webhook must be an http:// or https:// url with a host: fix it".to_owned()),
        }
    }
}

/// A non-negative integer or a duration string, in milliseconds.
fn duration_visitor_ms<'de, D: Deserializer<'de>>(
    d: D,
    bare_unit_ms: u64,
    bare_unit: &'static str,
) -> std::result::Result<u64, D::Error> {
    struct V {
        bare_unit_ms: u64,
        bare_unit: &'static str,
    }
    impl<'de> Visitor<'de> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "a duration such as 500ms, 30s or 5m (a plain number is {})",
                self.bare_unit
            )
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<u64, E> {
            v.checked_mul(self.bare_unit_ms)
                .ok_or_else(|| E::custom(format!("duration {v} is too large: use a smaller value")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "duration {v} is negative: use a positive value such as 500ms"
                ))),
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<u64, E> {
            parse_duration_ms(v, self.bare_unit_ms).map_err(E::custom)
        }
    }
    d.deserialize_any(V {
        bare_unit_ms,
        bare_unit,
    })
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d` or a bare integer (in units of
/// `bare_unit_ms`) into milliseconds.
fn parse_duration_ms(text: &str, bare_unit_ms: u64) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_ms = match unit.trim() {
        "" => Some(bare_unit_ms),
        "ms" => Some(1),
        "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        _ => None,
    };
    let (Some(unit_ms), false) = (unit_ms, number.is_empty()) else {
        return Err(format!(
            "`{text}` is not a duration: use a whole number with a unit ms, s, m, h or d, such as 500ms or 5m"
        ));
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_ms))
        .ok_or_else(|| format!("duration `{text}` is too large: use a smaller value"))
}

struct Ttl(u64);

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let ms = duration_visitor_ms(d, 1_000, "seconds")?;
        if ms == 0 {
            return Err(de::Error::custom(
                "ttl must be at least 1s: remove ttl to keep keys without expiry",
            ));
        }
        if ms % 1_000 != 0 {
            return Err(de::Error::custom(
                "ttl must be a whole number of seconds: use e.g. 300s or 5m",
            ));
        }
        Ok(Ttl(ms / 1_000))
    }
}

struct ClockDrift(u64);

impl<'de> Deserialize<'de> for ClockDrift {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        duration_visitor_ms(d, 1, "milliseconds").map(ClockDrift)
    }
}

/// An integer in `min..=max`.
fn ranged_integer<'de, D: Deserializer<'de>>(
    d: D,
    key: &'static str,
    min: u64,
    max: u64,
) -> std::result::Result<u64, D::Error> {
    struct V {
        key: &'static str,
        min: u64,
        max: u64,
    }
    impl<'de> Visitor<'de> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a whole number from {} to {}", self.min, self.max)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<u64, E> {
            if (self.min..=self.max).contains(&v) {
                Ok(v)
            } else {
                Err(E::custom(format!(
                    "{} {v} is out of range: use a value from {} to {}",
                    self.key, self.min, self.max
                )))
            }
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "{} {v} is out of range: use a value from {} to {}",
                    self.key, self.min, self.max
                ))),
            }
        }
    }
    d.deserialize_any(V { key, min, max })
}

struct BatchSize(usize);

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let max = MAX_BATCH_SIZE as u64;
        let v = ranged_integer(d, "batch_size", 1, max)?;
        Ok(BatchSize(usize::try_from(v).unwrap_or(MAX_BATCH_SIZE)))
    }
}

struct RetentionDays(u32);

impl<'de> Deserialize<'de> for RetentionDays {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = ranged_integer(d, "retention_days", 1, u64::from(u32::MAX))?;
        Ok(RetentionDays(u32::try_from(v).unwrap_or(u32::MAX)))
    }
}

/// `key: [a, b]`, or a single column as `key: id`.
struct KeyList(Vec<String>);

impl<'de> Deserialize<'de> for KeyList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of key columns such as [id]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Vec<String>, E> {
                Ok(vec![v.to_owned()])
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Vec<String>, A::Error> {
                let mut out = Vec::new();
                while let Some(column) = seq.next_element::<String>()? {
                    out.push(column);
                }
                Ok(out)
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Vec<String>, E> {
                Ok(Vec::new())
            }
        }
        d.deserialize_any(V).map(KeyList)
    }
}

/// `resolve.fields`: field name to strategy, rejecting a field given twice.
struct FieldMap(BTreeMap<String, StrategySpec>);

impl<'de> Deserialize<'de> for FieldMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BTreeMap<String, StrategySpec>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of field names to strategies")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(field) = map.next_key::<String>()? {
                    let spec = map.next_value::<StrategySpec>()?;
                    if out.insert(field.clone(), spec).is_some() {
                        return Err(de::Error::custom(format!(
                            "field `{field}` is given twice: keep one"
                        )));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V).map(FieldMap)
    }
}

// ---------------------------------------------------------------------------
// Cross-checks, secrets from files, path resolution
// ---------------------------------------------------------------------------

fn build(mut raw: RawConfig, source: &str, base: &Path) -> std::result::Result<Config, String> {
    let hub = match raw.hub.take() {
        Some(Checked(h)) => Some(build_hub(h, base)?),
        None => None,
    };
    build_rest(raw, hub, source, base)
}

fn build_hub(h: RawHub, base: &Path) -> std::result::Result<HubConfig, String> {
    let tls = match h.tls {
        Some(t) => Some(crate::tls::ServerTls::load(
            resolve_path(base, &t.cert),
            resolve_path(base, &t.key),
            t.client_ca.map(|c| resolve_path(base, &c)),
            "hub.tls",
        )?),
        None => None,
    };
    Ok(HubConfig {
        name: h
            .name
            .map(|n| n.0.as_str().to_owned())
            .unwrap_or_else(|| DEFAULT_HUB_NAME.to_owned()),
        listen: h.listen.0,
        data_dir: resolve_path(base, &h.data_dir),
        metrics: h.metrics.map(|m| m.0),
        tombstone_grace_hours: h
            .tombstone_grace_hours
            .unwrap_or(DEFAULT_TOMBSTONE_GRACE_HOURS),
        tls,
    })
}

fn build_node_tls(
    t: Option<RawNodeTls>,
    url: &str,
    at: &str,
    base: &Path,
) -> std::result::Result<Option<crate::tls::ClientTls>, String> {
    let Some(t) = t else {
        return Ok(None);
    };
    if !crate::tls::is_https(url) {
        return Err(format!(
            "{at}.tls is set but {at}.hub `{url}` is plaintext http://: use https:// in {at}.hub to speak TLS to the hub, or remove {at}.tls"
        ));
    }
    let hints = crate::tls::Hints::node(at);
    crate::tls::ClientTls::load(
        t.ca.map(|p| resolve_path(base, &p)),
        t.cert.map(|p| resolve_path(base, &p)),
        t.key.map(|p| resolve_path(base, &p)),
        t.server_name,
        &hints,
    )
    .map(Some)
}

fn build_rest(
    raw: RawConfig,
    hub: Option<HubConfig>,
    source: &str,
    base: &Path,
) -> std::result::Result<Config, String> {
    let mut nodes: Vec<NodeConfig> = Vec::with_capacity(raw.nodes.len());
    for (i, Checked(n)) in raw.nodes.into_iter().enumerate() {
        if let Some(j) = nodes.iter().position(|m| m.name == n.name.0) {
            return Err(format!(
                "nodes[{i}].name: node name {} is used twice (also nodes[{j}]): give every node a unique name",
                n.name.0
            ));
        }
        if let Some(h) = &hub
            && h.name == n.name.0.as_str()
        {
            return Err(format!(
                "nodes[{i}].name: node name {} is also the hub's name: give the node another name or set hub.name",
                n.name.0
            ));
        }
        let database = build_database(n.database.0, base, &format!("nodes[{i}].database"))?;
        let at = format!("nodes[{i}]");
        let tls = build_node_tls(n.tls, &n.hub.0.0, &at, base)?;
        nodes.push(NodeConfig {
            name: n.name.0,
            hub: n.hub.0.0,
            data_dir: resolve_path(base, &n.data_dir),
            mode: n.mode,
            priority: n.priority,
            database,
            metrics: n.metrics.map(|m| m.0),
            tls,
            at,
        });
    }

    if raw.tables.is_empty() {
        return Err(
            "no tables are configured: add a `tables:` list with at least one `- name: TABLE`"
                .to_owned(),
        );
    }
    let mut tables: Vec<TableConfig> = Vec::with_capacity(raw.tables.len());
    for (i, Checked(t)) in raw.tables.into_iter().enumerate() {
        if let Some(j) = tables.iter().position(|u| u.name == t.name) {
            return Err(format!(
                "tables[{i}].name: table {} is listed twice (also tables[{j}]): merge the two entries",
                t.name
            ));
        }
        let resolve = t.resolve.unwrap_or_default();
        tables.push(TableConfig {
            name: t.name,
            key: t.key.map(|k| k.0).unwrap_or_default(),
            deletes: match t.deletes {
                RawDeletes::DeleteWins => DeletePolicy::DeleteWins,
                RawDeletes::UpdateWins => DeletePolicy::UpdateWins,
            },
            granularity: match t.granularity {
                RawGranularity::Field => Granularity::Field,
                RawGranularity::Row => Granularity::Row,
            },
            resolve: ResolveConfig {
                default: resolve.default.unwrap_or_default(),
                fields: resolve.fields.map(|f| f.0).unwrap_or_default(),
            },
        });
    }

    let sync = match raw.sync {
        Some(s) => SyncConfig {
            batch_size: s.batch_size.map_or(MAX_BATCH_SIZE, |b| b.0),
            max_clock_drift_ms: s
                .max_clock_drift
                .map_or(DEFAULT_MAX_CLOCK_DRIFT_MS, |d| d.0),
        },
        None => SyncConfig::default(),
    };
    let conflicts = match raw.conflicts {
        Some(c) => ConflictsConfig {
            retention_days: c.retention_days.map_or(DEFAULT_RETENTION_DAYS, |r| r.0),
            alert: c.alert.map(|a| AlertConfig {
                per_hour: a.per_hour,
                webhook: a.webhook.map(|w| w.0.0),
            }),
            mirror: c.mirror.map(|Checked(m)| {
                let url = m.url.0.expose();
                let url = if url.starts_with("sqlite:") {
                    resolve_sqlite_url(url, base)
                } else {
                    url.to_owned()
                };
                MirrorConfig {
                    url: Secret::new(url),
                    table: m.table.unwrap_or_else(|| DEFAULT_MIRROR_TABLE.to_owned()),
                }
            }),
        },
        None => ConflictsConfig::default(),
    };

    Ok(Config {
        hub,
        nodes,
        tables,
        sync,
        conflicts,
        source: source.to_owned(),
    })
}

fn build_database(
    raw: RawDatabase,
    base: &Path,
    at: &str,
) -> std::result::Result<DatabaseConfig, String> {
    let url = match (raw.url, raw.url_file) {
        (Some(url), _) => url.0.0,
        (None, Some(file)) => {
            let path = resolve_path(base, &file);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "{at}.url_file: cannot read {} ({e}): create the file with the url or fix the path",
                    path.display()
                )
            })?;
            let url = text.trim().to_owned();
            check_url(raw.kind, &url, "url_file content")
                .map_err(|m| format!("{at}.url_file: {m}"))?;
            url
        }
        // Checked while parsing; kept total for safety.
        (None, None) => return Err(format!("{at}: no url: give url or url_file")),
    };
    let url = if raw.kind == DatabaseKind::Sqlite {
        resolve_sqlite_url(&url, base)
    } else {
        url
    };
    Ok(DatabaseConfig {
        kind: raw.kind,
        url: Secret::new(url),
        slot: raw.slot,
        publication: raw.publication,
        capture: raw.capture.unwrap_or_default(),
        key_prefix: raw.key_prefix,
        ttl_seconds: raw.ttl.map(|t| t.0),
    })
}

/// `base/p` (or `p` when absolute), without `.` components.
fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// `sqlite:rel.db`, `sqlite://./rel.db`, `sqlite:///abs.db` (any with a
/// `?query`) become `sqlite://<absolute path>[?query]`; in-memory URLs stay.
fn resolve_sqlite_url(url: &str, base: &Path) -> String {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return url.to_owned();
    };
    let (path, query) = match rest.find('?') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if path.is_empty() || path == ":memory:" {
        return url.to_owned();
    }
    format!(
        "sqlite://{}{query}",
        resolve_path(base, Path::new(path)).display()
    )
}

// ---------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------

/// `s` with any password in it replaced by `***` (safe to log):
/// `scheme://user:***@host/path?***`; `***` when `s` is not a URL.
pub fn redact_url(s: &str) -> String {
    if let Some(rest) = s.strip_prefix("sqlite:")
        && !rest.starts_with("//")
    {
        return match rest.find('?') {
            Some(i) => format!("sqlite:{}?***", &rest[..i]),
            None => s.to_owned(),
        };
    }
    let Some((scheme, rest)) = split_scheme(s) else {
        return "***".to_owned();
    };
    let mut out = format!("{scheme}://");
    // The last `@` ends the credentials; a stray `@` later only hides more.
    let host_part = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                // A lone redis userinfo is a password (`redis://secret@host`).
                None if scheme.starts_with("redis") => out.push_str("***"),
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    match host_part.find(['?', '#']) {
        Some(i) => {
            out.push_str(&host_part[..i]);
            if host_part[i..].starts_with('?') {
                out.push_str("?***");
            }
        }
        None => out.push_str(host_part),
    }
    out
}

/// `scheme://host[:port]/***` for a webhook, whose path may hold a token.
fn redact_webhook(s: &str) -> String {
    let Some((scheme, rest)) = split_scheme(s) else {
        return "***".to_owned();
    };
    let rest = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if host_end == rest.len() {
        format!("{scheme}://{rest}")
    } else {
        format!("{scheme}://{}/***", &rest[..host_end])
    }
}

fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let i = s.find("://")?;
    let scheme = &s[..i];
    let ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    ok.then(|| (scheme, &s[i + 3..]))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"hub:
  listen: 127.0.0.1:7700
  data_dir: ./data/hub
  metrics: 127.0.0.1:9700          # Prometheus text at /metrics
nodes:
  - name: edge-a
    hub: http://127.0.0.1:7700
    data_dir: ./data/edge-a
    mode: bidirectional              # publish (source only) | subscribe (replica only)
    priority: 1                      # rank for source_priority / merge (higher wins)
    database: { type: sqlite, url: "sqlite://./data/edge-a.db" }
  - name: main
    hub: http://127.0.0.1:7700
    data_dir: ./data/main
    priority: 10
    database: { type: postgresql, url: "${PG_URL}", slot: syncmesh, publication: syncmesh }
tables:
  - name: orders
    key: [id]
    deletes: delete_wins             # or update_wins
    granularity: field               # or row (whole-row last-write-wins)
    resolve:
      default: last_write_wins
      fields:
        quantity: sum
        last_login: max
        status: { priority_order: [active, pending, inactive] }
sync:
  batch_size: 10000
  max_clock_drift: 500ms
conflicts:
  retention_days: 90
  alert: { per_hour: 100, webhook: "http://127.0.0.1:9000/alerts" }
"#;

    const PG: &str = "postgres://user:pw@127.0.0.1/db";

    fn env(name: &str) -> Option<String> {
        match name {
            "PG_URL" => Some(PG.to_owned()),
            "HOME_DIR" => Some("/home/x".to_owned()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config> {
        Config::parse_with_env(text, "test.yaml", Path::new("/base"), env)
    }

    fn err(text: &str) -> String {
        let e = parse(text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "multi-line error: {e}");
        assert!(!e.contains("pw@"), "secret in error: {e}");
        e
    }

    /// A minimal valid file with `extra` spliced into the first node.
    fn with_node(extra: &str) -> String {
        format!(
            "nodes:\n  - name: a\n    hub: http://h:1\n    data_dir: d\n{extra}tables:\n  - name: t\n"
        )
    }

    const SQLITE_DB: &str = "    database: { type: sqlite, url: \"sqlite:a.db\" }\n";

    #[test]
    fn design_example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.source, "test.yaml");
        let hub = c.hub().unwrap();
        assert_eq!(hub.name, "hub");
        assert_eq!(hub.listen, "127.0.0.1:7700".parse().unwrap());
        assert_eq!(hub.data_dir, PathBuf::from("/base/data/hub"));
        assert_eq!(hub.metrics, Some("127.0.0.1:9700".parse().unwrap()));
        assert_eq!(hub.tombstone_grace_hours, DEFAULT_TOMBSTONE_GRACE_HOURS);
        assert_eq!(c.node_names(), ["edge-a", "main"]);
        let a = c.node("edge-a").unwrap();
        assert_eq!(a.mode, Mode::Bidirectional);
        assert_eq!(a.priority, 1);
        assert_eq!(a.database.kind, DatabaseKind::Sqlite);
        assert_eq!(a.database.url.expose(), "sqlite:///base/data/edge-a.db");
        assert_eq!(a.data_dir, PathBuf::from("/base/data/edge-a"));
        let main = c.node("main").unwrap();
        assert_eq!(main.priority, 10);
        assert_eq!(main.database.kind, DatabaseKind::Postgresql);
        assert_eq!(main.database.url.expose(), PG);
        assert_eq!(main.database.slot.as_deref(), Some("syncmesh"));
        assert_eq!(main.database.publication.as_deref(), Some("syncmesh"));
        assert_eq!(main.database.capture, PgCapture::Stream, "the default");
        let t = c.table("orders").unwrap();
        assert_eq!(t.key, ["id"]);
        assert_eq!(t.deletes, DeletePolicy::DeleteWins);
        assert_eq!(t.granularity, Granularity::Field);
        assert_eq!(t.resolve.default, StrategySpec::LastWriteWins);
        assert_eq!(t.resolve.fields["quantity"], StrategySpec::Sum);
        assert_eq!(t.resolve.fields["last_login"], StrategySpec::Max);
        assert_eq!(
            t.resolve.fields["status"],
            StrategySpec::PriorityOrder(vec!["active".into(), "pending".into(), "inactive".into()])
        );
        assert!(c.table("nope").is_none());
        assert_eq!(
            c.sync,
            SyncConfig {
                batch_size: 10_000,
                max_clock_drift_ms: 500
            }
        );
        assert_eq!(c.conflicts.retention_days, 90);
        let alert = c.conflicts.alert.as_ref().unwrap();
        assert_eq!(alert.per_hour, 100);
        assert_eq!(
            alert.webhook.as_deref(),
            Some("http://127.0.0.1:9000/alerts")
        );
        let debug = format!("{c:?}");
        assert!(!debug.contains("pw"), "{debug}");
        assert!(
            debug.contains("postgres://user:***@127.0.0.1/db"),
            "{debug}"
        );
        assert!(!debug.contains("/alerts"), "{debug}");
    }

    #[test]
    fn defaults_and_minimal_node_only_file() {
        let c = parse(&with_node(SQLITE_DB)).unwrap();
        assert!(c.hub.is_none());
        assert!(
            c.hub()
                .unwrap_err()
                .to_string()
                .contains("no `hub:` section")
        );
        let n = c.node("a").unwrap();
        assert_eq!(n.mode, Mode::Bidirectional);
        assert_eq!(n.priority, 0);
        assert_eq!(n.metrics, None);
        assert_eq!(c.sync, SyncConfig::default());
        assert_eq!(c.conflicts, ConflictsConfig::default());
        let t = c.table("t").unwrap();
        assert!(t.key.is_empty());
        assert_eq!(t.resolve, ResolveConfig::default());
    }

    #[test]
    fn hub_only_file() {
        let c = parse("hub:\n  name: eu\n  listen: 0.0.0.0:7700\n  data_dir: /var/hub\ntables:\n  - name: t\n")
            .unwrap();
        assert!(c.nodes.is_empty());
        assert_eq!(c.hub().unwrap().name, "eu");
        assert_eq!(c.hub().unwrap().data_dir, PathBuf::from("/var/hub"));
        let e = c.node("x").unwrap_err().to_string();
        assert!(e.contains("no nodes"), "{e}");
    }

    #[test]
    fn unknown_node_lists_names() {
        let c = parse(EXAMPLE).unwrap();
        let e = c.node("edge-z").unwrap_err().to_string();
        assert!(e.starts_with("config test.yaml: node `edge-z`"), "{e}");
        assert!(e.contains("edge-a, main"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_line_and_valid_keys() {
        let e = err(&with_node(&format!("    prority: 3\n{SQLITE_DB}")));
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("unknown key `prority`"), "{e}");
        assert!(
            e.contains("check the spelling; valid keys are name, hub, data_dir, mode, priority"),
            "{e}"
        );
        let e = err("tables:\n  - name: t\nsyncc: {}\n");
        assert!(
            e.contains("line 3") && e.contains("unknown key `syncc`"),
            "{e}"
        );
        let e = err(&with_node(
            "    database: { type: sqlite, url: \"sqlite:a.db\", slott: x }\n",
        ));
        assert!(
            e.contains("line 5") && e.contains("unknown key `slott`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_enum_value_lists_valid_values() {
        let e = err(&with_node(
            "    mode: bidirectonal\n    database: { type: sqlite, url: sqlite:x }\n",
        ));
        assert!(
            e.contains("line 5") && e.contains("unknown value `bidirectonal`"),
            "{e}"
        );
        assert!(e.contains("bidirectional, publish, subscribe"), "{e}");
        let e = err(&with_node(
            "    database: { type: oracle, url: sqlite:x }\n",
        ));
        assert!(
            e.contains("unknown value `oracle`") && e.contains("sqlite, postgres, postgresql"),
            "{e}"
        );
    }

    #[test]
    fn missing_key_is_named() {
        let e = err(
            "nodes:\n  - name: a\n    data_dir: d\n    database: { type: sqlite, url: sqlite:x }\ntables: [{name: t}]\n",
        );
        assert!(
            e.contains("line 2") && e.contains("missing key `hub`: add it"),
            "{e}"
        );
    }

    #[test]
    fn env_expansion() {
        let lookup = |n: &str| env(n);
        assert_eq!(
            expand_env("a: ${HOME_DIR}/x", "s", lookup).unwrap(),
            "a: /home/x/x"
        );
        assert_eq!(
            expand_env("p: a$$b$c $", "s", lookup).unwrap(),
            "p: a$b$c $"
        );
        assert_eq!(
            expand_env("# ${UNSET} in a comment\n", "s", lookup).unwrap(),
            "# ${UNSET} in a comment\n"
        );
        let e = expand_env("a: 1\nb: 2\nurl: ${PG_URLX}\n", "x.yaml", lookup)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config x.yaml: line 3: environment variable PG_URLX is not set: export it or remove ${PG_URLX}"
        );
        let e = expand_env("a: ${NOPE", "x.yaml", lookup)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("not closed"), "{e}");
        let e = expand_env("a: ${1A}", "x.yaml", lookup)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a valid environment variable reference"),
            "{e}"
        );
        let e = err(&format!("{EXAMPLE}# end\n").replace("PG_URL", "PG_URL_UNSET"));
        assert!(
            e.contains("line 16: environment variable PG_URL_UNSET is not set"),
            "{e}"
        );
    }

    #[test]
    fn lines_stay_right_when_a_value_spans_lines() {
        let lookup = |n: &str| (n == "MULTI").then(|| "\"x\n  y\"".to_owned());
        let text = "tables:\n  - name: ${MULTI}\n    bogus: 1\n";
        let e = Config::parse_with_env(text, "m.yaml", Path::new("/b"), lookup)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown key `bogus`"),
            "{e}"
        );
    }

    #[test]
    fn sqlite_paths_resolve_against_base_dir() {
        let base = Path::new("/srv/mesh");
        assert_eq!(
            resolve_sqlite_url("sqlite://./data/a.db", base),
            "sqlite:///srv/mesh/data/a.db"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite:relative.db", base),
            "sqlite:///srv/mesh/relative.db"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite:a.db?mode=rwc", base),
            "sqlite:///srv/mesh/a.db?mode=rwc"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite:///abs/a.db", base),
            "sqlite:///abs/a.db"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite://../x.db", base),
            "sqlite:///srv/mesh/../x.db"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite::memory:", base),
            "sqlite::memory:"
        );
        let c = parse(&with_node(SQLITE_DB)).unwrap();
        assert_eq!(c.nodes[0].database.url.expose(), "sqlite:///base/a.db");
        assert_eq!(c.nodes[0].data_dir, PathBuf::from("/base/d"));
    }

    #[test]
    fn load_resolves_against_the_file_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, with_node(SQLITE_DB)).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.source, path.display().to_string());
        let want = format!("sqlite://{}", dir.path().join("a.db").display());
        assert_eq!(c.nodes[0].database.url.expose(), want);
        let missing = dir.path().join("nope.yaml");
        let e = Config::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope.yaml") && e.contains("file not found"),
            "{e}"
        );
    }

    #[test]
    fn url_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg.secret"), format!("{PG}\n")).unwrap();
        let text = with_node("    database: { type: postgresql, url_file: pg.secret }\n");
        let c = Config::parse_with_env(&text, "t", dir.path(), env).unwrap();
        assert_eq!(c.nodes[0].database.url.expose(), PG);
        let e = Config::parse_with_env(&text, "t", Path::new("/nonexistent-dir"), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nodes[0].database.url_file: cannot read /nonexistent-dir/pg.secret"),
            "{e}"
        );
        let text = with_node("    database: { type: mysql, url_file: pg.secret }\n");
        let e = Config::parse_with_env(&text, "t", dir.path(), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not fit type mysql (it starts with `postgres:`)"),
            "{e}"
        );
        assert!(!e.contains("pw"), "{e}");
    }

    /// A directory with `ca.pem`, `cert.pem` + `key.pem` (signed by it),
    /// `other.key` (a key of no certificate) and `junk.pem` (not PEM).
    fn tls_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        w("ca.pem", &ca.pem());
        w("cert.pem", &cert.pem());
        w("key.pem", &key.serialize_pem());
        w(
            "other.key",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        w("junk.pem", "not a certificate\n");
        w(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        dir
    }

    fn tls_node(hub: &str, tls: &str) -> String {
        format!(
            "nodes:\n  - name: a\n    hub: {hub}\n    data_dir: d\n    tls: {tls}\n{SQLITE_DB}tables:\n  - name: t\n"
        )
    }

    fn tls_hub(tls: &str) -> String {
        format!(
            "hub:\n  listen: 127.0.0.1:7700\n  data_dir: h\n  tls: {tls}\ntables:\n  - name: t\n"
        )
    }

    fn parse_in(dir: &Path, text: &str) -> Result<Config> {
        Config::parse_with_env(text, "t", dir, env)
    }

    #[test]
    fn tls_settings_are_read_relative_to_the_file() {
        let dir = tls_files();
        let c = parse_in(
            dir.path(),
            &tls_node(
                "https://localhost:7700",
                "{ ca: ca.pem, cert: cert.pem, key: key.pem, server_name: localhost }",
            ),
        )
        .unwrap();
        let tls = c.nodes[0].tls.as_ref().unwrap();
        assert_eq!(tls.ca.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        assert!(tls.has_client_cert());
        assert_eq!(tls.server_name.as_deref(), Some("localhost"));
        assert_eq!(c.nodes[0].at, "nodes[0]");
        // Debug never shows key material.
        assert!(!format!("{c:?}").contains("PRIVATE KEY"));
        let c = parse_in(
            dir.path(),
            &tls_hub("{ cert: cert.pem, key: key.pem, client_ca: ca.pem }"),
        )
        .unwrap();
        let hub = c.hub().unwrap().tls.as_ref().unwrap();
        assert!(hub.is_mutual());
        assert_eq!(hub.cert, dir.path().join("cert.pem"));
        // No tls: plaintext as before; https without tls: webpki roots.
        let c = parse_in(dir.path(), &with_node(SQLITE_DB)).unwrap();
        assert!(c.nodes[0].tls.is_none());
    }

    #[test]
    fn tls_on_an_http_url_is_an_error() {
        let dir = tls_files();
        let e = parse_in(dir.path(), &tls_node("http://h:1", "{ ca: ca.pem }"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config t: nodes[0].tls is set but nodes[0].hub `http://h:1` is plaintext http://: use https:// in nodes[0].hub to speak TLS to the hub, or remove nodes[0].tls"
        );
    }

    #[test]
    fn tls_files_missing_unreadable_or_not_pem_are_errors() {
        let dir = tls_files();
        let d = dir.path().display();
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ ca: nope.pem }"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "config t: nodes[0].tls.ca: {d}/nope.pem does not exist: fix the path or create the file"
            )
        );
        // A directory cannot be read as a file.
        std::fs::create_dir(dir.path().join("adir")).unwrap();
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ ca: adir }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("nodes[0].tls.ca: cannot read {d}/adir (")),
            "{e}"
        );
        assert!(e.ends_with("make it readable by this process"), "{e}");
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ ca: junk.pem }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("nodes[0].tls.ca: {d}/junk.pem holds no PEM certificate: give a PEM file with a -----BEGIN CERTIFICATE----- block")),
            "{e}"
        );
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ ca: broken.pem }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "nodes[0].tls.ca: {d}/broken.pem is not valid PEM ("
            )),
            "{e}"
        );
        // A certificate where the key belongs.
        let e = parse_in(
            dir.path(),
            &tls_node("https://h:1", "{ cert: cert.pem, key: cert.pem }"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "nodes[0].tls.key: {d}/cert.pem holds no PEM private key ("
            )),
            "{e}"
        );
        let e = parse_in(dir.path(), &tls_hub("{ cert: junk.pem, key: key.pem }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "hub.tls.cert: {d}/junk.pem holds no PEM certificate"
            )),
            "{e}"
        );
        let e = parse_in(dir.path(), &tls_hub("{ cert: cert.pem, key: missing.key }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("hub.tls.key: {d}/missing.key does not exist")),
            "{e}"
        );
        let e = parse_in(
            dir.path(),
            &tls_hub("{ cert: cert.pem, key: key.pem, client_ca: junk.pem }"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hub.tls.client_ca: "), "{e}");
    }

    #[test]
    fn tls_key_without_cert_and_mismatched_keys_are_errors() {
        let dir = tls_files();
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ key: key.pem }"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config t: nodes[0].tls.key is set without nodes[0].tls.cert: give both (a client certificate and its key) or neither"
        );
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ cert: cert.pem }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nodes[0].tls.cert is set without nodes[0].tls.key"),
            "{e}"
        );
        let e = parse_in(dir.path(), &tls_hub("{ cert: cert.pem, key: other.key }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "hub.tls: the key {}/other.key does not fit the certificate",
                dir.path().display()
            )),
            "{e}"
        );
        let e = parse_in(
            dir.path(),
            &tls_node("https://h:1", "{ cert: cert.pem, key: other.key }"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nodes[0].tls.key: the key"), "{e}");
        let e = parse_in(
            dir.path(),
            &tls_node("https://h:1", "{ server_name: \"a b\" }"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nodes[0].tls.server_name: `a b` is not a DNS name or IP address"),
            "{e}"
        );
        let e = parse_in(dir.path(), &tls_node("https://h:1", "{ cafile: ca.pem }"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cafile"), "{e}");
    }

    #[test]
    fn url_and_url_file_are_exclusive() {
        let e = err(&with_node(
            "    database: { type: sqlite, url: \"sqlite:a\", url_file: f }\n",
        ));
        assert!(
            e.contains("line 5") && e.contains("keep exactly one"),
            "{e}"
        );
        let e = err(&with_node("    database: { type: sqlite }\n"));
        assert!(e.contains("no url"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms", 1), Ok(500));
        assert_eq!(parse_duration_ms("2s", 1), Ok(2_000));
        assert_eq!(parse_duration_ms("5m", 1), Ok(300_000));
        assert_eq!(parse_duration_ms(" 1 h", 1), Ok(3_600_000));
        assert_eq!(parse_duration_ms("300", 1_000), Ok(300_000));
        assert!(
            parse_duration_ms("5 minutes", 1)
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration_ms("ms", 1).is_err());
        assert!(parse_duration_ms("-5s", 1).is_err());
        assert!(
            parse_duration_ms("99999999999999999999s", 1)
                .unwrap_err()
                .contains("too large")
        );

        let tables = "tables:\n  - name: t\n";
        let drift = |v: &str| parse(&format!("{tables}sync:\n  max_clock_drift: {v}\n"));
        assert_eq!(drift("750").unwrap().sync.max_clock_drift_ms, 750);
        assert_eq!(drift("2s").unwrap().sync.max_clock_drift_ms, 2_000);
        assert_eq!(drift("1m").unwrap().sync.max_clock_drift_ms, 60_000);
        let e = drift("fast").unwrap_err().to_string();
        assert!(
            e.contains("line 4") && e.contains("`fast` is not a duration"),
            "{e}"
        );

        let redis = |ttl: &str| {
            parse(&with_node(&format!(
                "    mode: subscribe\n    database: {{ type: redis, url: \"redis://h\", key_prefix: \"sm:\", ttl: {ttl} }}\n"
            )))
        };
        assert_eq!(
            redis("300").unwrap().nodes[0].database.ttl_seconds,
            Some(300)
        );
        assert_eq!(
            redis("300s").unwrap().nodes[0].database.ttl_seconds,
            Some(300)
        );
        assert_eq!(
            redis("5m").unwrap().nodes[0].database.ttl_seconds,
            Some(300)
        );
        assert_eq!(
            redis("5m").unwrap().nodes[0].database.key_prefix.as_deref(),
            Some("sm:")
        );
        assert!(
            redis("1500ms")
                .unwrap_err()
                .to_string()
                .contains("whole number of seconds")
        );
        assert!(redis("0").unwrap_err().to_string().contains("at least 1s"));
    }

    #[test]
    fn redaction() {
        let s = Secret::new(PG);
        assert_eq!(s.redacted(), "postgres://user:***@127.0.0.1/db");
        assert_eq!(s.to_string(), "postgres://user:***@127.0.0.1/db");
        assert_eq!(
            format!("{s:?}"),
            "Secret(\"postgres://user:***@127.0.0.1/db\")"
        );
        assert_eq!(s.expose(), PG);
        assert_eq!(
            redact_url("mysql://u:p@w@h:3306/db?password=x"),
            "mysql://u:***@h:3306/db?***"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://pw@h"), "redis://***@h");
        assert_eq!(
            redact_url("mongodb+srv://u:pw@a,b/db"),
            "mongodb+srv://u:***@a,b/db"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("host=h password=pw"), "***");
        assert_eq!(redact_url("sqlite:///x/a.db"), "sqlite:///x/a.db");
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(
            redact_webhook("https://hooks.example/T000/B000/XXXX"),
            "https://hooks.example/***"
        );
        assert_eq!(
            redact_webhook("http://127.0.0.1:9000"),
            "http://127.0.0.1:9000"
        );
    }

    #[test]
    fn secrets_never_reach_error_messages() {
        // Wrong type for the url: the message names the scheme only.
        let e = err(&with_node(
            "    database: { type: mysql, url: \"${PG_URL}\" }\n",
        ));
        assert!(
            e.contains("url does not fit type mysql (it starts with `postgres:`)"),
            "{e}"
        );
        // A secret expanded into a field that echoes its value.
        let e = err(&with_node(&format!(
            "    mode: \"${{PG_URL}}\"\n{SQLITE_DB}"
        )));
        assert!(e.contains("unknown value `${PG_URL}`"), "{e}");
        let e = err(&with_node(&format!(
            "    priority: \"${{PG_URL}}\"\n{SQLITE_DB}"
        )));
        assert!(e.contains("${PG_URL}") && e.contains("line 5"), "{e}");
        // A url that is not a string is not echoed.
        let e = err(&with_node(
            "    database: { type: sqlite, url: 12345678 }\n",
        ));
        assert!(!e.contains("12345678"), "{e}");
        let e = err(&with_node("    database: { type: sqlite, url: [pw] }\n"));
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn strategies() {
        let table =
            |resolve: &str| parse(&format!("tables:\n  - name: t\n    resolve:\n{resolve}"));
        let e = table("      fields:\n        status: priority_order\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 5") && e.contains("priority_order needs its list"),
            "{e}"
        );
        let e = table("      fields:\n        status: { priority_order: [] }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs at least one value"), "{e}");
        let e = table("      fields:\n        status: { priority_order: }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs at least one value"), "{e}");
        let e = table("      fields:\n        status: { priority_ordr: [a] }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `priority_ordr`"), "{e}");
        let e = table("      fields:\n        status: { priority_order: [a, a] }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a` twice"), "{e}");
        let e = table("      default: newest\n").unwrap_err().to_string();
        assert!(
            e.contains("line 4") && e.contains("unknown strategy `newest`"),
            "{e}"
        );
        assert!(
            e.contains("last_write_wins, source_priority, merge, max, min, sum"),
            "{e}"
        );
        let e = table("      fields:\n        a: max\n        a: min\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let c = table(
            "      default: sum\n      fields:\n        s: source_priority\n        m: merge\n",
        )
        .unwrap();
        let r = &c.tables[0].resolve;
        assert_eq!(r.default, StrategySpec::Sum);
        assert_eq!(r.fields["s"], StrategySpec::SourcePriority);
        assert_eq!(r.fields["m"].to_string(), "merge");
    }

    #[test]
    fn rules_map_every_strategy_and_node_priorities() {
        let c = parse(EXAMPLE).unwrap();
        let prios = c.priorities();
        let rules = c.table("orders").unwrap().rules(&prios);
        assert_eq!(rules.strategy("quantity"), &Strategy::Sum);
        assert_eq!(rules.strategy("last_login"), &Strategy::Max);
        assert_eq!(
            rules.strategy("status"),
            &Strategy::PriorityOrder(vec!["active".into(), "pending".into(), "inactive".into()])
        );
        assert_eq!(rules.strategy("other"), &Strategy::LastWriteWins);
        assert_eq!(rules.priorities, prios);
        assert!(!prios.is_empty());

        let c = parse(
            "tables:\n  - name: t\n    deletes: update_wins\n    granularity: row\n    resolve: { default: last_write_wins }\n",
        )
        .unwrap();
        let rules = c.tables[0].rules(&BTreeMap::new());
        assert_eq!(rules.deletes, DeletePolicy::UpdateWins);
        assert_eq!(rules.granularity, Granularity::Row);
        assert_eq!(rules.default_strategy, Strategy::LastWriteWins);
    }

    #[test]
    fn validation_errors() {
        let two = |a: &str, b: &str| {
            format!(
                "nodes:\n  - name: {a}\n    hub: http://h:1\n    data_dir: d\n{SQLITE_DB}  - name: {b}\n    hub: http://h:1\n    data_dir: e\n{SQLITE_DB}tables:\n  - name: t\n"
            )
        };
        assert!(parse(&two("a", "b")).is_ok());
        let e = err(&two("a", "a"));
        assert!(
            e.contains("nodes[1].name: node name a is used twice (also nodes[0])"),
            "{e}"
        );
        let e = err("tables:\n  - name: t\n  - name: t\n");
        assert!(e.contains("tables[1].name: table t is listed twice"), "{e}");
        let e = err("hub:\n  listen: 127.0.0.1:7700\n  data_dir: d\n");
        assert!(e.contains("no tables are configured"), "{e}");
        let e = err("tables: []\n");
        assert!(e.contains("no tables"), "{e}");
        let e = err("");
        assert!(e.contains("tables"), "{e}");
        let e = err(&with_node(SQLITE_DB).replace("name: a", "name: \"a b\""));
        assert!(
            e.contains("line 2") && e.contains("invalid node name"),
            "{e}"
        );
        let e = err(&with_node(SQLITE_DB).replace("http://h:1", "h:1"));
        assert!(
            e.contains("line 3") && e.contains("hub url `h:1` is not an http:// or https:// url"),
            "{e}"
        );
        let e = err("hub:\n  listen: localhost:7700\n  data_dir: d\ntables: [{name: t}]\n");
        assert!(
            e.contains("line 2") && e.contains("`localhost:7700` is not a socket address"),
            "{e}"
        );
        let e = err(
            "hub:\n  listen: 127.0.0.1:1\n  metrics: 9700\n  data_dir: d\ntables: [{name: t}]\n",
        );
        assert!(e.contains("line 3") && e.contains("socket address"), "{e}");
        let e = err(
            "hub:\n  listen: 127.0.0.1:1\n  data_dir: d\n  tombstone_grace_hours: 0\ntables: [{name: t}]\n",
        );
        assert!(e.contains("tombstone_grace_hours is 0"), "{e}");
        let c = parse(
            "hub:\n  listen: 127.0.0.1:1\n  data_dir: d\n  tombstone_grace_hours: 2\ntables: [{name: t}]\n",
        )
        .unwrap();
        assert_eq!(c.hub().unwrap().tombstone_grace_hours, 2);
        let e = err(
            "hub:\n  listen: 127.0.0.1:1\n  data_dir: d\nnodes:\n  - name: hub\n    hub: http://h:1\n    data_dir: d\n    database: { type: sqlite, url: sqlite:x }\ntables: [{name: t}]\n",
        );
        assert!(e.contains("also the hub's name"), "{e}");
        let e = err("tables: [{name: t}]\nsync:\n  batch_size: 0\n");
        assert!(
            e.contains("line 3") && e.contains("batch_size 0 is out of range"),
            "{e}"
        );
        let e = err("tables: [{name: t}]\nsync:\n  batch_size: 10001\n");
        assert!(e.contains("from 1 to 10000"), "{e}");
        let e = err("tables: [{name: t}]\nconflicts:\n  retention_days: 0\n");
        assert!(e.contains("retention_days 0 is out of range"), "{e}");
        let e = err(
            "tables: [{name: t}]\nconflicts:\n  alert: { per_hour: 1, webhook: \"ftp://x/tok\" }\n",
        );
        assert!(e.contains("webhook must be") && !e.contains("tok"), "{e}");
        let e = err(&with_node(
            "    database: { type: redis, url: \"redis://h\" }\n",
        ));
        assert!(
            e.contains("redis is a target only") && e.contains("mode: subscribe"),
            "{e}"
        );
        let e = err(&with_node(
            "    database: { type: sqlite, url: \"sqlite:a\", slot: s }\n",
        ));
        assert!(e.contains("slot applies to type postgresql only"), "{e}");
        let e = err(&with_node(
            "    database: { type: sqlite, url: \"sqlite:a\", capture: peek }\n",
        ));
        assert!(e.contains("capture applies to type postgresql only"), "{e}");
        let e = err(&with_node(
            "    database: { type: postgresql, url: \"postgres://h/db\", capture: poll }\n",
        ));
        assert!(
            e.contains("capture: unknown value `poll`") && e.contains("stream or peek"),
            "{e}"
        );
        let e = err(&with_node(
            "    database: { type: postgresql, url: \"postgres://h/db\", slot: My-Slot }\n",
        ));
        assert!(e.contains("not a valid PostgreSQL name"), "{e}");
        let e = err(
            "tables:\n  - name: t\n    granularity: row\n    resolve: { fields: { a: max } }\n",
        );
        assert!(e.contains("line 2") && e.contains("granularity row"), "{e}");
        let e = err("tables:\n  - name: t\n    key: [id]\n    resolve: { fields: { id: max } }\n");
        assert!(e.contains("`id` is a key column"), "{e}");
        let e = err("tables:\n  - name: t\n    key: [id, id]\n");
        assert!(e.contains("twice"), "{e}");
        let e = err("tables:\n  - name: t\n  bad indent: 1\n");
        assert!(
            e.contains("line 3") && e.contains("fix the YAML syntax"),
            "{e}"
        );
    }

    #[test]
    fn conflicts_mirror_defaults_resolves_and_redacts() {
        let c = parse(
            "tables: [{name: t}]\nconflicts:\n  retention_days: 9\n  mirror:\n    url: \"sqlite:./m.db\"\n",
        )
        .unwrap();
        let m = c.conflicts.mirror.as_ref().unwrap();
        assert_eq!(m.table, DEFAULT_MIRROR_TABLE);
        assert_eq!(
            m.url.expose(),
            "sqlite:///base/m.db",
            "relative to the config"
        );
        assert_eq!(m.kind(), DatabaseKind::Sqlite);
        assert_eq!(c.conflicts.retention_days, 9);
        let c = parse(
            "tables: [{name: t}]\nconflicts:\n  mirror: { url: \"${PG_URL}\", table: conflicts_2 }\n",
        )
        .unwrap();
        let m = c.conflicts.mirror.as_ref().unwrap();
        assert_eq!(m.table, "conflicts_2");
        assert_eq!(m.kind(), DatabaseKind::Postgresql);
        assert_eq!(m.url.expose(), PG, "the variable expands");
        assert!(!format!("{m:?}").contains("pw"), "{m:?}");
        let c =
            parse("tables: [{name: t}]\nconflicts:\n  mirror: { url: \"mysql://u:pw@h/db\" }\n")
                .unwrap();
        assert_eq!(c.conflicts.mirror.unwrap().kind(), DatabaseKind::Mysql);
        assert_eq!(
            parse("tables: [{name: t}]\n").unwrap().conflicts.mirror,
            None
        );
    }

    #[test]
    fn conflicts_mirror_bad_config_is_one_clear_line() {
        let mirror = |m: &str| {
            err(&format!(
                "tables: [{{name: t}}]\nconflicts:\n  mirror: {m}\n"
            ))
        };
        let e = mirror("{ url: \"sqlite:a.db\", tabel: x }");
        assert!(
            e.contains("unknown key `tabel`") && e.contains("line 3"),
            "{e}"
        );
        let e = mirror("{ url: \"sqlite:a.db\", table: \"\" }");
        assert!(e.contains("mirror table is empty"), "{e}");
        let e = mirror("{ url: \"sqlite:a.db\", table: \"x; DROP TABLE y\" }");
        assert!(e.contains("not a plain identifier"), "{e}");
        let e = mirror("{ url: \"sqlite:a.db\", table: 9lives }");
        assert!(e.contains("not a plain identifier"), "{e}");
        let e = mirror(&format!(
            "{{ url: \"sqlite:a.db\", table: {} }}",
            "t".repeat(64)
        ));
        assert!(e.contains("at most 63 bytes"), "{e}");
        let e = mirror("{ url: \"mongodb://u:pw@h/db\" }");
        assert!(
            e.contains("not a supported database (it starts with `mongodb:`)") && !e.contains("pw"),
            "{e}"
        );
        let e = mirror("{ url: \"u:pw@h/db\" }");
        assert!(e.contains("not a supported database"), "{e}");
        let e = mirror("{ url: \"\" }");
        assert!(e.contains("mirror url is empty"), "{e}");
        let e = mirror("{ table: t }");
        assert!(e.contains("missing key `url`"), "{e}");
    }

    #[test]
    fn key_accepts_a_single_column_and_mariadb_alias() {
        let c = parse(
            &with_node("    database: { type: mariadb, url: \"mysql://u:p@h/db\" }\n")
                .replace("  - name: t\n", "  - name: t\n    key: id\n"),
        )
        .unwrap();
        assert_eq!(c.tables[0].key, ["id"]);
        assert_eq!(c.nodes[0].database.kind, DatabaseKind::Mysql);
        assert_eq!(Mode::Publish.as_str(), "publish");
        assert!(Mode::Publish.captures() && !Mode::Publish.applies());
        assert!(!Mode::Subscribe.captures() && Mode::Subscribe.applies());
    }
}
