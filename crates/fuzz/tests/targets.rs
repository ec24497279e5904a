//! The fuzz targets: every decoder that takes bytes from another process, each run for the
//! budget of [`tensorbus_fuzz::budget`]. Beyond "no panic", each checks what its decoder
//! promises for what it accepts.

use std::time::{Duration, Instant};

use tensorbus_fuzz::fuzz;
use tensorbus_planner::{DType, Layout, Placement, Side};
use tensorbus_protocol::control::Message;
use tensorbus_protocol::coordinator::Coordinator;
use tensorbus_protocol::host::{self, Command, CommandResult, RemoteError};
use tensorbus_protocol::payload::{CudaPiece, Memory, MeshPayload, PlacementsPayload, TensorDesc, PAYLOAD_VERSION};

fn desc(memory: Memory, dtype: &str, shape: Vec<u64>) -> TensorDesc {
    let es = dtype.parse::<DType>().unwrap().size() as u64;
    let device = if matches!(memory, Memory::Shm { .. } | Memory::Cma { .. }) { "cpu" } else { "cuda:0" };
    TensorDesc {
        version: PAYLOAD_VERSION,
        name: Some("layers.0.w".into()),
        dtype: dtype.into(),
        strides: tensorbus_planner::contiguous_strides(&shape),
        nbytes: shape.iter().product::<u64>() * es,
        shape,
        device: device.into(),
        memory,
        pid: Some(4242),
        session: Some("0123456789abcdef0123456789abcdef".into()),
    }
}

fn tensor_seeds() -> Vec<TensorDesc> {
    vec![
        desc(Memory::Shm { name: "/tb-seg".into(), offset: 4096 }, "float32", vec![8, 4]),
        desc(Memory::Cma { pid: 4242, addr: 0x7f00_0000_0000 }, "bfloat16", vec![3, 5, 7]),
        desc(Memory::Fd { pid: 4242, fd: 7, size: 1 << 20, offset: 64 }, "float32", vec![16, 16]),
        desc(Memory::CudaIpc { device: 0, handle: vec![7; 64], alloc_size: 1 << 21, offset: 512 }, "float16", vec![64]),
        desc(
            Memory::CudaFd {
                device: 1,
                pid: 4242,
                pieces: vec![CudaPiece { fd: 9, size: 1 << 21 }, CudaPiece { fd: 10, size: 1 << 21 }],
                offset: 4096,
            },
            "int64",
            vec![2, 1, 16],
        ),
    ]
}

/// What `validate` promises for every payload it accepts.
fn check_tensor(bytes: &[u8]) {
    let Ok(d) = TensorDesc::decode(bytes) else { return };
    let Ok(dtype) = d.validate() else { return };
    let numel: u128 = d.shape.iter().map(|&x| x as u128).product();
    assert_eq!(numel * dtype.size() as u128, d.nbytes as u128, "accepted nbytes that lies: {d:?}");
    assert!(tensorbus_planner::is_contiguous(&d.shape, &d.strides), "accepted strides {d:?}");
    let (start, end) = match &d.memory {
        Memory::Shm { offset, .. }
        | Memory::Fd { offset, .. }
        | Memory::CudaIpc { offset, .. }
        | Memory::CudaFd { offset, .. } => (*offset, None),
        Memory::Cma { addr, .. } => (*addr, None::<u64>),
    };
    let _ = end;
    assert!(start as u128 + d.nbytes as u128 <= u64::MAX as u128, "accepted a range that wraps: {d:?}");
}

/// What the agent does with an InitPair's payloads, to the point of building the layout.
fn check_pair(c: &host::InitPair) {
    let mesh = match &c.mesh_shape_payload {
        Some(b) => match MeshPayload::decode(b) {
            Ok(m) => m.shape,
            Err(_) => return,
        },
        None => vec![c.expected_world_size.clamp(1, 1 << 20) as usize],
    };
    let placements = match &c.placements_payload {
        Some(b) => match PlacementsPayload::decode(b) {
            Ok(p) => p,
            Err(_) => return,
        },
        None => vec![Placement::Replicate; mesh.len().min(64)],
    };
    if let Ok(l) = Layout::from_parts(mesh, placements) {
        let _ = l.check_world_size(Side::Src, c.expected_world_size as usize);
        // As the agent does: a tensor's shape is checked against the layout before it is split.
        let shape = [1u64 << 40, 3, 7];
        for nd in 1..=shape.len() {
            if l.check_ndim(nd).is_ok() {
                let local = l.local_shape(&shape[..nd], l.world_size() - 1);
                assert!(local.iter().zip(&shape).all(|(a, b)| a <= b), "{local:?}");
            }
        }
    }
}

fn command_seeds() -> Vec<Vec<u8>> {
    let ts = tensor_seeds();
    let cmds = [
        Command::InitPair(host::InitPair {
            pair_name: "weights".into(),
            local_name: "trainer".into(),
            remote_name: "inference".into(),
            expected_world_size: 8,
            mesh_shape_payload: Some(MeshPayload::new(vec![2, 4], 5).encode().into()),
            placements_payload: Some(
                PlacementsPayload::new(&[Placement::Shard(0), Placement::Shard(1)]).encode().into(),
            ),
            timestamp: Some(1.5),
            semaphore_name: Some("/tb-InitPair-weights-1-0".into()),
        }),
        Command::RegisterTensors(host::RegisterTensors {
            batch_id: "step".into(),
            tensors: ts.iter().map(|d| ("weights".to_string(), d.encode().into())).collect(),
            bucket_size: Some(1 << 25),
            timestamp: None,
            semaphore_name: Some("/tb-RegisterTensors-step-1-1".into()),
        }),
        Command::Transfer(host::Transfer {
            batch_id: "step".into(),
            transfer_type: host::TransferType::Send,
            timestamp: Some(2.0),
            semaphore_name: Some("/tb-Transfer-step-1-2".into()),
        }),
        Command::QueryStatus(host::QueryStatus {
            batch_id: "step".into(),
            state_name: "epoch_ended:3".into(),
            timestamp: None,
            semaphore_name: None,
        }),
        Command::CleanupBatch(host::CleanupBatch { batch_id: "step".into(), timestamp: None, semaphore_name: None }),
    ];
    let mut seeds: Vec<Vec<u8>> = cmds.iter().map(Command::encode).collect();
    seeds.push(CommandResult::ok().encode());
    seeds.push(
        CommandResult::err(RemoteError {
            kind: host::ErrorKind::ValueError,
            message: "bad".into(),
            origin: "agent:0".into(),
        })
        .encode(),
    );
    seeds
}

