//! A hand-written gRPC peer sends the real hub forged and malformed input:
//! each gets an error naming the problem, nothing is stored, and the hub
//! keeps serving everyone else.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use anyhow::Result;
use syncmesh::mesh::hub_status;
use syncmesh_hub::core::HubSettings;
use syncmesh_hub::server::start_hub;
use syncmesh_node::wire;
use syncmesh_proto::v1 as pb;
use syncmesh_proto::v1::sync_client::SyncClient;
use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Ntp64, Op, OpId, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn op(origin: &str, seq: u64) -> pb::Op {
    let o = NodeId::new(origin).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let hlc = Hlc {
        time: Ntp64::from_unix_millis(now.as_millis() as u64).0,
        id: o.hlc_id(),
    };
    wire::op_to_proto(&Op::upsert(
        OpId::new(o, seq),
        hlc,
        "orders",
        vec![Value::Int(1)],
        vec![FieldWrite::new("qty", Value::Int(5))],
    ))
}

fn msg(body: pb::node_message::Body) -> pb::NodeMessage {
    pb::NodeMessage { body: Some(body) }
}

fn hello(node: &str) -> pb::NodeMessage {
    msg(pb::node_message::Body::Hello(pb::Hello {
        protocol_version: syncmesh_proto::PROTOCOL_VERSION,
        node: node.into(),
        version_vector: None,
        mode: "bidirectional".into(),
        engine: String::new(),
        seen: None,
        resnap: false,
        snapshot: None,
    }))
}

/// Opens a stream, sends `msgs`, and returns the error the hub answers with
/// (code, message), reading until the hub closes the stream.
async fn session(url: &str, msgs: Vec<pb::NodeMessage>) -> Result<Option<(String, String)>> {
    let mut client = SyncClient::connect(url.to_owned()).await?;
    let (tx, rx) = mpsc::channel(16);
    for m in msgs {
        tx.send(m).await?;
    }
    let mut inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await? {
            Ok(Some(pb::HubMessage {
                body: Some(pb::hub_message::Body::Error(e)),
            })) => {
                error = Some((e.code, e.message));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    drop(tx);
    Ok(error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_input_is_refused_and_the_hub_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = HubSettings {
        name: NodeId::new("hub")?,
        batch_size: 100,
        max_clock_drift_ms: 500,
    };
    let hub = start_hub(
        settings,
        Default::default(),
        dir.path(),
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let url = hub.url();

    let cases: Vec<(&str, Vec<pb::NodeMessage>)> = vec![
        (
            "origin_mismatch",
            vec![
                hello("mallory"),
                msg(pb::node_message::Body::Ops(pb::OpBatch {
                    ops: vec![op("alice", 1)],
                })),
            ],
        ),
        (
            "no_hello",
            vec![msg(pb::node_message::Body::Ops(pb::OpBatch {
                ops: vec![op("alice", 1)],
            }))],
        ),
        ("bad_node_name", vec![hello("not a name!")]),
        (
            "malformed_op",
            vec![
                hello("bob"),
                msg(pb::node_message::Body::Ops(pb::OpBatch {
                    ops: vec![pb::Op {
                        kind: 99,
                        ..op("bob", 1)
                    }],
                })),
            ],
        ),
        (
            "malformed_op",
            vec![
                hello("bob"),
                msg(pb::node_message::Body::Ops(pb::OpBatch {
                    ops: vec![pb::Op {
                        table: "x".repeat(100_000),
                        ..op("bob", 1)
                    }],
                })),
            ],
        ),
        (
            "seq_gap",
            vec![
                hello("bob"),
                msg(pb::node_message::Body::Ops(pb::OpBatch {
                    ops: vec![op("bob", 3)],
                })),
            ],
        ),
        (
            "empty_message",
            vec![hello("bob"), pb::NodeMessage { body: None }],
        ),
    ];
    for (code, msgs) in cases {
        let err = session(&url, msgs).await?;
        let (got, message) = err.unwrap_or_else(|| panic!("expected error {code}, got none"));
        assert_eq!(got, code, "{message}");
        assert!(
            !message.is_empty() && !message.contains('\n'),
            "one-line message: {message:?}"
        );
    }
    // A message over the size limit is refused by the transport, not decoded.
    let huge = pb::Op {
        fields: vec![pb::FieldWrite {
            name: "blob".into(),
            value: Some(wire::value_to_proto(&Value::Bytes(vec![
                0;
                syncmesh_proto::MAX_MESSAGE_BYTES
                    + 1
            ]))),
            pred: vec![],
            delta: None,
        }],
        ..op("bob", 1)
    };
    let mut client = SyncClient::connect(url.clone())
        .await?
        .max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello("bob")).await?;
    tx.send(msg(pb::node_message::Body::Ops(pb::OpBatch {
        ops: vec![huge],
    })))
    .await?;
    if let Ok(resp) = client.sync(ReceiverStream::new(rx)).await {
        let mut inbound = resp.into_inner();
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::from_secs(10), inbound.message()).await
        {}
    }
    drop(tx);

    // Nothing was stored, and an honest node is still served.
    assert_eq!(hub_status(&url).await?.total_ops, 0);
    let err = session(
        &url,
        vec![
            hello("carol"),
            msg(pb::node_message::Body::Ops(pb::OpBatch {
                ops: vec![op("carol", 1)],
            })),
        ],
    );
    // carol's stream stays open (no error); stop waiting after the ack.
    let _ = tokio::time::timeout(Duration::from_secs(2), err).await;
    assert_eq!(
        hub_status(&url).await?.total_ops,
        1,
        "the hub still accepts honest ops"
    );
    hub.shutdown().await?;
    Ok(())
}
