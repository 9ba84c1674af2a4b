//! The `syncmesh` command's library: everything the subcommands do, so that
//! end-to-end tests drive the same code as the binary.
//!
//! - [`mesh`]: start a hub from config, query and print its status, wait for
//!   convergence.
//! - [`demo`]: the in-process mesh (hub + three SQLite nodes) behind
//!   `syncmesh demo`, `syncmesh bench` and many tests.
//! - [`check`]: `syncmesh check`.
//! - [`bench`]: `syncmesh bench`; [`bench_pg`]: `syncmesh bench --scenario postgres`.
//! - [`pg`]: throwaway PostgreSQL clusters (tests and the PostgreSQL bench).
//! - [`mariadb`], [`redis_server`]: throwaway MariaDB and Redis servers
//!   (tests and `syncmesh bench --scenario mariadb`, [`bench_mariadb`]).

#![allow(missing_docs)]

pub mod bench;
pub mod bench_mariadb;
pub mod bench_pg;
pub mod check;
pub mod conflicts;
pub mod demo;
pub mod mariadb;
pub mod mesh;
pub mod pg;
pub mod redis_server;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