#[test]
fn host_commands() {
    let r = fuzz("host_commands", &command_seeds(), |b| {
        let _ = host::decode_head(b);
        let _ = CommandResult::decode(b);
        match Command::decode(b) {
            Ok(Command::RegisterTensors(c)) => {
                for (_, p) in &c.tensors {
                    check_tensor(p);
                }
            }
            Ok(Command::InitPair(c)) => check_pair(&c),
            Ok(c) => {
                let _ = (c.type_name(), c.semaphore_name(), c.encode());
            }
            Err(_) => {}
        }
    });
    assert!(r.inputs > 5);
}

#[test]
fn tensor_payloads() {
    let mut seeds: Vec<Vec<u8>> = tensor_seeds().iter().map(TensorDesc::encode).collect();
    seeds.push(MeshPayload::new(vec![4, 2], 3).encode());
    seeds.push(PlacementsPayload::new(&[Placement::Partial(Default::default()), Placement::Replicate]).encode());
    let r = fuzz("tensor_payloads", &seeds, |b| {
        check_tensor(b);
        if let Ok(m) = MeshPayload::decode(b) {
            if let Ok(mesh) = tensorbus_planner::DeviceMesh::new(m.shape) {
                if m.rank < mesh.size() {
                    assert_eq!(mesh.rank_of(&mesh.coords(m.rank)), m.rank);
                }
            }
        }
        let _ = PlacementsPayload::decode(b);
    });
    assert!(r.inputs > 5);
}

#[test]
fn control_messages() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"type":"ping","node_id":"command","timestamp":"2026-11-29T07:00:00.000000Z","value":null}"#,
        r#"{"type":"identify","node_id":"trainer:0","timestamp":"2026-11-29T07:00:00Z","value":{"node_id":"trainer:0","outbox":"tcp://127.0.0.1:7000","status":"waiting","signals":["weights"],"slots":[],"protocol":1,"host":"h","data_addr":"127.0.0.1:7001","pairs":{"weights":{"local_name":"trainer","remote_name":"inference","world_size":2,"rank":0,"mesh":[2],"placements":["S(0)"]}},"batches":{"step":{"pairs":["weights"],"tensors":[],"bucket_size":null}}}}"#,
        r#"{"type":"status","node_id":"trainer:0","timestamp":"2026-11-29T07:00:00Z","value":"ready"}"#,
        r#"{"type":"process","node_id":"command","timestamp":"2026-11-29T07:00:00Z","value":{"epoch":3,"input":{"batch_id":"step","seq":3}}}"#,
        r#"{"type":"start","node_id":"command","timestamp":"2026-11-29T07:00:00Z","value":5}"#,
        r#"{"type":"event","node_id":"trainer:0","timestamp":"2026-11-29T07:00:00Z","value":[{"id":1,"timestamp":"2026-11-29T07:00:00Z","node_id":"trainer:0","signal":"weights","epoch":3,"value":{"batch_id":"step","kind":"done","bytes":128,"seconds":0.5}}]}"#,
        r#"{"type":"error","node_id":"trainer:0","timestamp":"2026-11-29T07:00:00Z","value":{"err_type":"ValueError","err_args":["bad",{"origin":"trainer:0"}],"traceback":null,"batch_id":"step","epoch":3}}"#,
        r#"{"type":"epoch_ended","node_id":"command","timestamp":"2026-11-29T07:00:00Z","value":[7,["agent:1",2]]}"#,
        r#"{"type":"announce","node_id":"command","timestamp":"2026-11-29T07:00:00Z","value":{"inbox":"tcp://127.0.0.1:5555","nodes":{}}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Parsed messages go on into the command node's state machine, as its driver would pass them.
    let mut c = Coordinator::new("command", "tcp://127.0.0.1:5555");
    let mut now = Instant::now();
    let r = fuzz("control_messages", &seeds, |b| {
        if let Ok(m) = Message::from_json(b) {
            let _ = m.to_json();
            c.handle_message(now, m);
            now += Duration::from_millis(7);
            c.handle_timeout(now);
            while c.poll_outgoing().is_some() {}
            let _ = c.poll_timeout();
        }
    });
    assert!(r.inputs > 5);
}

#[test]
fn tcp_frames() {
    use tensorbus_transport::tcp::{frame_header, read_header};
    let mut two = frame_header(3, "step\0weights\x000", 4096, 1 << 20);
    two.extend(frame_header(u64::MAX, "", u64::MAX, 0));
    let seeds = vec![frame_header(7, "w\0p\x003", 128, 4096), two];
    let r = fuzz("tcp_frames", &seeds, |b| {
        let mut r = b;
        for _ in 0..16 {
            match read_header(&mut r) {
                Ok(Some(f)) => assert!(f.key.len() <= u16::MAX as usize),
                Ok(None) | Err(_) => break,
            }
        }
    });
    assert!(r.inputs > 2);
}
