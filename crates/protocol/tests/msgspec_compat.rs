//! Host commands are byte-identical to Python `msgspec.Struct(tag=True)` encodings, both
//! directions, checked against real msgspec (installed into `.venv` by `scripts/test.sh`).

use serde_bytes::ByteBuf;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Proc, Stdio};
use tensorbus_protocol::host::*;

const PY: &str = r#"
import sys, msgspec
from typing import Literal, Union

class BaseCommand(msgspec.Struct, tag=True, kw_only=True):
    timestamp: float | None = None
    semaphore_name: str | None = None

class InitPair(BaseCommand):
    pair_name: str
    local_name: str
    remote_name: str
    expected_world_size: int
    mesh_shape_payload: memoryview | None = None
    placements_payload: memoryview | None = None

class RegisterTensors(BaseCommand):
    batch_id: str
    tensors: list[tuple[str, memoryview]]
    bucket_size: int | None = None

class Transfer(BaseCommand):
    batch_id: str
    transfer_type: Literal["send", "recv"]

class QueryStatus(BaseCommand):
    batch_id: str
    state_name: str

class CleanupBatch(BaseCommand):
    batch_id: str

Message = Union[InitPair, RegisterTensors, Transfer, QueryStatus, CleanupBatch]
dec = msgspec.msgpack.Decoder(Message)
enc = msgspec.msgpack.Encoder()
for line in sys.stdin:
    obj = dec.decode(bytes.fromhex(line.strip()))
    print(enc.encode(obj).hex())
# One command built on the Python side.
print(enc.encode(Transfer(batch_id="b7", transfer_type="recv", timestamp=2.5, semaphore_name="/tb-x")).hex())
"#;

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = root.join(".venv/bin/python");
    assert!(venv.exists(), "{} is missing: run ./scripts/test.sh, which creates it with msgspec", venv.display());
    venv
}

fn samples() -> Vec<Command> {
    vec![
        Command::InitPair(InitPair {
            pair_name: "weights".into(),
            local_name: "trainer".into(),
            remote_name: "inference".into(),
            expected_world_size: 8,
            mesh_shape_payload: Some(ByteBuf::from(vec![1, 2, 3])),
            placements_payload: None,
            timestamp: Some(1_764_000_000.125),
            semaphore_name: Some("/tb-InitPair-weights-1-0".into()),
        }),
        Command::RegisterTensors(RegisterTensors {
            batch_id: "step".into(),
            tensors: vec![
                ("weights".into(), ByteBuf::from(vec![0u8; 40])),
                ("obs".into(), ByteBuf::from(vec![255u8; 300])),
            ],
            bucket_size: Some(1 << 40),
            timestamp: None,
            semaphore_name: Some("/s".into()),
        }),
        Command::Transfer(Transfer {
            batch_id: "step".into(),
            transfer_type: TransferType::Send,
            timestamp: Some(0.0),
            semaphore_name: None,
        }),
        Command::QueryStatus(QueryStatus {
            batch_id: "step".into(),
            state_name: "transfer_signal".into(),
            timestamp: Some(-1.5),
            semaphore_name: Some("/q".into()),
        }),
        Command::CleanupBatch(CleanupBatch { batch_id: "ü-batch".into(), timestamp: None, semaphore_name: None }),
    ]
}

#[test]
fn byte_identical_with_msgspec_both_directions() {
    let mut child = Proc::new(python()).args(["-c", PY]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let ours: Vec<Vec<u8>> = samples().iter().map(|c| c.encode()).collect();
    {
        let mut stdin = child.stdin.take().unwrap();
        for b in &ours {
            writeln!(stdin, "{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed");
    let lines: Vec<Vec<u8>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect())
        .collect();
    assert_eq!(lines.len(), ours.len() + 1);
    for ((mine, theirs), cmd) in ours.iter().zip(&lines).zip(samples()) {
        assert_eq!(mine, theirs, "msgspec re-encodes {} differently", cmd.type_name());
        assert_eq!(Command::decode(theirs).unwrap(), cmd);
    }
    let from_python = Command::decode(lines.last().unwrap()).unwrap();
    assert_eq!(
        from_python,
        Command::Transfer(Transfer {
            batch_id: "b7".into(),
            transfer_type: TransferType::Recv,
            timestamp: Some(2.5),
            semaphore_name: Some("/tb-x".into())
        })
    );
    assert_eq!(&from_python.encode(), lines.last().unwrap());
}

#[test]
fn unknown_types_and_missing_fields_are_refused() {
    #[derive(serde::Serialize)]
    struct Odd {
        #[serde(rename = "type")]
        ty: &'static str,
        batch_id: &'static str,
    }
    let e = Command::decode(&rmp_serde::to_vec_named(&Odd { ty: "Explode", batch_id: "b" }).unwrap()).unwrap_err();
    assert!(e.to_string().contains("Explode"), "{e}");
    let e = Command::decode(&rmp_serde::to_vec_named(&Odd { ty: "Transfer", batch_id: "b" }).unwrap()).unwrap_err();
    assert!(e.to_string().contains("transfer_type"), "{e}");
    assert!(Command::decode(b"\xc1").is_err());
    assert_eq!(
        decode_head(&rmp_serde::to_vec_named(&Odd { ty: "X", batch_id: "b" }).unwrap()),
        Some((Some("X".into()), None))
    );
}
